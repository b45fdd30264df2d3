"""Helpers shared by quantized weight classes (format-independent pieces of the tensor contract).

A class using them provides ``format_signature()``, ``canonical_tensors()``,
``quant_layout`` and the declarative field lists of :class:`~torchq.formats.base.TorchqTensor`.
"""

from __future__ import annotations

from typing import Any

import torch

from torchq.formats.base import TorchqTensor
from torchq.formats.layouts import get_layout

__all__ = [
    "slice_bounds",
    "copy_same_format",
    "embedding_arguments",
    "inner_nbytes",
    "checkpoint_header",
    "check_checkpoint_header",
    "has_values",
]


def slice_bounds(args, shape: tuple[int, int]) -> tuple[int, int, int]:
    """``(dim, start, end)`` of an ``aten.slice.Tensor`` call on a 2-D weight, clamped like
    Python slicing; ``step != 1`` raises."""
    defaults = [None, 0, None, None, 1]
    _, dim, start, end, step = list(args) + defaults[len(args) :]
    if step != 1:
        raise NotImplementedError("slicing a quantized weight with step != 1 is not supported")
    dim = dim % 2
    size = shape[dim]
    start = 0 if start is None else min(max(start + size if start < 0 else start, 0), size)
    end = size if end is None else min(max(end + size if end < 0 else end, 0), size)
    return dim, start, end


def copy_same_format(dst: Any, src: Any, cls: type) -> Any:
    """``dst.copy_(src)`` for two tensors of ``cls`` holding the same format (checkpoint
    loading into an already quantized model); anything else raises naming the fix."""
    if not isinstance(dst, cls):
        raise TypeError(
            f"cannot copy a quantized tensor {tuple(src.shape)} into a float tensor: load the checkpoint with "
            "load_state_dict(..., assign=True), or quantize the model the same way before loading"
        )
    if not isinstance(src, cls):
        what = type(src).__name__ if isinstance(src, TorchqTensor) else "float tensor"
        raise TypeError(
            f"cannot copy a {what} {tuple(src.shape)} into a {cls.__name__} {tuple(dst.shape)}: quantize the float "
            "model after loading it, quantize it with the checkpoint's config first, or load with assign=True"
        )
    a, b = dst.format_signature(), src.format_signature()
    if a != b:
        diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        raise ValueError(
            "quantized formats differ (model vs checkpoint): "
            + ", ".join(f"{k}: {v[0]} vs {v[1]}" for k, v in diff.items())
        )
    incoming = get_layout(dst.quant_layout).to_layout(src.canonical_tensors())
    for name in dst.tensor_fields + dst.optional_tensor_fields:
        target = getattr(dst, name)
        if target is not None:
            target.copy_(incoming[name])
    return dst


def embedding_arguments(args, kwargs) -> tuple[torch.Tensor, Any]:
    """``(indices, weight)`` of an ``F.embedding`` call; options that would change the
    quantized rows (``max_norm``) raise."""
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("max_norm") is not None:
        raise NotImplementedError("F.embedding with max_norm would renormalize quantized rows in place; not supported")
    return bound["input"], bound["weight"]


def inner_nbytes(t: TorchqTensor) -> int:
    """Bytes of every inner tensor of ``t`` (codes, scales, extras)."""
    total = 0
    for name in t.tensor_fields + t.optional_tensor_fields:
        v = getattr(t, name)
        if v is not None:
            total += v.numel() * v.element_size()
    return total


def checkpoint_header(t: TorchqTensor, format_name: str, version: int) -> dict[str, Any]:
    """Format name, version, outer shape and dtype: the first entries of a checkpoint state."""
    return {
        "format": format_name,
        "version": version,
        "shape": tuple(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
    }


def check_checkpoint_header(state: dict[str, Any], format_name: str, version: int) -> None:
    if state.get("format") != format_name:
        raise ValueError(f"not a {format_name} tensor: format {state.get('format')!r}")
    if state.get("version") != version:
        raise ValueError(
            f"{format_name} tensor format version {state.get('version')} is not supported by this torchq "
            f"(reads version {version}); upgrade torchq"
        )


def has_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real data to inspect (not a meta or fake tensor of a skeleton or a
    torch.compile trace): value checks of a checkpoint run only then."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type != "meta" and not isinstance(t, FakeTensor)
