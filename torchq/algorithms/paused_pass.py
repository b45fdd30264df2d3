"""One pass over a decoder layer that pauses at the input of each stage of linears.

Sequential calibration inside a layer (GPTQ's true-sequential) rounds the linears in
stages (q/k/v, o, gate/up, down), each from inputs computed with the earlier stages
already rounded. Re-running the layer from its start for every stage, then once more for
its outputs, computes about 2.3x the layer's FLOPs. Here each calibration item's forward
runs in a greenlet of its own (a stack that can be switched to and from within one
thread) and waits at the first linear of each stage until the stage is rounded; the layer
is computed once, and the finished forward is its output.

Greenlets, not threads: an item's forward then runs on the calling thread, with its
OpenMP team and allocator arena. On OS threads (one per paused item: 128 for GPTQ's
default calibration) each item woke a cold OpenMP team of its own and allocated from
other arenas: one SmolLM2 layer's 128 forwards of 512 tokens took 6.2 s on item threads,
about 5 s in greenlets and 4.1 s run straight through on one thread (the rest is page
faults on the paused items' fresh activations), and every thread kept torch's per-thread
buffers.

The items run one at a time, in order, each from where it paused: every number equals the
re-running one (tested). The cost is memory: a paused item keeps its live activations
inside the layer (measured on SmolLM2: about 7x the item's input in resident memory at
``down_proj``, 8.6 MB per 512-token item; it was 17x with one thread per item).
:func:`paused_item_bytes` estimates 19x, with room for the allocator's fragmentation on
other models. Only as many items pause as fit in ``max_bytes`` (default:
:data:`MEMORY_FRACTION` of the memory available when the pass starts); the others re-run
the layer per stage, as before.

Re-running items skip what is already final: once every linear inside a direct child of
the layer (a decoder layer's ``self_attn``) is rounded, that child's output for an item is
the same in every later pass (same inputs, same weights), so the first later pass keeps it
(:class:`_CompletedOutputs`) and the passes after it return it instead of computing it. On
a decoder layer the gate/up pass keeps the attention output and the down pass and the
final one reuse it: 1.9 instead of 2.7 layer forwards per re-running item, for one more
copy of the item's hidden-state size held until its final pass. Only a child's first call
in a forward is reused (a second call has other inputs), and a kept output that its layer
changed in place is detected and recomputed, with a warning.

The first later pass need not compute that output either, when the child's last stage is
one linear whose output is the child's (``o_proj``: the attention's output is
``o_proj(x)``, its weights ``None``): the stage's own pass keeps the linear's input ``x``
(no wider than the item's hidden states, so ``down_proj``'s is not kept), and the next
pass runs just that linear on it instead of the q/k/v projections, the rotary embedding,
the attention and the linear. Per layer, the first item checks that the child's output
is bit for bit ``(linear(x), None, ...)``; a child that computes anything else keeps its
full forward, with a warning. On SmolLM2 this takes 1.9 layer forwards per item down to
about 1.6 with no more memory (the kept input is freed as the output it gives is kept):
GPTQ's default went from 284 s to 248 s back to back, the same bits.

The default pauses no item (``MEMORY_FRACTION = 0``): on SmolLM2-135M at 128 x 512 tokens
(2-core AMD Zen 4) re-running with reuse took 231 s at +455 MB, inside both of GPTQ's bars
(< 5 min, peak < 2x the 513 MB float model); pausing items in 0.25 of the available memory
took 160 s at +1374 MB. Raise it to trade memory for time.

Every switch into an item happens under ``torch.inference_mode()`` in the caller; the
items change no thread-local mode themselves (a layer that enters a mode around a linear
would leak it to the caller while paused).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
from greenlet import greenlet, getcurrent

from torchq.memory import available_memory, release_free_memory

__all__ = ["MEMORY_FRACTION", "PausedPass", "paused_item_bytes"]

#: share of the available memory that paused items may hold (0, the default: none pause)
MEMORY_FRACTION = 0.0


class _Abort(Exception):
    """Raised inside a paused item's forward when the pass is abandoned."""


class _Stop(Exception):
    """Ends a re-run item's forward at the stage's input."""


class _ItemLet(greenlet):
    """The greenlet an item's forward runs in (``.item``: that item)."""

    item: "_Item"


