"""Linear kernels for quantized weights: the registry and the plain-PyTorch references."""

from . import reference  # noqa: F401  (registers the reference kernels)
from . import codebook_reference  # noqa: F401  (nf4 / fp4 reference kernels)
from .registry import LinearKernel, get_kernel, kernels_for, prefer_kernels, register_kernel, select_kernel

__all__ = ["LinearKernel", "get_kernel", "kernels_for", "prefer_kernels", "register_kernel", "select_kernel"]
