"""Activation statistics gathered while a block runs on its calibration inputs.

Linears that read the very same input tensor (q/k/v, gate/up) share one accumulator, so
the costly ``X^T X`` of GPTQ is computed once per distinct input.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["hessians", "input_stats", "input_stages"]


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
            args, kwargs = block.inputs[0]
            block.module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    seen = {n for st in order for n in st}
    return order + [[n] for n in names if n not in seen]


def hessians(block, names: list[str], act_scales: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """``H = mean over tokens of x x^T`` (fp32, K x K) of each linear's input, ``x`` divided
    by its act_scale where one is given."""
    act_scales = act_scales or {}
    acc: dict[int, list] = {}

    def update(slot: int, x: torch.Tensor) -> None:
        a = acc.setdefault(slot, [torch.zeros(x.shape[-1], x.shape[-1]), 0])
        xf = x.float()
        a[0].addmm_(xf.t(), xf)
        a[1] += xf.shape[0]

    shared = _Shared(update)
    hooks = {}
    for n in names:
        if n in act_scales:  # distinct input after division: its own accumulator
            s = act_scales[n]
            own: dict = {}
            hooks[n] = lambda _n, x, _s=s, _own=own: _acc_own(_own, x.reshape(-1, x.shape[-1]).float() / _s)
            hooks[n].own = own
        else:
            hooks[n] = shared
    block.run(hooks, keep=False)
    shared.release()
    out = {}
    for n in names:
        if n in act_scales:
            h, cnt = hooks[n].own["h"], hooks[n].own["n"]
        else:
            h, cnt = acc[shared.key[n]]
        out[n] = (h / max(cnt, 1)).clone()
    return out


def _acc_own(own: dict, x: torch.Tensor) -> None:
    if "h" not in own:
        own["h"], own["n"] = torch.zeros(x.shape[-1], x.shape[-1]), 0
    own["h"].addmm_(x.t(), x)
    own["n"] += x.shape[0]


def input_stats(block, names: list[str], max_tokens: int = 4096, seed: int = 0) -> dict[str, dict]:
    """Per linear: ``mean_abs`` and ``amax`` (K,) of its input, and ``sample``: up to
    ``max_tokens`` input rows drawn evenly from every calibration item."""
    per_item = max(1, max_tokens // max(1, len(block.inputs)))
    stats: dict[str, dict] = {n: {"sum": None, "amax": None, "n": 0, "rows": []} for n in names}
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        st = stats[name]
        s, m = x2.abs().sum(0), x2.abs().amax(0)
        st["sum"] = s if st["sum"] is None else st["sum"] + s
        st["amax"] = m if st["amax"] is None else torch.maximum(st["amax"], m)
        st["n"] += x2.shape[0]
        idx = torch.randperm(x2.shape[0], generator=gen)[:per_item]
        st["rows"].append(x2[idx].clone())

    block.run({n: hook for n in names}, keep=False)
    return {
        n: {"mean_abs": (st["sum"] / st["n"]).clone(), "amax": st["amax"].clone(), "sample": torch.cat(st["rows"]).clone()}
        for n, st in stats.items()
    }