class _Item:
    """One calibration item's forward through the layer, run in its greenlet only while
    the caller waits for it."""

    def __init__(self, owner: "PausedPass", index: int, args, kwargs):
        self.owner, self.index, self.args, self.kwargs = owner, index, args, kwargs
        self.let = _ItemLet(self.run)
        self.let.item = self
        self.state = "new"  # "new" (not started), "paused" (at ``stage``), "done"
        self.stage = -1
        self.stage_input: Optional[torch.Tensor] = None
        self.passed: set[int] = set()
        self.output = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.output = _first(self.owner.module(*self.args, **self.kwargs))
        except _Abort:
            pass
        except BaseException as e:  # re-raised in the caller (a KeyboardInterrupt too)
            self.error = e
        finally:
            self.state, self.stage_input = "done", None

    def wait_at(self, stage: int, x: torch.Tensor) -> None:
        """Called by the linear's pre-hook inside this item's greenlet: back to the caller
        until resumed."""
        self.passed.add(stage)
        self.state, self.stage, self.stage_input = "paused", stage, x
        self.let.parent.switch()
        self.stage_input = None
        if self.owner.aborted:
            raise _Abort

    def resume(self) -> None:
        """Run this item (in the caller's thread) until it pauses or ends."""
        self.let.parent = getcurrent()  # where its next pause (or its end) returns to
        with torch.inference_mode():
            self.let.switch()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def paused_item_bytes(block) -> int:
    """Resident memory one paused item is expected to hold: its input's bytes x (4 + 2 x the
    widest linear input / the hidden size) for the live activations, x2 for fragmentation."""
    args, _ = block.inputs[0]
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.dim() == 0:
        return 1 << 62  # not a hidden-states input: never pause
    widest = max(lin.in_features for lin in block.linears.values())
    return int(x.numel() * x.element_size() * (4 + 2 * widest / x.shape[-1]) * 2)


def _fingerprint(out) -> tuple:
    """Two float64 sums per tensor of a module's output: an in-place change after it was
    kept (a parent writing into it) shows as a different fingerprint."""
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(
        (float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t, dtype=torch.float64)))
        if isinstance(t, torch.Tensor) and t.is_floating_point() else None
        for t in tensors
    )


