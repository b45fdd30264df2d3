"""Fake (meta) implementations of the ``torch.ops.torchq`` CPU kernels.

They give output shapes and dtypes without computing, so ``torch.compile(fullgraph=True)``
keeps the C++ ops in the graph. Imported by :mod:`torchq.kernels.cpu_ext` right after the
library is loaded (the schemas are defined in C++ with ``TORCH_LIBRARY``).
"""

from __future__ import annotations

import torch

__all__: list[str] = []


def _linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("torchq::int4_linear")
def _int4_linear(x, qdata, scale, zero_point, bias, group_size, quant_min):
    return _linear_out(x, scale.shape[0])


@torch.library.register_fake("torchq::int8_linear")
def _int8_linear(x, qdata, scale, zero_point, bias, group_size):
    return _linear_out(x, scale.shape[0])


@torch.library.register_fake("torchq::w4a8_linear")
def _w4a8_linear(x, qdata, scale, zero_point, bias, group_size, quant_min):
    return _linear_out(x, scale.shape[0])


@torch.library.register_fake("torchq::w8a8_linear")
def _w8a8_linear(x, qdata, scale, bias):
    return _linear_out(x, scale.shape[0])


def _rows(x: torch.Tensor):
    m = 1
    for s in x.shape[:-1]:
        m = m * s
    return m


@torch.library.register_fake("torchq::w4a8_int_acc")
def _w4a8_int_acc(x, qdata, scale, zero_point, group_size, quant_min):
    return x.new_empty((_rows(x), scale.shape[0], scale.shape[1]), dtype=torch.int32)


@torch.library.register_fake("torchq::w8a8_int_acc")
def _w8a8_int_acc(x, qdata, scale):
    return x.new_empty((_rows(x), scale.shape[0], 1), dtype=torch.int32)


@torch.library.register_fake("torchq::codebook4_linear")
def _codebook4_linear(x, qdata, scale, lut, bias, block_size, dq_code=None, dq_absmax=None, dq_offset=None):
    return _linear_out(x, qdata.shape[0])


@torch.library.register_fake("torchq::quantize_per_token_int8")
def _quantize_per_token_int8(x):
    m = _rows(x)
    return x.new_empty((m, x.shape[-1]), dtype=torch.int8), x.new_empty((m, 1), dtype=torch.float32)
