"""Affine integer quantization in plain PyTorch: choose qparams, quantize, dequantize.

Everything here is the numerical definition of torchq's integer formats; kernels and
tensor classes are checked against it. Granularity is expressed as a ``block_size`` tuple
with one entry per dimension of the input (torchao's convention):

* per-tensor:  ``block_size == x.shape``
* per-channel: ``(1, K)`` for a ``(N, K)`` weight
* per-group:   ``(1, group_size)`` (groups run along the input dimension K)
* per-token:   ``(1, ..., 1, K)`` for activations

Three zero-point domains:

* ``NONE``  (symmetric):  ``w = q * s``,  ``s = amax / ((qmax - qmin) / 2)``
* ``INT``   (asymmetric): ``w = (q - z) * s`` with integer ``z`` in ``[qmin, qmax]``; the
  range is widened to include 0 so that ``z`` always fits and 0 is exact.
* ``FLOAT`` (asymmetric): ``w = q * s + m`` with a float offset ``m`` (GGUF Q4_1 and aten
  tinygemm convention); the range is exactly ``[min, max]`` of the block.

Rounding is round-half-to-even (``torch.round``). Scales are fp32.
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

__all__ = [
    "ZeroPointDomain",
    "quant_range",
    "choose_qparams_affine",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize_affine",
    "block_size_for",
]


class ZeroPointDomain(str, enum.Enum):
    """How the zero point of an affine format is expressed (see module docstring)."""

    NONE = "none"
    INT = "int"
    FLOAT = "float"


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range used for ``bits``-wide codes.

    Symmetric formats use the signed range, except 8 bit which uses the narrow
    ``[-127, 127]`` so that ``s = amax / 127`` maps both signs exactly (the same rule as
    dynamic int8 activations). Asymmetric formats use ``[0, 2**bits - 1]``, except 8 bit
    which uses ``[-128, 127]`` so codes still fit in int8 storage.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if symmetric:
        if bits == 8:
            return -127, 127
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if bits == 8:
        return -128, 127
    return 0, 2**bits - 1


def block_size_for(shape: Sequence[int], granularity: str, group_size: Optional[int] = None) -> tuple[int, ...]:
    """Block size tuple for a named granularity: per_tensor, per_channel, per_group, per_token."""
    shape = tuple(int(s) for s in shape)
    if granularity == "per_tensor":
        return shape
    if granularity in ("per_channel", "per_token"):
        return (1,) * (len(shape) - 1) + (shape[-1],)
    if granularity == "per_group":
        if group_size is None:
            raise ValueError("per_group granularity needs group_size")
        return (1,) * (len(shape) - 1) + (int(group_size),)
    raise ValueError(f"unknown granularity {granularity!r}; use per_tensor, per_channel, per_group or per_token")


def _blocked(x: torch.Tensor, block_size: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``x`` as (n0, b0, n1, b1, ...) and return it with the reduced (block-grid) shape."""
    if len(block_size) != x.dim():
        raise ValueError(f"block_size {tuple(block_size)} must have one entry per dim of shape {tuple(x.shape)}")
    split: list[int] = []
    grid: list[int] = []
    for size, b in zip(x.shape, block_size):
        if b <= 0 or size % b != 0:
            raise ValueError(
                f"dimension of size {size} is not a multiple of block size {b} "
                f"(shape {tuple(x.shape)}, block_size {tuple(block_size)}); pad the tensor first"
            )
        split += [size // b, b]
        grid.append(size // b)
    return x.reshape(split), tuple(grid)


def _reduce_blocks(x: torch.Tensor, block_size: Sequence[int], op: str) -> torch.Tensor:
    xb, grid = _blocked(x, block_size)
    dims = tuple(range(1, xb.dim(), 2))
    if op == "amax":
        out = xb.abs().amax(dim=dims)
    elif op == "min":
        out = xb.amin(dim=dims)
    else:
        out = xb.amax(dim=dims)
    return out.reshape(grid)


def _per_block(p: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """View a block-grid tensor so it broadcasts against the (n0, b0, n1, b1, ...) view."""
    return p.float().reshape([d for g in grid for d in (g, 1)])


def _check_floating(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor to quantize, got dtype {x.dtype}")


def _check_stats_finite(x: torch.Tensor, *stats: torch.Tensor) -> None:
    """NaN/Inf in a block always reach its min/max/amax, so checking those costs no extra
    pass over the weight."""
    if x.device.type == "meta":  # shapes only (skeleton models): nothing to check
        return
    if not all(bool(torch.isfinite(st).all()) for st in stats):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"tensor contains {bad} NaN/Inf value(s); quantization needs finite values, clean the weights first")


def choose_qparams_affine(
    x: torch.Tensor,
    block_size: Sequence[int],
    quant_min: int,
    quant_max: int,
    zero_point_domain: ZeroPointDomain,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (fp32) and zero point per block. Zero point: None, int8 (INT) or fp32 (FLOAT)."""
    _check_floating(x)
    zero_point_domain = ZeroPointDomain(zero_point_domain)
    xf = x.float()
    levels = float(quant_max - quant_min)
    if zero_point_domain is ZeroPointDomain.NONE:
        amax = _reduce_blocks(xf, block_size, "amax")
        _check_stats_finite(xf, amax)
        scale = amax / (levels / 2)
        return torch.where(scale == 0, torch.ones_like(scale), scale), None
    mn = _reduce_blocks(xf, block_size, "min")
    mx = _reduce_blocks(xf, block_size, "max")
    _check_stats_finite(xf, mn, mx)
    if zero_point_domain is ZeroPointDomain.INT:
        mn = torch.clamp(mn, max=0.0)
        mx = torch.clamp(mx, min=0.0)
        scale = (mx - mn) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(quant_min - torch.round(mn / scale), quant_min, quant_max)
        return scale, zero.to(torch.int8)
    scale = (mx - mn) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    offset = mn - quant_min * scale
    return scale, offset


def quantize_affine(
    x: torch.Tensor,
    block_size: Sequence[int],
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    quant_min: int,
    quant_max: int,
    zero_point_domain: ZeroPointDomain,
) -> torch.Tensor:
    """Integer codes (int8 storage) for ``x`` given its qparams."""
    zero_point_domain = ZeroPointDomain(zero_point_domain)
    xb, grid = _blocked(x.float(), block_size)
    s = _per_block(scale, grid)
    if zero_point_domain is ZeroPointDomain.NONE:
        q = torch.round(xb / s)
    elif zero_point_domain is ZeroPointDomain.INT:
        q = torch.round(xb / s).add_(_per_block(zero_point, grid))
    else:
        q = torch.round((xb - _per_block(zero_point, grid)) / s)
    return q.clamp_(quant_min, quant_max).to(torch.int8).reshape(x.shape)


def dequantize_affine(
    q: torch.Tensor,
    block_size: Sequence[int],
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    zero_point_domain: ZeroPointDomain,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float values of integer codes ``q``; computed in fp32, then cast to ``output_dtype``."""
    zero_point_domain = ZeroPointDomain(zero_point_domain)
    qb, grid = _blocked(q.float(), block_size)
    s = _per_block(scale, grid)
    if zero_point_domain is ZeroPointDomain.NONE:
        w = qb * s
    elif zero_point_domain is ZeroPointDomain.INT:
        w = (qb - _per_block(zero_point, grid)) * s
    else:
        w = qb * s + _per_block(zero_point, grid)
    return w.reshape(q.shape).to(output_dtype)


def fake_quantize_affine(
    x: torch.Tensor,
    block_size: Sequence[int],
    bits: int,
    symmetric: bool,
    zero_point_domain: Optional[ZeroPointDomain] = None,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (same dtype out): the reference for accuracy studies."""
    if zero_point_domain is None:
        zero_point_domain = ZeroPointDomain.NONE if symmetric else ZeroPointDomain.INT
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero = choose_qparams_affine(x, block_size, qmin, qmax, zero_point_domain)
    q = quantize_affine(x, block_size, scale, zero, qmin, qmax, zero_point_domain)
    return dequantize_affine(q, block_size, scale, zero, zero_point_domain, x.dtype)
