"""Algorithm configs: a calibration algorithm wrapping a base (storage) config.

``GPTQ(int4_weight_only(group_size=64))`` says *how to round* (GPTQ) and *what to store*
(the base config's tensor, kernels and checkpoint format are unchanged). Algorithm configs
are ordinary versioned :class:`~torchq.quantize.configs.QuantConfig` s: registered, frozen, and
JSON round-tripping with the base config nested as its own dict::

    {"type": "gptq", "version": 2, "base": {"type": "int4_weight_only", ...}, "damp": 0.01, ...}

Which bases each algorithm accepts is the table :data:`VALID_BASES`; any other combination
raises naming the valid ones. AWQ and SmoothQuant may also wrap a rounding algorithm
(``AWQ(GPTQ(int4_weight_only()))``: AWQ scales, then GPTQ rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from torchq.formats.codebook4.config import FP4WeightOnlyConfig, NF4WeightOnlyConfig
from torchq.formats.affine.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchq.quantize.configs import QuantConfig, config_from_dict, register_config

__all__ = [
    "AlgorithmConfig",
    "GPTQConfig",
    "HQQConfig",
    "AWQConfig",
    "SmoothQuantConfig",
    "AutoRoundConfig",
    "GPTQ",
    "HQQ",
    "AWQ",
    "SmoothQuant",
    "AutoRound",
    "VALID_BASES",
    "storage_config",
]

_WEIGHT_ONLY = (Int4WeightOnlyConfig, IntxWeightOnlyConfig, Int8WeightOnlyConfig, NF4WeightOnlyConfig, FP4WeightOnlyConfig)
_ROUNDING = _WEIGHT_ONLY + (Int8DynamicActivationInt4WeightConfig,)

#: algorithm type name -> storage configs it composes with
VALID_BASES: dict[str, tuple[type, ...]] = {
    "gptq": _ROUNDING,
    "hqq": _ROUNDING,
    "autoround": _ROUNDING,
    "awq": _WEIGHT_ONLY,
    "smoothquant": (Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationInt4WeightConfig),
}
#: scaling algorithms may wrap these rounding algorithms
_INNER_ROUNDING = ("gptq", "hqq", "autoround")


@dataclass(frozen=True)
class AlgorithmConfig(QuantConfig):
    """Base of algorithm configs: ``base`` is the config of the stored tensor."""

    type_name: ClassVar[str] = "algorithm"
    needs_calibration: ClassVar[bool] = True
    current_version: ClassVar[int] = 1
    base: Optional[QuantConfig] = None

    def __post_init__(self) -> None:
        self._check_version(type(self).current_version)
        base = self.base
        if isinstance(base, dict):  # from JSON
            base = config_from_dict(base)
            object.__setattr__(self, "base", base)
        self._check_base(base)
        self._check_fields()

    def _check_base(self, base) -> None:
        valid = VALID_BASES[self.type_name]
        inner_ok = self.type_name in ("awq", "smoothquant") and isinstance(base, AlgorithmConfig)
        if inner_ok and base.type_name in _INNER_ROUNDING and isinstance(storage_config(base), valid):
            return
        if not isinstance(base, valid) or isinstance(base, AlgorithmConfig):
            names = ", ".join(sorted(c.type_name for c in valid))
            extra = f"; or one of {', '.join(_INNER_ROUNDING)} wrapping those" if self.type_name in ("awq", "smoothquant") else ""
            got = base.type_name if isinstance(base, QuantConfig) else repr(base)
            raise ValueError(f"{type(self).__name__} cannot wrap {got}: valid base configs are {names}{extra}")

    def _check_fields(self) -> None:
        """Subclasses validate their own fields."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, QuantConfig) else v
        return d


def storage_config(config: QuantConfig) -> QuantConfig:
    """The innermost (storage) config of a possibly nested algorithm config."""
    while isinstance(config, AlgorithmConfig):
        config = config.base
    return config


