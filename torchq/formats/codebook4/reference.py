"""Reference linear kernels for the 4-bit codebook schemes (``nf4``, ``fp4_e2m1``,
``fp4_e2m1_bnb`` and any :func:`~torchq.primitives.codebook.register_codebook` format): ``y = x @ dequantize(W)^T + bias`` in fp32, cast to ``x.dtype``
(:func:`torchq.formats.affine.reference.weight_only_reference`). Fast kernels for these schemes
are tested against it."""

from __future__ import annotations

from torchq.primitives.codebook import on_codebook_registered
from torchq.formats.affine.reference import weight_only_reference
from torchq.formats.dispatch import LinearKernel, register_kernel

__all__: list[str] = []


def _register(scheme: str) -> None:
    register_kernel(
        LinearKernel(
            name=f"reference.{scheme}",
            scheme=scheme,
            layout="codebook4_packed",
            linear=weight_only_reference,
            numerics="fp32 table lookup dequantize + fp32 matmul (plain PyTorch)",
        )
    )


on_codebook_registered(_register)  # nf4, fp4_e2m1, fp4_e2m1_bnb and every registered codebook