class _CompletedOutputs:
    """The outputs of the layer's direct children whose linears are all rounded, per
    re-running item (see the module docstring). ``during(stage)`` patches the completed
    children's ``forward`` for one pass over the re-running items; ``item`` is set to the
    index of the item running; ``drop(item)`` frees an item's outputs after its last pass."""

    def __init__(self, module: torch.nn.Module, stage_of_linear: dict[str, int], hidden_size: Optional[int] = None):
        self.last_stage: dict[str, int] = {}  # child name -> the last stage among its linears
        for name, stage in stage_of_linear.items():
            child = name.split(".", 1)[0]
            if "." in name:
                self.last_stage[child] = max(stage, self.last_stage.get(child, -1))
        self.module = module
        self.kept: dict[str, dict[int, tuple]] = {c: {} for c in self.last_stage}
        self.disabled: set[str] = set()
        self.called: dict[str, set[int]] = {}
        self.item = -1
        # child -> its last stage's single linear, whose kept input may stand in for the child
        self.last_linear: dict[str, torch.nn.Module] = {}
        for child, last in self.last_stage.items():
            names = [n for n, j in stage_of_linear.items() if j == last]
            lin = module.get_submodule(names[0]) if len(names) == 1 and names[0].startswith(child + ".") else None
            if lin is not None and hidden_size is not None and getattr(lin, "in_features", hidden_size + 1) <= hidden_size:
                self.last_linear[child] = lin
        self.inputs: dict[str, dict[int, torch.Tensor]] = {c: {} for c in self.last_linear}
        self.output_arity: dict[str, Optional[int]] = {}  # checked children: their output tuple's length (None: a tensor)

    def child_ending_at(self, stage: int) -> Optional[str]:
        """The child whose last stage ``stage`` is (one linear that may stand in for it), or None."""
        return next((c for c, lin in self.last_linear.items() if self.last_stage[c] == stage and c not in self.disabled), None)

    def keep_input(self, child: str, x: torch.Tensor) -> None:
        """The running item's input of ``child``'s last linear, for the next pass."""
        self.inputs[child][self.item] = x

    @contextlib.contextmanager
    def during(self, stage: int, keep: bool = True):
        """Context for one pass: children whose last stage is before ``stage`` reuse their kept
        output, or compute it and (``keep``: a later pass follows) keep it."""
        patched = []  # (child module, its own instance-level forward or None)
        self.called = {c: set() for c in self.last_stage}  # items whose child ran in this pass
        try:
            for child, last in self.last_stage.items():
                if last < stage and child not in self.disabled:
                    mod = self.module.get_submodule(child)
                    patched.append((mod, mod.__dict__.get("forward")))
                    mod.forward = self._reusing(child, mod.forward, keep)
            yield
        finally:
            for mod, own in patched:
                if own is None:
                    del mod.forward
                else:
                    mod.forward = own

    def _reusing(self, child: str, forward, keep: bool):
        kept, called = self.kept[child], self.called[child]

        def reuse(*args, **kwargs):
            if self.item in called:  # a second call in one forward: other inputs, computed
                return forward(*args, **kwargs)
            called.add(self.item)
            hit = kept.get(self.item)
            if hit is not None and child not in self.disabled:
                out, fp = hit
                if _fingerprint(out) == fp:
                    return out
                self.disabled.add(child)
                self.kept[child].clear()
                warnings.warn(
                    f"calibration: the layer changes the output of its {child!r} in place, so that output cannot be "
                    f"reused between calibration stages; it is recomputed in every pass (slower, same numbers)"
                )
                return forward(*args, **kwargs)
            x = self.inputs[child].pop(self.item, None) if child in self.inputs else None
            if x is not None and self.output_arity.get(child, 0) != 0:  # checked: the linear stands in
                arity = self.output_arity[child]
                short = self.last_linear[child](x)
                out = short if arity is None else (short,) + (None,) * (arity - 1)
            elif x is not None and child not in self.output_arity:
                out = self._check_stand_in(child, x, forward, args, kwargs)
            else:
                out = forward(*args, **kwargs)
            if keep and child not in self.disabled:
                kept[self.item] = (out, _fingerprint(out))
            return out

        return reuse

    def _check_stand_in(self, child: str, x: torch.Tensor, forward, args, kwargs):
        """Run ``child`` and check, bit for bit, that its output is its last linear's output
        (and ``None`` for the rest of a tuple) and that the linear read ``x``: then, on this
        layer, the linear on the kept input stands in for the child; if not, the child's full
        forward runs in every pass. Returns the child's output."""
        seen = []
        handle = self.last_linear[child].register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
        try:
            out = forward(*args, **kwargs)
        finally:
            handle.remove()
        first, tail = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if (len(seen) == 1 and seen[0][1] is first and all(t is None for t in tail)
                and seen[0][0].shape == x.shape and torch.equal(seen[0][0], x)):
            self.output_arity[child] = len(out) if isinstance(out, tuple) else None
            return out
        self.output_arity[child] = 0
        self.inputs[child].clear()
        warnings.warn(
            f"calibration: the output of the layer's {child!r} is not just its last linear's output on the input kept "
            f"from that linear's stage (it also returns tensors, e.g. eager attention weights, or computes more), so it "
            f"is recomputed in the next pass (slower, same numbers)"
        )
        return out

    def drop(self, item: int) -> None:
        for kept in self.kept.values():
            kept.pop(item, None)
        for inputs in self.inputs.values():
            inputs.pop(item, None)

    def clear(self) -> None:
        for kept in (*self.kept.values(), *self.inputs.values()):
            kept.clear()


