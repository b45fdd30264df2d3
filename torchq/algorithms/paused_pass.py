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
``MEMORY_FRACTION = 0`` keeps calibration's peak at the re-running one.

Every switch into an item happens under ``torch.inference_mode()`` in the caller; the
items change no thread-local mode themselves (a layer that enters a mode around a linear
would leak it to the caller while paused).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from greenlet import greenlet, getcurrent

from torchq.memory import available_memory, release_free_memory

__all__ = ["MEMORY_FRACTION", "PausedPass", "paused_item_bytes"]

#: share of the available memory that paused items may hold (0: none pause)
MEMORY_FRACTION = 0.25


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
        self.block, self.module = block, block.module
        self.stages = [list(names) for names in stages]
        self.stage_of = {name: j for j, names in enumerate(stages) for name in names}
        self.linears = {name: block.linears[name] for names in stages for name in names}
        if max_bytes is None:
            max_bytes = int(MEMORY_FRACTION * (available_memory() or 0))
        self.n_paused = min(len(block.inputs), max_bytes // paused_item_bytes(block))
        self.items = [_Item(self, i, args, kwargs) for i, (args, kwargs) in enumerate(block.inputs[: self.n_paused])]
        self.rerun = block.inputs[self.n_paused :]
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

        def stop(m, a):
            let = getcurrent()
            if not isinstance(let, _ItemLet) or let.item.owner is not self:
                fn(a[0])
                raise _Stop

        handles = [self.linears[n].register_forward_pre_hook(stop) for n in self.stages[stage]]
        try:
            with torch.inference_mode():
                for args, kwargs in self.rerun:
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
        with torch.inference_mode():
            for j in range(len(rerun)):
                (args, kwargs), rerun[j] = rerun[j], None
                if release_inputs:
                    self.block.release_input(self.n_paused + j)
                outs.append(_first(self.module(*args, **kwargs)))
                del args
        return outs
