"""Config -> handler table: how each config turns a float weight into a quantized tensor.

A handler takes the float weight ``(N, K)`` and the config and returns
``(quantized_tensor, note)``, where ``note`` is a short human-readable remark for the
report (e.g. ``"padded K 576->640"``) or ``""``. New formats register with
:func:`register_handler`; :func:`torchq.quantize_` only looks things up here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .configs import (
    ALLOWED_GROUP_SIZES,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    QuantConfig,
)
from .tensors.affine_quantized import AffineQuantizedTensor

__all__ = ["register_handler", "get_handler", "Handler"]

Handler = Callable[[torch.Tensor, QuantConfig], tuple[torch.Tensor, str]]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    def decorator(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return decorator


def get_handler(config: QuantConfig) -> Handler:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(
        f"no quantization handler registered for {type(config).__name__}; "
        f"known configs: {sorted(k.__name__ for k in _HANDLERS)}"
    )


def resolve_group(k: int, group_size: Optional[int], pad_policy: str) -> tuple[Optional[int], str]:
    """Group size to use for in_features ``k`` and the report note it earns."""
    if group_size is None or k % group_size == 0:
        return group_size, ""
    if pad_policy == "largest_group":
        fitting = [g for g in ALLOWED_GROUP_SIZES if g <= group_size and k % g == 0]
        if fitting:
            return fitting[-1], f"group {group_size}->{fitting[-1]} (K={k})"
    padded = -(-k // group_size) * group_size
    return group_size, f"padded K {k}->{padded}"


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
