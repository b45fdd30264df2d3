"""Linear kernels for quantized weights: the C++ CPU kernels (``torch.ops.torchq``, see
:mod:`torchq.kernels.cpu_ext`), registered into :mod:`torchq.formats.dispatch` next to each
format's plain-PyTorch reference (``torchq/formats/<format>/reference.py``)."""

from torchq.formats.affine import reference as _affine_reference  # noqa: F401  (reference kernels first)
from torchq.formats.codebook4 import reference as _codebook4_reference  # noqa: F401
from torchq.kernels import cpu_kernels  # noqa: F401  (registers the C++ CPU kernels; built on first use)
from torchq.kernels import cpu_codebook4  # noqa: F401  (the C++ NF4 / FP4 kernel)
from torchq.formats.dispatch import (
    LinearKernel,
    get_kernel,
    kernels_for,
    prefer_kernels,
    register_kernel,
    select_kernel,
)

__all__ = ["LinearKernel", "get_kernel", "kernels_for", "prefer_kernels", "register_kernel", "select_kernel"]
