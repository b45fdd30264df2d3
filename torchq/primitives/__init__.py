"""Numerical definitions of torchq's formats, in plain PyTorch (the source of truth)."""

from torchq.primitives.activation import (
    fake_quantize_per_token_int8,
    quantize_per_token_int8,
    quantize_per_token_uint8,
)
from torchq.primitives.affine import (
    ZeroPointDomain,
    block_size_for,
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    quant_range,
    quantize_affine,
)
from torchq.primitives.packing import pack_int4, unpack_int4

__all__ = [
    "ZeroPointDomain",
    "block_size_for",
    "choose_qparams_affine",
    "dequantize_affine",
    "fake_quantize_affine",
    "quant_range",
    "quantize_affine",
    "pack_int4",
    "unpack_int4",
    "quantize_per_token_int8",
    "quantize_per_token_uint8",
    "fake_quantize_per_token_int8",
]
