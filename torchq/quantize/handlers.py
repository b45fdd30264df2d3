"""Config -> handler table: how each config turns a float weight into a quantized tensor.

A handler takes the float weight ``(N, K)`` and the config and returns
``(quantized_tensor, note)``, where ``note`` is a short human-readable remark for the
report (e.g. ``"padded K 576->640"``) or ``""``. New formats register with
:func:`register_handler`; :func:`torchq.quantize_` only looks things up here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from torchq.quantize.configs import ALLOWED_GROUP_SIZES, QuantConfig

__all__ = ["register_handler", "get_handler", "resolve_group", "Handler"]

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
