"""Configs for the 4-bit codebook formats: NF4 and FP4 (OCP e2m1 or bitsandbytes' variant).

::

    quantize_(model, nf4_weight_only(block_size=64, double_quant=True))   # QLoRA storage
    quantize_(model, fp4_weight_only(variant="e2m1"))                      # OCP / MX values
    quantize_(model, fp4_weight_only(variant="bnb"))                       # bitsandbytes "fp4"

``variant`` also accepts Intel extension's names ``"fp4_e2m1"`` / ``"fp4_e2m1_bnb"``
(stored as ``"e2m1"`` / ``"bnb"``), and :func:`fp4_e2m1` / :func:`fp4_e2m1_bnb` are
factory aliases. ``double_quant`` quantizes the block scales QLoRA-style (blocks of 256,
mean offset, bitsandbytes' 8-bit dynamic code). ``pad_policy`` as for the integer
configs: ``in_features`` not a multiple of ``block_size`` is padded (reported), or with
``"largest_group"`` a smaller block size that divides it is used (reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torchq.quantize.configs import PAD_POLICIES, QuantConfig, register_config
from torchq.primitives.codebook import BLOCK_SIZES, CODEBOOK_FORMATS

__all__ = [
    "NF4WeightOnlyConfig",
    "FP4WeightOnlyConfig",
    "FP4_VARIANTS",
    "nf4_weight_only",
    "fp4_weight_only",
    "fp4_e2m1",
    "fp4_e2m1_bnb",
    "Codebook4WeightOnlyConfig",
    "codebook4_weight_only",
]

#: accepted spelling -> stored variant
FP4_VARIANTS = {"e2m1": "e2m1", "bnb": "bnb", "fp4_e2m1": "e2m1", "fp4_e2m1_bnb": "bnb"}
_VARIANT_SCHEME = {"e2m1": "fp4_e2m1", "bnb": "fp4_e2m1_bnb"}


def _check_common(config) -> None:
    config._check_version()
    if config.block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {config.block_size!r}")
    if not isinstance(config.double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {config.double_quant!r}")
    if config.pad_policy not in PAD_POLICIES:
        raise ValueError(f"pad_policy must be one of {PAD_POLICIES}, got {config.pad_policy!r}")


@register_config
@dataclass(frozen=True)
class NF4WeightOnlyConfig(QuantConfig):
    """NF4 (QLoRA NormalFloat4) weights, float activations; scale = block absmax."""

    type_name: ClassVar[str] = "nf4_weight_only"
    block_size: int = 64
    double_quant: bool = False
    pad_policy: str = "pad"

    def __post_init__(self) -> None:
        _check_common(self)

    @property
    def scheme(self) -> str:
        return "nf4"


@register_config
@dataclass(frozen=True)
class FP4WeightOnlyConfig(QuantConfig):
    """FP4 weights, float activations. ``variant="e2m1"``: OCP/MX e2m1 values, scale =
    absmax / 6; ``variant="bnb"``: bitsandbytes' FP4 table (a different 16-entry table,
    not bit-compatible with e2m1), scale = absmax."""

    type_name: ClassVar[str] = "fp4_weight_only"
    variant: str = "e2m1"
    block_size: int = 64
    double_quant: bool = False
    pad_policy: str = "pad"

    def __post_init__(self) -> None:
        if self.variant not in FP4_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(FP4_VARIANTS)}, got {self.variant!r}")
        object.__setattr__(self, "variant", FP4_VARIANTS[self.variant])
        _check_common(self)

    @property
    def scheme(self) -> str:
        return _VARIANT_SCHEME[self.variant]


def nf4_weight_only(block_size: int = 64, double_quant: bool = False, pad_policy: str = "pad") -> NF4WeightOnlyConfig:
    return NF4WeightOnlyConfig(block_size=block_size, double_quant=double_quant, pad_policy=pad_policy)


def fp4_weight_only(
    variant: str = "e2m1", block_size: int = 64, double_quant: bool = False, pad_policy: str = "pad"
) -> FP4WeightOnlyConfig:
    return FP4WeightOnlyConfig(variant=variant, block_size=block_size, double_quant=double_quant, pad_policy=pad_policy)


def fp4_e2m1(block_size: int = 64, double_quant: bool = False, pad_policy: str = "pad") -> FP4WeightOnlyConfig:
    """Alias of ``fp4_weight_only(variant="e2m1")`` (Intel extension's name)."""
    return fp4_weight_only("e2m1", block_size, double_quant, pad_policy)


def fp4_e2m1_bnb(block_size: int = 64, double_quant: bool = False, pad_policy: str = "pad") -> FP4WeightOnlyConfig:
    """Alias of ``fp4_weight_only(variant="bnb")`` (Intel extension's name)."""
    return fp4_weight_only("bnb", block_size, double_quant, pad_policy)


def _scheme_factory(factory):
    """Adapt a codebook factory to the vocabulary's ``group_size`` spelling (= block size)."""

    def make(group_size: int = 64, double_quant: bool = False, pad_policy: str = "pad"):
        return factory(block_size=group_size, double_quant=double_quant, pad_policy=pad_policy)

    make.__qualname__ = f"{factory.__name__}_scheme"
    return make


def _register_schemes() -> None:
    from torchq.quantize.schemes import register_scheme

    register_scheme("nf4", _scheme_factory(nf4_weight_only), "NF4 4-bit codebook (bitsandbytes), block 64 by default")
    register_scheme("fp4_e2m1", _scheme_factory(fp4_e2m1), "FP4 e2m1 (OCP / MX), scale = absmax / 6, block 64")
    register_scheme("fp4_e2m1_bnb", _scheme_factory(fp4_e2m1_bnb), "FP4, bitsandbytes' 16-entry table, block 64")


_register_schemes()


@register_config
@dataclass(frozen=True)
class Codebook4WeightOnlyConfig(QuantConfig):
    """Any registered 16-entry 4-bit codebook (:func:`torchq.register_codebook`; also
    ``"nf4"``, ``"fp4_e2m1"``, ``"fp4_e2m1_bnb"``), float activations."""

    type_name: ClassVar[str] = "codebook4_weight_only"
    codebook: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    pad_policy: str = "pad"

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOK_FORMATS:
            raise ValueError(
                f"unknown codebook {self.codebook!r}; registered: {sorted(CODEBOOK_FORMATS)} "
                "(add one with torchq.register_codebook(name, values))"
            )
        _check_common(self)

    @property
    def scheme(self) -> str:
        return self.codebook


def codebook4_weight_only(
    codebook: str, block_size: int = 64, double_quant: bool = False, pad_policy: str = "pad"
) -> Codebook4WeightOnlyConfig:
    return Codebook4WeightOnlyConfig(codebook=codebook, block_size=block_size, double_quant=double_quant, pad_policy=pad_policy)
