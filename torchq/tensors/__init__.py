"""Quantized weight tensor classes."""

from . import affine_init  # noqa: F401  (in-place init ops on quantized weights)
from .affine_quantized import AffineQuantizedTensor
from .base import TorchqTensor
from .codebook4 import Codebook4Tensor
from .layouts import Layout, get_layout, layout_names, register_layout

__all__ = ["AffineQuantizedTensor", "Codebook4Tensor", "TorchqTensor", "Layout", "get_layout", "layout_names", "register_layout"]
