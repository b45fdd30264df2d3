"""Activation statistics gathered while a block runs on its calibration inputs.

Linears that read the very same input tensor (q/k/v, gate/up) share one accumulator, so
the costly ``X^T X`` of GPTQ is computed once per distinct input.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["HessianSum", "hessians", "input_stats", "input_stages", "stage_hessians"]


class _Shared:
    """Calls ``update(slot, x)`` once per distinct input tensor. A linear first seen right
    after another one on the very same tensor object joins that one's slot (q/k/v,
    gate/up). The previous input is held (not just its address: a freed buffer of the same
    size is often reused for the next layer's input, which must not count as shared)."""

    def __init__(self, update: Callable[[int, torch.Tensor], None]):
        self.update = update
        self.key: dict[str, int] = {}
        self._prev_x: Optional[torch.Tensor] = None
        self._prev_slot = -1
        self._slots = 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        same = x is self._prev_x
        if name not in self.key:
            if same:
                self.key[name] = self._prev_slot
            else:
                self.key[name] = self._slots
                self._slots += 1
        slot = self.key[name]
        if not (same and slot == self._prev_slot):
            self.update(slot, x.reshape(-1, x.shape[-1]))
        self._prev_x, self._prev_slot = x, slot

    def release(self) -> None:
        self._prev_x = None


def input_stages(block, names: list[str]) -> list[list[str]]:
    """``names`` grouped by the input tensor they read, in the order the block runs them
    (a decoder layer: ``[q, k, v], [o], [gate, up], [down]``), from one calibration item."""
    order: list[list[str]] = []
    last: list = [None]

    def hook(name: str, x: torch.Tensor) -> None:
        if any(name in st for st in order):
            return
        if x is last[0] and order:
            order[-1].append(name)
        else:
            order.append([name])
        last[0] = x

    handles = [block.linears[n].register_forward_pre_hook(lambda m, a, _n=n: hook(_n, a[0])) for n in names]
    try:
        with torch.inference_mode():
            args, kwargs = block.item(0)
            block.module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    seen = {n for st in order for n in st}
    return order + [[n] for n in names if n not in seen]


class HessianSum:
    """Running ``sum x x^T`` (fp32, K x K) and token count of one linear's inputs.

    Only the upper triangle is computed, a band of ``TRIANGLE_BAND`` rows at a time
    (about 2/3 of the FLOPs of the full product for K = 1536, the largest cost of GPTQ's
    statistics); :meth:`mean` mirrors it, so the result is exactly symmetric."""

    TRIANGLE_BAND = 256

    def __init__(self):
        self.h: Optional[torch.Tensor] = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        k, band = x2.shape[-1], self.TRIANGLE_BAND
        if self.h is None:
            self.h = torch.zeros(k, k)
        for i in range(0, k, band):
            self.h[i : i + band, i:].addmm_(x2[:, i : i + band].t(), x2[:, i:])
        self.tokens += x2.shape[0]

    def mean(self) -> torch.Tensor:
        upper = torch.triu(self.h)
        return (upper + torch.triu(self.h, 1).t()) / max(self.tokens, 1)


def stage_hessians(names: list[str], act_scales: Optional[dict] = None):
    """``(add, result)`` for linears that read one input tensor (a stage): ``add(x)`` per
    input, ``result()`` the Hessian of each (one ``X^T X`` shared by those without an
    act_scale; each act_scale'd one from its own divided input)."""
    act_scales = act_scales or {}
    shared = HessianSum()
    own = {n: HessianSum() for n in names if n in act_scales}

    def add(x: torch.Tensor) -> None:
        if len(own) < len(names):
            shared.add(x)
        for n, acc in own.items():
            acc.add(x.reshape(-1, x.shape[-1]).float() / act_scales[n])

    def result() -> dict[str, torch.Tensor]:
        return _means({n: own.get(n, shared) for n in names})

    return add, result


def hessians(block, names: list[str], act_scales: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """``H = mean over tokens of x x^T`` (fp32, K x K) of each linear's input, ``x`` divided
    by its act_scale where one is given."""
    act_scales = act_scales or {}
    acc: dict[int, HessianSum] = {}
    shared = _Shared(lambda slot, x: acc.setdefault(slot, HessianSum()).add(x))
    own = {n: HessianSum() for n in names if n in act_scales}
    hooks = {
        n: (lambda _n, x, _acc=own[n], _s=act_scales[n]: _acc.add(x.reshape(-1, x.shape[-1]).float() / _s)) if n in own else shared
        for n in names
    }
    block.run(hooks, keep=False)
    shared.release()
    return _means({n: own[n] if n in own else acc[shared.key[n]] for n in names})


def _means(sums: dict[str, HessianSum]) -> dict[str, torch.Tensor]:
    """Each name's Hessian; names sharing one sum share one tensor (GPTQ stacks their rows)."""
    done: dict[int, torch.Tensor] = {}
    for name, acc in sums.items():
        if acc.h is None:
            raise ValueError(f"{name}: no calibration input reached this linear; check that the calibration items run it")
        if id(acc) not in done:
            done[id(acc)] = acc.mean()
    return {n: done[id(acc)] for n, acc in sums.items()}


def input_stats(
    block, names: list[str], max_tokens: int = 4096, seed: int = 0, outputs: Optional[list] = None,
    release_inputs: bool = False,
) -> dict[str, dict]:
    """Per linear: ``mean_abs`` and ``amax`` (K,) of its input, and ``sample``: up to
    ``max_tokens`` input rows drawn evenly from every calibration item. Linears reading one
    input tensor (q/k/v, gate/up) share its statistics and its sample (computed once).
    ``outputs``: a list to receive the block's outputs (it then runs whole, not only up to
    its last target linear); ``release_inputs``: see :meth:`~.sequential.Block.run`."""
    per_item = max(1, max_tokens // max(1, len(block.inputs)))
    slots: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(seed)

    def update(slot: int, x2: torch.Tensor) -> None:
        x2 = x2.float()
        st = slots.setdefault(slot, {"sum": None, "amax": None, "n": 0, "rows": []})
        a = x2.abs()
        s, m = a.sum(0), a.amax(0)
        st["sum"] = s if st["sum"] is None else st["sum"] + s
        st["amax"] = m if st["amax"] is None else torch.maximum(st["amax"], m)
        st["n"] += x2.shape[0]
        idx = torch.randperm(x2.shape[0], generator=gen)[:per_item]
        st["rows"].append(x2[idx].clone())

    shared = _Shared(update)
    outs = block.run({n: shared for n in names}, keep=outputs is not None, release_inputs=release_inputs)
    if outputs is not None:
        outputs.extend(outs)
    shared.release()
    done = {
        slot: {"mean_abs": (st["sum"] / st["n"]).clone(), "amax": st["amax"].clone(), "sample": torch.cat(st["rows"]).clone()}
        for slot, st in slots.items()
    }
    for n in names:
        if n not in shared.key:
            raise ValueError(f"{n}: no calibration input reached this linear; check that the calibration items run it")
    return {n: done[shared.key[n]] for n in names}
