"""Quantized weight tensor classes."""

from .affine_quantized import AffineQuantizedTensor
from .base import TorchqTensor
from .layouts import Layout, get_layout, layout_names, register_layout

__all__ = ["AffineQuantizedTensor", "TorchqTensor", "Layout", "get_layout", "layout_names", "register_layout"]
