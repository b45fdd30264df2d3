"""Linear kernels for quantized weights: the registry, the plain-PyTorch references and the
C++ CPU kernels (``torch.ops.torchq``, see :mod:`torchq.kernels.cpu_ext`)."""

from . import reference  # noqa: F401  (registers the reference kernels)
from . import codebook_reference  # noqa: F401  (nf4 / fp4 reference kernels)
from . import cpu_kernels  # noqa: F401  (registers the C++ CPU kernels; built on first use)
from . import cpu_codebook4  # noqa: F401  (the C++ NF4 / FP4 kernel)
from .registry import LinearKernel, get_kernel, kernels_for, prefer_kernels, register_kernel, select_kernel

__all__ = ["LinearKernel", "get_kernel", "kernels_for", "prefer_kernels", "register_kernel", "select_kernel"]
