"""Scheme names for the command line, the demo and the real-model tests: the ONE place
that maps a name such as ``int4`` to a torchq config.

TODO(lead): this is a stand-in until the shared vocabulary (``torchq/schemes_vocab.py``,
branch ``hf``) merges. Then replace this module's body with::

    from .schemes_vocab import SCHEME_NAMES, config_from_scheme  # noqa: F401

Names match exactly (no prefixes, no case folding); an unknown name is an error that
lists the valid ones.
"""

from __future__ import annotations

from typing import Callable, Optional

from .configs import (
    QuantConfig,
    int4_weight_only,
    int8_dynamic_activation_int4_weight,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)

__all__ = ["SCHEME_NAMES", "config_from_scheme"]


def _per_channel_only(name: str, factory: Callable[[], QuantConfig]) -> Callable[[Optional[int]], QuantConfig]:
    def build(group_size: Optional[int]) -> QuantConfig:
        if group_size is not None:
            raise ValueError(f"scheme {name!r} is per output channel; --group-size does not apply to it")
        return factory()

    return build


def _needs_codebook(name: str) -> Callable[[Optional[int]], QuantConfig]:
    def build(group_size: Optional[int]) -> QuantConfig:
        raise NotImplementedError(
            f"scheme {name!r} needs torchq's 4-bit codebook formats (NF4 / FP4), which this build does not have yet"
        )

    return build


_SCHEMES: dict[str, Callable[[Optional[int]], QuantConfig]] = {
    "int8": lambda g: int8_weight_only(group_size=g),
    "int4": lambda g: int4_weight_only(group_size=g or 128),
    "w8a8": _per_channel_only("w8a8", int8_dynamic_activation_int8_weight),
    "w4a8": lambda g: int8_dynamic_activation_int4_weight(group_size=g or 128),
    "nf4": _needs_codebook("nf4"),
    "fp4_e2m1": _needs_codebook("fp4_e2m1"),
    "fp4_e2m1_bnb": _needs_codebook("fp4_e2m1_bnb"),
}

SCHEME_NAMES: tuple[str, ...] = tuple(_SCHEMES)


def config_from_scheme(name: str, group_size: Optional[int] = None) -> QuantConfig:
    """The config for scheme ``name`` (``group_size=None``: the scheme's default)."""
    if name not in _SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {', '.join(SCHEME_NAMES)}")
    return _SCHEMES[name](group_size)
