"""Configs of the affine integer formats (int8, int4, intx, W8A8, W4A8) and their factories.

Each config class registers under a short ``type`` name (:func:`register_config`), so a
config serialized with :meth:`QuantConfig.to_dict` / :meth:`to_json` can be rebuilt by
:func:`config_from_dict` / :func:`config_from_json` (transformers' ``config.json`` holds
it that way). Factory functions give the short spelling used in code::

    quantize_(model, int4_weight_only(group_size=64))

Zero-point domain of asymmetric int4 (``"int"``: ``w = (q - z) * s``, ``"float"``:
``w = q * s + m``): the default is ``"int"``, measured on SmolLM2-135M (perplexity, float
15.16): group 64 19.9 int vs 20.5 float, group 128 (padded) 20.1 vs 23.7. ``"float"``
wins only where the weights already sit on a float-offset grid (a Q4_1 GGUF at group 32:
lossless), which the GGUF importer keeps as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torchq.quantize.configs import PAD_POLICIES, QuantConfig, _check_choice, _check_group, register_config

__all__ = [
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "IntxWeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8DynamicActivationInt4WeightConfig",
    "int8_weight_only",
    "int4_weight_only",
    "intx_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
]

ZERO_POINT_DOMAINS = ("int", "float")


@dataclass(frozen=True)
class _GroupedConfig(QuantConfig):
    """Shared fields of group-wise weight formats.

    ``pad_policy`` says what happens when ``in_features`` is not a multiple of
    ``group_size``: ``"pad"`` pads K up (reported as padded), ``"largest_group"`` uses the
    largest allowed group size that divides K (reported), padding only if none does.
    """

    group_size: Optional[int] = 128
    symmetric: bool = False
    zero_point_domain: str = "int"
    pad_policy: str = "pad"

    def __post_init__(self) -> None:
        self._check_version()
        _check_group(self.group_size, allow_none=False)
        _check_choice("pad_policy", self.pad_policy, PAD_POLICIES)
        _check_choice("zero_point_domain", self.zero_point_domain, ZERO_POINT_DOMAINS)

    @property
    def domain(self) -> str:
        return "none" if self.symmetric else self.zero_point_domain


@register_config
@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights (symmetric, [-127, 127]), float activations. ``group_size=None``: per
    output channel; 32 matches GGUF Q8_0."""

    type_name: ClassVar[str] = "int8_weight_only"
    group_size: Optional[int] = None
    pad_policy: str = "pad"
    exact_fp32: bool = False  # see Int4WeightOnlyConfig

    def __post_init__(self) -> None:
        self._check_version()
        _check_group(self.group_size, allow_none=True)
        _check_choice("pad_policy", self.pad_policy, PAD_POLICIES)


@register_config
@dataclass(frozen=True)
class Int4WeightOnlyConfig(_GroupedConfig):
    """int4 group-wise weights, float activations. Asymmetric by default.

    ``exact_fp32=True`` keeps kernels in fp32 at every batch size; by default a kernel may
    use its documented faster arithmetic from a row count up (on AVX512-BF16 CPUs: a bf16
    GEMM from M=32, what a bf16 dense layer computes). ``torchq.explain`` shows each
    kernel's numerics; the choice is stored on the weight and in checkpoints."""

    type_name: ClassVar[str] = "int4_weight_only"
    exact_fp32: bool = False


@register_config
@dataclass(frozen=True)
class IntxWeightOnlyConfig(_GroupedConfig):
    """Any width from 2 to 8 bits, group-wise, stored one code per byte (reference kernel)."""

    type_name: ClassVar[str] = "intx_weight_only"
    bits: int = 3
    exact_fp32: bool = False  # see Int4WeightOnlyConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")


@register_config
@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(QuantConfig):
    """W8A8: per-channel symmetric int8 weights, dynamic per-token symmetric int8 activations."""

    type_name: ClassVar[str] = "w8a8"

    def __post_init__(self) -> None:
        self._check_version()


@register_config
@dataclass(frozen=True)
class Int8DynamicActivationInt4WeightConfig(_GroupedConfig):
    """W4A8: int4 group-wise weights (asymmetric by default: measured better on SmolLM2),
    dynamic per-token symmetric int8 activations."""

    type_name: ClassVar[str] = "w4a8"


def int8_weight_only(
    group_size: Optional[int] = None, pad_policy: str = "pad", exact_fp32: bool = False
) -> Int8WeightOnlyConfig:
    return Int8WeightOnlyConfig(group_size=group_size, pad_policy=pad_policy, exact_fp32=exact_fp32)


def int4_weight_only(
    group_size: int = 128,
    symmetric: bool = False,
    zero_point_domain: str = "int",
    pad_policy: str = "pad",
    exact_fp32: bool = False,
) -> Int4WeightOnlyConfig:
    return Int4WeightOnlyConfig(
        group_size=group_size,
        symmetric=symmetric,
        zero_point_domain=zero_point_domain,
        pad_policy=pad_policy,
        exact_fp32=exact_fp32,
    )


def intx_weight_only(
    bits: int,
    group_size: int = 128,
    symmetric: bool = False,
    zero_point_domain: str = "int",
    pad_policy: str = "pad",
    exact_fp32: bool = False,
) -> IntxWeightOnlyConfig:
    return IntxWeightOnlyConfig(
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        zero_point_domain=zero_point_domain,
        pad_policy=pad_policy,
        exact_fp32=exact_fp32,
    )


def int8_dynamic_activation_int8_weight() -> Int8DynamicActivationInt8WeightConfig:
    return Int8DynamicActivationInt8WeightConfig()


def int8_dynamic_activation_int4_weight(
    group_size: int = 128, symmetric: bool = False, zero_point_domain: str = "int", pad_policy: str = "pad"
) -> Int8DynamicActivationInt4WeightConfig:
    return Int8DynamicActivationInt4WeightConfig(
        group_size=group_size, symmetric=symmetric, zero_point_domain=zero_point_domain, pad_policy=pad_policy
    )
