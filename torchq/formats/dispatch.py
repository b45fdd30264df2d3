"""Kernel registry: which function computes ``F.linear`` for a quantized weight.

Kernels are registered per *scheme* (``int4_weight_only``, ``w8a8``, ...) and consume one
storage *layout*. When a quantized weight is built (quantize time, load time, ``.to``),
:func:`select_kernel` picks the highest-priority kernel of its scheme that is available on
this machine and accepts the weight; the choice is stored on the tensor (``kernel``
field), so it is explicit and queryable (``torchq.explain``). Every scheme has a
``reference`` kernel in plain PyTorch that the fast ones are tested against.

Forcing a choice: the environment variable ``TORCHQ_KERNEL=reference`` (read at selection
time) or the :func:`prefer_kernels` context manager.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = [
    "LinearKernel",
    "register_kernel",
    "select_kernel",
    "get_kernel",
    "kernels_for",
    "prefer_kernels",
]


def _always(*_: Any) -> bool:
    return True


@dataclass(frozen=True)
class LinearKernel:
    """One implementation of ``y = x @ W^T + bias`` for a quantized ``W``.

    ``linear(x, weight, bias)`` receives the quantized weight tensor (already in
    ``layout``) and returns a tensor of ``x.dtype``. ``accepts(weight_meta)`` may refuse a
    weight (e.g. an unsupported group size); ``available()`` says whether the kernel can
    run on this machine at all (e.g. the C++ extension built). ``numerics`` documents the
    arithmetic on every host; ``arithmetic(weight)`` says which of it runs here and now.
    """

    name: str
    scheme: str
    layout: str
    linear: Callable[..., torch.Tensor]
    priority: int = 0
    available: Callable[[], bool] = _always
    accepts: Callable[[Any], bool] = _always
    numerics: str = "fp32 accumulate"
    extra: dict = field(default_factory=dict, compare=False)
    #: ``arithmetic(weight) -> str``: what a call computes in *now* (this CPU's ISA path and
    #: the current precision setting), for activations of the weight's dtype (torchq.explain)
    arithmetic: Callable[[Any], str] = field(default=lambda _w: "fp32", compare=False)


_KERNELS: dict[str, dict[str, LinearKernel]] = {}
_BY_NAME: dict[str, LinearKernel] = {}  # flat index: get_kernel runs on every linear call
_PREFERRED: list[Optional[str]] = [None]


def register_kernel(kernel: LinearKernel) -> LinearKernel:
    """Add a kernel; a second registration with the same name replaces the first."""
    _KERNELS.setdefault(kernel.scheme, {})[kernel.name] = kernel
    _BY_NAME[kernel.name] = kernel
    return kernel


def kernels_for(scheme: str) -> list[LinearKernel]:
    """Registered kernels of ``scheme``, best first."""
    return sorted(_KERNELS.get(scheme, {}).values(), key=lambda k: -k.priority)


def get_kernel(name: str) -> LinearKernel:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no kernel named {name!r}; registered: {sorted(_BY_NAME)}") from None


def _preference() -> Optional[str]:
    return _PREFERRED[-1] or os.environ.get("TORCHQ_KERNEL") or None


@contextlib.contextmanager
def prefer_kernels(name: str) -> Iterator[None]:
    """Within the block, weights built (quantized, loaded, moved) use kernels whose name
    contains ``name`` when one fits (e.g. ``"reference"``)."""
    _PREFERRED.append(name)
    try:
        yield
    finally:
        _PREFERRED.pop()


def select_kernel(scheme: str, weight_meta: Any) -> LinearKernel:
    """The kernel a weight of ``scheme`` described by ``weight_meta`` will run."""
    candidates = [k for k in kernels_for(scheme) if k.available() and k.accepts(weight_meta)]
    if not candidates:
        raise NotImplementedError(f"no kernel registered for scheme {scheme!r} accepts this weight")
    pref = _preference()
    if pref:
        preferred = [k for k in candidates if pref in k.name]
        if preferred:
            return preferred[0]
    return candidates[0]
