"""Quantized weight tensor classes."""

from .affine_quantized import AffineQuantizedTensor
from .base import TorchqTensor
from .codebook4 import Codebook4Tensor
from .layouts import Layout, get_layout, layout_names, register_layout

__all__ = ["AffineQuantizedTensor", "Codebook4Tensor", "TorchqTensor", "Layout", "get_layout", "layout_names", "register_layout"]