def _positive(name: str, value, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


@register_config
@dataclass(frozen=True)
class GPTQConfig(AlgorithmConfig):
    """GPTQ (Frantar et al. 2022): column-by-column rounding with error feedback through
    the inverse Hessian of the layer inputs. ``damp``: fraction of the mean Hessian
    diagonal added to it; ``block_size``: columns per lazy batch update; ``act_order``:
    quantize columns by decreasing Hessian diagonal (stored via ``perm``; affine bases with
    K a multiple of the group size); ``mse_clip``: search a shrink factor of each group's
    range by weight MSE instead of plain min/max; ``true_sequential``: within a decoder
    layer, the linears reading one input are rounded before the Hessians of the later ones
    are gathered (from the rounded ones' outputs); ``static_groups``: fit every group's
    parameters up front from the unrounded weight, so act-order needs no stored ``perm``
    (any base, padded K and every export format).

    Version 2 made act-order with static groups and MSE clipping the default (on SmolLM2
    int4 g64 they close 73 % of the round-to-nearest gap, the version 1 defaults 51 %); a
    version 1 dict is read with the version 1 defaults."""

    type_name: ClassVar[str] = "gptq"
    current_version: ClassVar[int] = 2
    version: int = 2
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    mse_clip: bool = True
    true_sequential: bool = True
    static_groups: bool = True

    @classmethod
    def upgrade(cls, d):
        if d.get("version") != 1:
            return d
        return {"act_order": False, "mse_clip": False, "static_groups": False, **d, "version": 2}

    def _check_fields(self) -> None:
        _positive("damp", self.damp)
        _positive("block_size", self.block_size, integer=True)
        for name in ("act_order", "mse_clip", "true_sequential", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@register_config
@dataclass(frozen=True)
class HQQConfig(AlgorithmConfig):
    """HQQ (Badri & Shaji 2023): data-free fit of each group's scale and zero point against
    the weight error ``sum |W - Q(W)|^lp_norm``. ``lp_norm <= 1`` (the paper's 0.7): the
    half-quadratic iteration (``iters``, ``beta``, ``kappa``); ``lp_norm > 1`` (default 3,
    chosen by perplexity on SmolLM2, see :mod:`torchq.algorithms.hqq`): a search over the
    range width and the integer zero point."""

    type_name: ClassVar[str] = "hqq"
    needs_calibration: ClassVar[bool] = False
    iters: int = 20
    lp_norm: float = 3.0
    beta: float = 10.0
    kappa: float = 1.01

    def _check_fields(self) -> None:
        _positive("iters", self.iters, integer=True)
        if isinstance(self.lp_norm, bool) or not isinstance(self.lp_norm, (int, float)) or not 0 < self.lp_norm <= 8:
            raise ValueError(f"lp_norm must be in (0, 8] (<= 1: half-quadratic iteration; > 1: search), got {self.lp_norm!r}")
        _positive("beta", self.beta)
        _positive("kappa", self.kappa)


@register_config
@dataclass(frozen=True)
class AWQConfig(AlgorithmConfig):
    """AWQ (Lin et al. 2023): per-input-channel scales ``s = mean|x|^a`` (grid over ``a``
    in ``n_grid`` steps) chosen by the layer output error, folded into the previous op,
    then a per-group clipping search (``clip``). ``max_tokens``: calibration rows sampled
    per input for both searches (their cost is linear in it).

    ``next_inputs``: what the next decoder layer reads. ``"float"``: this layer's float
    output, from the statistics pass (as AutoAWQ does): one pass of the layer, not two.
    ``"rounded"``: its output once rounded (one more pass). ``"auto"`` (version 2 default):
    ``"rounded"`` when a data-driven rounding algorithm (GPTQ, AutoRound) is wrapped, which
    corrects the earlier layers' error only if it sees it; ``"float"`` otherwise. On SmolLM2
    int4 g64 at 128 x 512 tokens, ``"float"`` measured 17.65 in 207 s against 17.85 in 317 s;
    a version 1 dict (always ``"rounded"``) is read as such.

    ``unfoldable``: what happens to the scale of linears with no previous op to fold it into
    (``o_proj`` under grouped-query attention, every linear of a plain module).
    ``"act_scale"`` (default) keeps it in the stored tensor, which only torchq checkpoints
    hold; ``"skip"`` leaves those linears unscaled, as AutoAWQ does, so the model exports to
    AutoAWQ, GPTQ and compressed-tensors. On SmolLM2 (GQA) skipping measured no worse:
    int4 g64 at 128 x 512 tokens 17.81 vs 17.87 (KL 0.1522 vs 0.1523), g128 at 32 x 256 17.82
    vs 17.88 (KL 0.1860 vs 0.1847), AWQ + GPTQ g64 at 32 x 256 16.53 vs 16.65 (KL 0.0999 vs
    0.1022). It is not the default because on a plain module (no fold table) it would leave
    every linear unscaled."""

    type_name: ClassVar[str] = "awq"
    current_version: ClassVar[int] = 2
    version: int = 2
    n_grid: int = 20
    clip: bool = True
    max_tokens: int = 2048
    next_inputs: str = "auto"
    unfoldable: str = "act_scale"

    @classmethod
    def upgrade(cls, d):
        if d.get("version") != 1:
            return d
        return {"next_inputs": "rounded", **d, "version": 2}

    def _check_fields(self) -> None:
        _positive("n_grid", self.n_grid, integer=True)
        _positive("max_tokens", self.max_tokens, integer=True)
        if self.next_inputs not in NEXT_INPUTS:
            raise ValueError(f"next_inputs must be one of {', '.join(map(repr, NEXT_INPUTS))}, got {self.next_inputs!r}")
        _check_unfoldable(self.unfoldable)

    @property
    def feeds_float_outputs(self) -> bool:
        """Whether the next decoder layer reads this layer's float output (``next_inputs``)."""
        if self.next_inputs == "auto":
            return not (isinstance(self.base, AlgorithmConfig) and self.base.needs_calibration)
        return self.next_inputs == "float"


#: what a scaling algorithm may feed the next decoder layer
NEXT_INPUTS = ("auto", "rounded", "float")
#: what a scaling algorithm does with a scale no previous op can take (``unfoldable``)
UNFOLDABLE = ("act_scale", "skip")


def _check_unfoldable(value) -> None:
    if value not in UNFOLDABLE:
        raise ValueError(
            f"unfoldable must be one of {', '.join(map(repr, UNFOLDABLE))} (where no previous op can take a scale: keep "
            f"it as the weight's act_scale, or leave the linear unscaled so the model exports to other formats), got {value!r}"
        )


@register_config
@dataclass(frozen=True)
class SmoothQuantConfig(AlgorithmConfig):
    """SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights with
    ``s = max|x|^alpha / max|w|^(1 - alpha)`` per input channel, folded into the norms.
    ``alpha="auto"``: per group of linears sharing an input, the alpha in 0, 0.1 .. 1 (or no
    smoothing) whose int8-activation output error on the calibration inputs is smallest.
    ``unfoldable``: as :class:`AWQConfig`'s (``"skip"``: exportable to compressed-tensors)."""

    type_name: ClassVar[str] = "smoothquant"
    alpha: Union[float, str] = 0.5
    unfoldable: str = "act_scale"

    def _check_fields(self) -> None:
        _check_unfoldable(self.unfoldable)
        if self.alpha == "auto":
            return
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {self.alpha!r}")


@register_config
@dataclass(frozen=True)
class AutoRoundConfig(AlgorithmConfig):
    """AutoRound (Cheng et al. 2023): SignSGD on per-weight rounding offsets and per-group
    min/max clipping factors, minimising each decoder layer's output error. ``lr=None``:
    ``1 / iters``. ``preset="light"`` is ``iters=50, lr=5e-3``: a few minutes on CPU.
    ``target``: what a decoder layer's output is compared with: ``"float"`` (the float
    model's output of that layer, from float inputs, while the layer itself reads the
    rounded layers' outputs, as auto-round does) or ``"block"`` (the float layer on the
    rounded layers' outputs). ``compute_dtype="bfloat16"``: the layer's forward and backward
    run under bf16 autocast (as auto-round's default ``amp`` on CPU); the fake-quantized
    weights, the learned parameters, the targets and the loss stay fp32. 1.4-1.5x faster on
    SmolLM2 where the CPU has a bf16 dot product (AVX512-BF16, AMX); elsewhere slower, with a
    warning. Not the default: the default keeps the float model's precision. ``seed``: the
    draw of each step's calibration items (every block starts from it). SignSGD follows
    only gradient signs, so the seed moves the result about as much as a CPU's summation
    order does: compare AutoRound runs over several seeds. ``stream_dtype="bfloat16"``: the
    calibration driver stores the decoder layers' hidden streams (the rounded layers'
    outputs and the float model's targets) in bf16, as auto-round does on CPU, and each
    layer reads them back in the model's dtype; half their memory (2 x 75 MB instead of
    2 x 151 MB at 128 x 512 tokens on SmolLM2), at the cost of bf16 rounding of inputs and
    targets. Every calibrated layer of a model must then ask for the same streams.
    ``micro_batch_size``: items per forward and backward inside a step (None: the whole
    ``batch_size`` at once); the step's gradient is summed over its micro-batches, so the
    step is the same up to the order of the sums, while autograd holds one micro-batch's
    activations (about 30 MB per 512-token item on SmolLM2) instead of the batch's."""

    type_name: ClassVar[str] = "autoround"
    iters: int = 200
    lr: Optional[float] = None
    batch_size: int = 8
    seqlen: Optional[int] = None
    preset: str = "default"
    target: str = "float"
    compute_dtype: str = "float32"
    seed: int = 0
    stream_dtype: str = "float32"
    micro_batch_size: Optional[int] = None

    def _check_fields(self) -> None:
        _positive("iters", self.iters, integer=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        _positive("batch_size", self.batch_size, integer=True)
        if self.lr is not None:
            _positive("lr", self.lr)
        if self.seqlen is not None:
            _positive("seqlen", self.seqlen, integer=True)
        if self.preset not in AUTOROUND_PRESETS:
            raise ValueError(f"preset must be one of {sorted(AUTOROUND_PRESETS)}, got {self.preset!r}")
        if self.target not in ("float", "block"):
            raise ValueError(f"target must be 'float' or 'block', got {self.target!r}")
        if self.compute_dtype not in AUTOROUND_COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(AUTOROUND_COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.micro_batch_size is not None:
            _positive("micro_batch_size", self.micro_batch_size, integer=True)
        if self.stream_dtype not in AUTOROUND_COMPUTE_DTYPES:
            raise ValueError(f"stream_dtype must be one of {', '.join(AUTOROUND_COMPUTE_DTYPES)}, got {self.stream_dtype!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


#: AutoRound's compute dtypes (the dtype its forward and backward products run in) and
#: stream dtypes (the dtype the driver stores hidden streams in)
AUTOROUND_COMPUTE_DTYPES = ("float32", "bfloat16")

#: preset -> field values it sets
AUTOROUND_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "light": {"iters": 50, "lr": 5e-3},
}


def GPTQ(base: QuantConfig, **kwargs) -> GPTQConfig:
    return GPTQConfig(base=base, **kwargs)


def HQQ(base: QuantConfig, **kwargs) -> HQQConfig:
    return HQQConfig(base=base, **kwargs)


def AWQ(base: QuantConfig, **kwargs) -> AWQConfig:
    return AWQConfig(base=base, **kwargs)


def SmoothQuant(base: QuantConfig, alpha: Union[float, str] = 0.5, **kwargs) -> SmoothQuantConfig:
    return SmoothQuantConfig(base=base, alpha=alpha, **kwargs)


def AutoRound(base: QuantConfig, iters: Optional[int] = None, preset: str = "default", **kwargs) -> AutoRoundConfig:
    """``AutoRound(base, iters=200)``; ``preset="light"`` fills unset fields from the preset."""
    if preset not in AUTOROUND_PRESETS:
        raise ValueError(f"preset must be one of {sorted(AUTOROUND_PRESETS)}, got {preset!r}")
    values = dict(AUTOROUND_PRESETS[preset])
    values.update(kwargs)
    if iters is not None:
        values["iters"] = iters
    return AutoRoundConfig(base=base, preset=preset, **values)
