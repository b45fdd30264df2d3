"""In-place initialization of quantized weights: ``normal_``, ``uniform_``, ``zero_``, ``fill_``.

Initialization code (``nn.Linear.reset_parameters``, transformers' ``_init_weights`` after
``to_empty``) writes random or constant values into weights in place. For a quantized
weight that means: draw the float values, quantize them in the weight's own format
(scheme, bits, group size, zero-point domain) and copy the codes and scales in. The tensor
stays quantized and of the same format; nothing is silently dequantized. Intel's extension
crashed here ("normal_" not implemented for int8 storage).

``weight[i]`` (transformers zeroes an embedding's padding row with
``init.zeros_(weight[padding_idx])``) returns a write-only row handle: in-place writes
quantize the new row and store it in the parent, leaving every other row's codes as they
were (affine formats quantize rows independently). Reading a row this way is refused:
``weight.dequantize()[i]`` is the explicit spelling.

Weights with an input permutation or activation scales (GPTQ act-order, AWQ) have no
meaningful "random" state and refuse, naming the problem.
"""

from __future__ import annotations

from typing import Callable

import torch

from torchq.formats.affine.tensor import AffineQuantizedTensor

__all__ = ["requantize_into", "write_row"]

aten = torch.ops.aten
_ROW_FIELDS = ("qdata", "scale", "zero_point")


def _quantize_like(dst: AffineQuantizedTensor, values: torch.Tensor) -> AffineQuantizedTensor:
    """``values`` (2-D, K columns) quantized in ``dst``'s format."""
    if dst.perm is not None or dst.act_scale is not None:
        raise NotImplementedError(
            "cannot write new values into a quantized weight with perm / act_scale (GPTQ act-order, AWQ): "
            "its format depends on calibration; dequantize it or rebuild it from float"
        )
    domain = dst.zero_point_domain
    src = AffineQuantizedTensor.from_float(
        values.to(dst.dtype),
        scheme=dst.scheme,
        bits=dst.bits,
        group_size=dst.group_size,
        symmetric=domain == "none",
        zero_point_domain=domain,
    )
    if (dst.quant_min, dst.quant_max) != (src.quant_min, src.quant_max):
        raise NotImplementedError(
            f"this weight's code range [{dst.quant_min}, {dst.quant_max}] is not the one torchq quantizes to "
            f"([{src.quant_min}, {src.quant_max}]); cannot write new values into it"
        )
    return src


def requantize_into(dst: AffineQuantizedTensor, values: torch.Tensor) -> AffineQuantizedTensor:
    """Quantize float ``values`` (shape of ``dst``) in ``dst``'s format and copy them into ``dst``."""
    if tuple(values.shape) != tuple(dst.shape):
        raise ValueError(f"values of shape {tuple(values.shape)} do not fit a quantized weight of shape {tuple(dst.shape)}")
    dst.copy_(_quantize_like(dst, values))
    return dst


def write_row(dst: AffineQuantizedTensor, index: int, values: torch.Tensor) -> None:
    """Quantize ``values`` (K,) in ``dst``'s format into row ``index``; other rows keep their codes."""
    if tuple(values.shape) != (dst.shape[1],):
        raise ValueError(f"a row of a {tuple(dst.shape)} weight has shape ({dst.shape[1]},), got {tuple(values.shape)}")
    row = _quantize_like(dst, values.reshape(1, -1)).canonical_tensors()
    canon = {n: (t.clone() if t is not None else None) for n, t in dst.canonical_tensors().items()}
    for name in _ROW_FIELDS:
        if canon[name] is not None:
            canon[name][index] = row[name][0]
    meta = {n: getattr(dst, n) for n in dst.meta_fields if n not in ("quant_layout", "kernel")}
    dst.copy_(AffineQuantizedTensor.from_canonical(canon, outer_shape=tuple(dst.shape), outer_dtype=dst.dtype, **meta))


class QuantizedRowWriter(torch.Tensor):
    """``weight[i]`` of a quantized weight: accepts in-place writes only (see module doc)."""

    @staticmethod
    def __new__(cls, parent: AffineQuantizedTensor, index: int):
        return torch.Tensor._make_wrapper_subclass(cls, (parent.shape[1],), dtype=parent.dtype, device=parent.device)

    def __init__(self, parent: AffineQuantizedTensor, index: int):
        self.parent = parent
        self.index = index

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"QuantizedRowWriter(row {self.index} of a {tuple(self.parent.shape)} quantized weight)"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        make = _VALUES.get(func)
        if make is None and func is aten.copy_.default and isinstance(args[0], cls):
            make = lambda row, src, non_blocking=False: src.detach().float().expand(row.shape)  # noqa: E731
        if make is None or not isinstance(args[0], cls):
            raise NotImplementedError(
                f"a row of a quantized weight only takes in-place writes (zero_, fill_, normal_, uniform_, copy_), "
                f"not {func}; read rows with weight.dequantize()[i]"
            )
        row = args[0]
        write_row(row.parent, row.index, make(row, *args[1:], **kwargs))
        return row


def _float_like(t: torch.Tensor) -> torch.Tensor:
    device = t.parent.qdata.device if isinstance(t, QuantizedRowWriter) else t.qdata.device
    return torch.empty(tuple(t.shape), dtype=torch.float32, device=device)


def _normal(t, mean=0.0, std=1.0, *, generator=None):
    return _float_like(t).normal_(mean, std, generator=generator)


def _uniform(t, *bounds, generator=None, **named):
    low = bounds[0] if len(bounds) > 0 else named.get("from", 0.0)
    high = bounds[1] if len(bounds) > 1 else named.get("to", 1.0)
    return _float_like(t).uniform_(low, high, generator=generator)


def _zero(t):
    return _float_like(t).zero_()


def _fill(t, value):
    return _float_like(t).fill_(value)


_VALUES: dict = {
    aten.normal_.default: _normal,
    aten.uniform_.default: _uniform,
    aten.zero_.default: _zero,
    aten.fill_.Scalar: _fill,
}


def _register(op, make_values: Callable[..., torch.Tensor]) -> None:
    def impl(func, types, args, kwargs):
        return requantize_into(args[0], make_values(args[0], *args[1:], **kwargs))

    AffineQuantizedTensor.implements(op)(impl)


for _op, _fn in _VALUES.items():
    _register(_op, _fn)


@AffineQuantizedTensor.implements(aten.select.int)
def _select(func, types, args, kwargs):
    self, dim, index = args[0], args[1], args[2]
    if dim % 2 != 0:
        raise NotImplementedError("selecting an input column of a quantized weight is not supported; dequantize() first")
    n = self.shape[0]
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a quantized weight with {n} rows")
    return QuantizedRowWriter(self, index % n)
