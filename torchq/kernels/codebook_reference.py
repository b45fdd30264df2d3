"""Reference linear kernels for the 4-bit codebook schemes (``nf4``, ``fp4_e2m1``,
``fp4_e2m1_bnb``): ``y = x @ dequantize(W)^T + bias`` in fp32, cast to ``x.dtype``
(:func:`torchq.kernels.reference.weight_only_reference`). Fast kernels for these schemes
are tested against it."""

from __future__ import annotations

from ..primitives.codebook import CODEBOOK_FORMATS
from .reference import weight_only_reference
from .registry import LinearKernel, register_kernel

__all__ = ["CODEBOOK_SCHEMES"]

CODEBOOK_SCHEMES = tuple(sorted(CODEBOOK_FORMATS))

for _scheme in CODEBOOK_SCHEMES:
    register_kernel(
        LinearKernel(
            name=f"reference.{_scheme}",
            scheme=_scheme,
            layout="codebook4_packed",
            linear=weight_only_reference,
            numerics="fp32 table lookup dequantize + fp32 matmul (plain PyTorch)",
        )
    )
