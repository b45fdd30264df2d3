"""Handlers turning NF4 / FP4 configs into :class:`~torchq.formats.Codebook4Tensor` weights."""

from __future__ import annotations

from torchq.formats.codebook4.config import (
    Codebook4WeightOnlyConfig,
    FP4WeightOnlyConfig,
    NF4WeightOnlyConfig,
)
from torchq.quantize.handlers import register_handler, resolve_group
from torchq.formats.codebook4.tensor import Codebook4Tensor

__all__ = []


@register_handler(NF4WeightOnlyConfig)
@register_handler(Codebook4WeightOnlyConfig)
@register_handler(FP4WeightOnlyConfig)
def _codebook4(weight, config):
    block, note = resolve_group(weight.shape[1], config.block_size, config.pad_policy)
    t = Codebook4Tensor.from_float(weight, scheme=config.scheme, block_size=block, double_quant=config.double_quant)
    return t, note
