"""Handlers of the affine integer configs: a float weight -> an :class:`AffineQuantizedTensor`
(registered in :mod:`torchq.quantize.handlers`)."""

from __future__ import annotations

import torch

from torchq.formats.affine.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchq.formats.affine.tensor import AffineQuantizedTensor
from torchq.quantize.handlers import register_handler, resolve_group


def _affine(weight: torch.Tensor, config, scheme: str, bits: int, group_size, symmetric: bool, domain: str):
    g, note = resolve_group(weight.shape[1], group_size, getattr(config, "pad_policy", "pad"))
    numerics = "exact" if getattr(config, "exact_fp32", False) else "auto"
    t = AffineQuantizedTensor.from_float(
        weight, scheme=scheme, bits=bits, group_size=g, symmetric=symmetric, zero_point_domain=domain,
        numerics=numerics,
    )
    return t, note


@register_handler(Int8WeightOnlyConfig)
def _int8_weight_only(weight, config):
    return _affine(weight, config, "int8_weight_only", 8, config.group_size, True, "none")


@register_handler(Int4WeightOnlyConfig)
def _int4_weight_only(weight, config):
    return _affine(weight, config, "int4_weight_only", 4, config.group_size, config.symmetric, config.domain)


@register_handler(IntxWeightOnlyConfig)
def _intx_weight_only(weight, config):
    return _affine(weight, config, "intx_weight_only", config.bits, config.group_size, config.symmetric, config.domain)


@register_handler(Int8DynamicActivationInt8WeightConfig)
def _w8a8(weight, config):
    return _affine(weight, config, "w8a8", 8, None, True, "none")


@register_handler(Int8DynamicActivationInt4WeightConfig)
def _w4a8(weight, config):
    return _affine(weight, config, "w4a8", 4, config.group_size, config.symmetric, config.domain)