class PausedPass:
    """``with PausedPass(block, stages) as p: p.gather(0, fn); ...; outs = p.finish()``.

    ``stages``: the block's linear names grouped by the input they read, in the order the
    layer calls them (:func:`torchq.algorithms.stats.input_stages`). ``gather(j, fn)``
    brings every item to stage ``j``'s input and calls ``fn(x)`` on it in the caller
    (in item order); the caller then rounds stage ``j`` in place before gathering ``j + 1``.
    ``finish()`` runs every item to its end and returns the outputs (first element of
    tuple outputs), in item order. Leaving the ``with`` early abandons the paused items.
    ``n_paused``: how many items pause (the first ones; see the module docstring).
    """

    def __init__(self, block, stages: list[list[str]], max_bytes: Optional[int] = None):
        if getattr(block, "stream_dtype", None) is not None:  # the driver never pairs them (_stream_dtype)
            raise ValueError("the paused pass (GPTQ) reads and writes hidden streams in the model's dtype, not "
                             f"{block.stream_dtype}: calibrate with stream_dtype='float32'")
        self.block, self.module = block, block.module
        self.stages = [list(names) for names in stages]
        self.stage_of = {name: j for j, names in enumerate(stages) for name in names}
        self.linears = {name: block.linears[name] for names in stages for name in names}
        if max_bytes is None:
            max_bytes = int(MEMORY_FRACTION * (available_memory() or 0))
        self.n_paused = min(len(block.inputs), max_bytes // paused_item_bytes(block))
        self.items = [_Item(self, i, args, kwargs) for i, (args, kwargs) in enumerate(block.inputs[: self.n_paused])]
        self.rerun = block.inputs[self.n_paused :]
        x0 = block.inputs[0][0][0] if block.inputs and block.inputs[0][0] else None
        hidden = x0.shape[-1] if isinstance(x0, torch.Tensor) and x0.dim() > 0 else None
        self.completed = _CompletedOutputs(self.module, self.stage_of, hidden)
        self.aborted = False
        self.next_stage = 0
        self._handles: list = []

    def __enter__(self) -> "PausedPass":
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_pre_hook(lambda m, a, _j=self.stage_of[name]: self._pre_hook(_j, a[0])))
        return self

    def __exit__(self, *exc) -> None:
        self.aborted = True
        for item in self.items:
            if item.state == "paused":
                item.resume()  # its pause raises _Abort: the forward unwinds and ends
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for item in self.items:  # item <-> greenlet is a reference cycle: break it, so the
            item.let = item.args = item.kwargs = item.output = None  # inputs go now, not at a gc
        self.items.clear()
        self.rerun = []
        self.completed.clear()
        release_free_memory()  # the paused activations' heap, before the next layer

    def _pre_hook(self, stage: int, x: torch.Tensor) -> None:
        let = getcurrent()
        item = let.item if isinstance(let, _ItemLet) else None
        if item is None or item.owner is not self or stage in item.passed:
            return  # a re-run in the caller, or a later linear of the same stage
        if stage < self.next_stage - 1:
            raise RuntimeError(
                f"calibration item {item.index} reached {self.stages[stage]} after they were rounded: its linears run "
                f"in another order than the stages {self.stages}; calibrate with true_sequential=False"
            )
        item.wait_at(stage, x)

    def _advance(self, item: _Item) -> None:
        item.resume()
        if item.error is not None:
            raise item.error

    def gather(self, stage: int, fn: Callable[[torch.Tensor], None]) -> None:
        """Every item to stage ``stage``'s input; ``fn(x)`` per item that reaches it."""
        if stage != self.next_stage:
            raise RuntimeError(f"stages are gathered in order: expected {self.next_stage}, got {stage}")
        self.next_stage += 1
        for item in self.items:
            if item.state == "new" or item.state == "paused" and item.stage < stage:
                self._advance(item)  # (an item paused at a later stage never calls these linears)
            if item.state == "paused" and item.stage == stage:
                with torch.inference_mode():
                    fn(item.stage_input)
        if self.rerun:
            self._rerun_to(stage, fn)

    def _rerun_to(self, stage: int, fn) -> None:
        """The items that do not pause: each from the layer's start to the stage's input."""

        stand_in = self.completed.child_ending_at(stage)  # keep its linear's input for the next pass

        def stop(m, a):
            let = getcurrent()
            if not isinstance(let, _ItemLet) or let.item.owner is not self:
                fn(a[0])
                if stand_in is not None:
                    self.completed.keep_input(stand_in, a[0])
                raise _Stop

        handles = [self.linears[n].register_forward_pre_hook(stop) for n in self.stages[stage]]
        try:
            with torch.inference_mode(), self.completed.during(stage):
                for j, (args, kwargs) in enumerate(self.rerun):
                    self.completed.item = j
                    try:
                        self.module(*args, **kwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()

    def finish(self, release_inputs: bool = False) -> list:
        """Run every item to its end; the outputs in item order. ``release_inputs`` (the last
        pass over a decoder layer only, :meth:`~.sequential.Block.check_release`): each item's
        hidden states leave ``block.inputs`` as soon as its output exists, so the outputs
        replace the inputs in memory instead of adding one more layer's activations."""
        if release_inputs:
            self.block.check_release()
        self.next_stage = len(self.stages) + 1  # any stage an item has not passed is now an error
        outs = []
        for item in self.items:
            if item.state != "done":
                self._advance(item)
            outs.append(item.output)
            if release_inputs:
                item.args = item.output = None
                self.block.release_input(item.index)
        rerun, self.rerun = self.rerun, []
        with torch.inference_mode(), self.completed.during(len(self.stages), keep=False):
            for j in range(len(rerun)):
                (args, kwargs), rerun[j] = rerun[j], None
                if release_inputs:
                    self.block.release_input(self.n_paused + j)
                self.completed.item = j
                outs.append(_first(self.module(*args, **kwargs)))
                self.completed.drop(j)
                del args
        return outs
