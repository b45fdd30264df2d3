"""What a quantized weight is: the tensor subclasses, their storage layouts, the kernel
dispatch table they consult and the checkpoint container.

One folder per format holds that format's whole Python story:

* ``affine/``: integer codes with scales and zero points (int8, int4, intx, W8A8, W4A8):
  ``tensor.py``, ``config.py``, ``handler.py``, ``reference.py`` (the plain-PyTorch kernel);
* ``codebook4/``: 4-bit codes into a 16-entry table (NF4, FP4, registered codebooks), the
  same four modules.

Shared here: ``base.py`` (:class:`TorchqTensor`), ``common.py``, ``layouts.py``,
``dispatch.py`` (which kernel computes ``F.linear``) and ``serialization.py``.
"""

from torchq.formats.affine import (  # noqa: F401  (in-place init ops on quantized weights)
    init_ops as _init_ops,
)
from torchq.formats.affine.tensor import AffineQuantizedTensor
from torchq.formats.base import TorchqTensor
from torchq.formats.codebook4.tensor import Codebook4Tensor
from torchq.formats.layouts import Layout, get_layout, layout_names, register_layout

__all__ = ["AffineQuantizedTensor", "Codebook4Tensor", "TorchqTensor", "Layout", "get_layout", "layout_names", "register_layout"]
