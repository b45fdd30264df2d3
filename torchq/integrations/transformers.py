"""transformers integration: quantize while loading, ``save_pretrained`` / ``from_pretrained``.

Registered with transformers under ``quant_method="torchq"`` through its public plug-in
points (``register_quantization_config``, ``register_quantizer``)::

    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=TorchqConfig("int4", group_size=64))
    model.save_pretrained(out_dir)                       # safetensors, torchq config in config.json
    model = AutoModelForCausalLM.from_pretrained(out_dir)  # after `import torchq`: bit-exact reload

**Quantizing while loading.** Every targeted weight is quantized as it streams in from the
checkpoint (transformers loads one tensor at a time when a quantizer quantizes on the
fly), so peak memory is the quantized model plus about one float tensor, never the float
model. Which layers: every ``nn.Linear`` (the LM head included), minus
``modules_to_not_convert`` (transformers' matching rules) and ``overrides`` (torchq's
:func:`~torchq.quantize_` rules: exact name, then regex; ``None`` skips). A head tied to the
input embedding is quantized once: the embedding weight is quantized with the head's
config and the tie makes both modules hold the same quantized tensor (the embedding
dequantizes only the rows it looks up), as :func:`torchq.quantize_` does.

**Checkpoint layout** (the :mod:`torchq.formats.serialization` container): a quantized weight
``K`` is stored as plain tensors ``K::qdata``, ``K::scale``, ... with its format in the
safetensors header under ``"torchq"`` (every shard carries the whole header, so one
weight's pieces may sit in different shards), plus a 6-byte *guard* tensor under ``K``
itself. Without torchq, transformers only warns about the unknown ``quant_method``; the
guard makes it fail instead of loading random weights: ``K`` exists with a shape that can
never match, which ``from_pretrained`` refuses (unless told ``ignore_mismatched_sizes=True``,
which explicitly asks for random re-initialization of mismatched weights). Tied weights are
written once (the embedding) and re-tied by transformers at load.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from torchq.quantize.layer_plan import LayerReport, QuantizationReport, config_for
from torchq.quantize.configs import QuantConfig, config_from_dict
from torchq.memory import release_file_pages, release_free_memory
from torchq.quantize.row_chunks import quantize_in_row_chunks
from torchq.quantize.schemes import config_from_scheme
from torchq.formats.serialization import (
    HEADER_KEY,
    SEPARATOR,
    check_crc32,
    flatten_state_dict,
    read_header,
    rebuild_entry,
    tensor_crc32,
)
from torchq.formats.base import TorchqTensor

__all__ = ["TorchqConfig", "TorchqHfQuantizer", "QUANT_METHOD", "mark_quantized", "checkpoint_state_dict"]

logger = logging.getLogger("torchq")

QUANT_METHOD = "torchq"
# transformers releases before 5.21 hand a quantizer's weight converter only the guard
# tensor of a torchq checkpoint, not its inner tensors: reloads fail (measured: 5.17, 5.20.2
# fail; 5.21.0 .. 5.24.0 pass test_transformers_integration). pyproject.toml pins the same.
MIN_TRANSFORMERS = "5.21"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str) -> None:
    """Raise a clear error when transformers ``version`` is too old for this integration."""
    from packaging.version import Version

    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"torchq's transformers integration needs transformers>={MIN_TRANSFORMERS},<6, found {version}: "
            "older releases pass quantized checkpoints' tensors to the loader differently and torchq "
            f"checkpoints would not reload. Fix: pip install -U 'transformers>={MIN_TRANSFORMERS},<6'"
        )


#: Content of the guard tensor stored under each quantized weight's own key.
GUARD_BYTES = b"torchq"


# ---------------------------------------------------------------------------- config
class TorchqConfig(QuantizationConfigMixin):
    """transformers ``quantization_config`` for torchq.

    ``quant_config``: a torchq config (``int4_weight_only(group_size=64)``), a scheme name
    from :mod:`torchq.quantize.schemes` (``"int4"``, with ``group_size`` and other options as
    keywords), a dict from ``config.json``, or ``None`` for a checkpoint that is already
    quantized (formats per tensor in the file, e.g. imported from GGUF).
    ``modules_to_not_convert``: module names kept in float (transformers' matching: prefix
    at a module boundary, regex or suffix). ``overrides``: ``{name or regex: config or
    None}`` as in :func:`torchq.quantize_`.
    """

    def __init__(
        self,
        quant_config: Union[QuantConfig, str, Mapping[str, Any], None] = None,
        group_size: Optional[int] = None,
        modules_to_not_convert: Optional[list[str]] = None,
        overrides: Optional[Mapping[str, Union[QuantConfig, Mapping[str, Any], None]]] = None,
        quant_method: str = QUANT_METHOD,
        torchq_version: Optional[str] = None,
        **scheme_options: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"TorchqConfig has quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(quant_config, str):
            quant_config = config_from_scheme(quant_config, group_size=group_size, **scheme_options)
        else:
            if group_size is not None or scheme_options:
                given = sorted(scheme_options) + (["group_size"] if group_size is not None else [])
                raise TypeError(
                    f"TorchqConfig got {given}: scheme options only apply to a scheme name such as "
                    "TorchqConfig('int4', group_size=64) (with a config object, set them on the config; in a "
                    "config.json, unknown fields mean it was written by a newer torchq)"
                )
            if isinstance(quant_config, Mapping):
                quant_config = config_from_dict(quant_config)
            elif quant_config is not None and not isinstance(quant_config, QuantConfig):
                raise TypeError(
                    f"TorchqConfig takes a torchq config, a scheme name or None, got {type(quant_config).__name__}"
                )
        self.quant_method = QUANT_METHOD
        self.quant_config: Optional[QuantConfig] = quant_config
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.overrides: dict[str, Optional[QuantConfig]] = {
            str(k): (config_from_dict(v) if isinstance(v, Mapping) else v) for k, v in (overrides or {}).items()
        }
        for k, v in self.overrides.items():
            if v is not None and not isinstance(v, QuantConfig):
                raise TypeError(f"override {k!r}: expected a torchq config or None, got {type(v).__name__}")
        from torchq._version import __version__

        self.torchq_version = torchq_version or __version__

    def config_for(self, module_name: str) -> Optional[QuantConfig]:
        """The config that module ``module_name`` gets (None: kept in float)."""
        if not should_convert_module(module_name, self.modules_to_not_convert):
            return None
        return config_for(module_name, self.quant_config, self.overrides)[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "quant_config": self.quant_config.to_dict() if self.quant_config is not None else None,
            "modules_to_not_convert": self.modules_to_not_convert,
            "overrides": {k: (v.to_dict() if v is not None else None) for k, v in self.overrides.items()},
            "torchq_version": self.torchq_version,
        }

    def __iter__(self):
        yield from self.to_dict().items()


# ---------------------------------------------------------------------------- loading ops
class _SharedOp(ConversionOps):
    """transformers deep-copies converters per weight; the op only points at the quantizer,
    so every copy shares it instead of copying the quantizer (and the header) each time."""

    def __init__(self, hf_quantizer: "TorchqHfQuantizer"):
        self.hf_quantizer = hf_quantizer  # this attribute also tells transformers not to cast inputs

    def __deepcopy__(self, memo):
        return self


class TorchqQuantize(_SharedOp):
    """Quantize a float weight the moment it is loaded (quantize-while-loading)."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            out[name] = self.hf_quantizer.quantize_param(name, value)
        return out


class TorchqDeserialize(_SharedOp):
    """Rebuild one quantized weight from its inner tensors and the header entry."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        meta = self.hf_quantizer.entries[full_layer_name]
        tensors = {}
        for pattern, values in input_dict.items():
            if SEPARATOR not in pattern:
                continue  # the guard stored under the weight's own name
            if len(values) != 1:
                raise ValueError(f"{full_layer_name}: expected one tensor for {pattern!r}, got {len(values)}")
            tensors[pattern.split(SEPARATOR, 1)[1]] = values[0]
            if pattern in self.hf_quantizer.checksums:
                check_crc32(values[0], self.hf_quantizer.checksums[pattern], pattern)
        weight = rebuild_entry(full_layer_name, meta, tensors)
        for value in tensors.values():  # repacked into the weight: the file's pages are done with
            release_file_pages(value)
        dtype = model.get_parameter(full_layer_name).dtype if model is not None else weight.dtype
        if dtype.is_floating_point and weight.dtype != dtype:  # follow from_pretrained(dtype=...)
            weight = weight.to(dtype=dtype)
        return {full_layer_name: weight}


# ---------------------------------------------------------------------------- quantizer
class TorchqHfQuantizer(HfQuantizer):
    """The transformers quantizer for ``quant_method="torchq"``. See the module docstring."""

    requires_calibration = False
    quantization_config: TorchqConfig

    def __init__(self, quantization_config: TorchqConfig, **kwargs):
        check_transformers_version(_transformers_version())
        super().__init__(quantization_config, **kwargs)
        self.plan: dict[str, QuantConfig] = {}  # param name -> config (quantize-while-loading)
        self.notes: dict[str, str] = {}  # param name -> report note
        self.entries: dict[str, dict] = {}  # param name -> header entry (pre-quantized checkpoint)
        self.checksums: dict[str, int] = {}  # tensor name -> CRC-32 from the header (pre-quantized)
        self.report: Optional[QuantizationReport] = None

    # -- environment
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise NotImplementedError("torchq does not support disk offload (device_map with 'disk'); use 'cpu'")
        if not self.pre_quantized and self.quantization_config.quant_config is None:
            raise ValueError(
                "TorchqConfig(None) only describes an already-quantized checkpoint; to quantize while loading pass "
                "a config or a scheme name, e.g. TorchqConfig('int4', group_size=64)"
            )

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    # -- before loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.base_model_prefix = getattr(model, "base_model_prefix", "") or ""
        if self.pre_quantized:
            self.entries, self.checksums = _read_entries(model, checkpoint_files)
        else:
            self.plan = plan_quantization(model, self.quantization_config)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return not self.pre_quantized and param_name in self.plan

    def get_quantize_ops(self):
        return TorchqQuantize(self)

    def quantize_param(self, name: str, value: torch.Tensor) -> torch.Tensor:
        cfg = self.plan.get(name)
        if cfg is None or isinstance(value, TorchqTensor):
            return value
        if not value.is_floating_point():
            raise TypeError(
                f"{name}: checkpoint weight dtype {value.dtype} is not floating point; torchq quantizes float "
                "weights (load the float checkpoint, or keep this module with modules_to_not_convert)"
            )
        if value.numel() == 0:
            self.notes[name] = f"skipped: empty weight {tuple(value.shape)}"
            return value
        try:  # temporaries of one row block only; the quantizer itself rejects NaN/Inf
            qweight, note = quantize_in_row_chunks(value.detach(), cfg)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        release_file_pages(value)  # the float weight's pages of a mmap'd checkpoint: done with them
        release_free_memory()
        self.notes[name] = note
        return qweight

    def get_weight_conversions(self):
        """One converter per quantized weight of a pre-quantized checkpoint, scoped to its
        module: it gathers ``K``, ``K::qdata``, ``K::scale``, ... (wherever they are) into
        ``K``. Scoping keeps float weights (norms, skipped layers) on transformers' path."""
        if not self.pre_quantized:
            return []
        inner = sorted({n for meta in self.entries.values() for n in meta["tensors"]})
        converters = []
        for key in self.entries:
            module_path, _, pname = key.rpartition(".")
            conv = WeightConverter([pname] + [f"{pname}{SEPARATOR}{n}" for n in inner], pname, [TorchqDeserialize(self)])
            prefix = self.base_model_prefix
            conv.scope_prefix = module_path[len(prefix) + 1 :] if prefix and module_path.startswith(prefix + ".") else module_path
            conv.base_model_prefix = prefix
            converters.append(conv)
        return converters

    # -- after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        # Our converters only read torchq files; saving writes torchq files directly, so they
        # must not be reversed by save_pretrained.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c for c in conversions if not any(isinstance(op, _SharedOp) for op in getattr(c, "operations", ()))
            ]
        if not self.pre_quantized:
            self._quantize_leftovers(model)
        self.report = build_report(model, self.notes, self.quantization_config if not self.pre_quantized else None)
        logger.info("%s", self.report.summary())
        logger.debug("%s", self.report)
        return model

    def _quantize_leftovers(self, model) -> None:
        """Planned weights still in float were missing from the checkpoint (transformers
        initialized them and said so): quantize them too, so the plan holds."""
        for name in self.plan:
            param = model.get_parameter(name)
            if isinstance(param, TorchqTensor):
                continue
            qweight = self.quantize_param(name, param.detach())
            if qweight is param or not isinstance(qweight, TorchqTensor):
                continue
            new = nn.Parameter(qweight, requires_grad=False)
            new._is_hf_initialized = True
            for mod in model.modules():  # every module holding this parameter (ties)
                for pname, p in list(mod._parameters.items()):
                    if p is param:
                        mod._parameters[pname] = new
            self.notes[name] = "missing from checkpoint (initialized, then quantized)"

    # -- saving
    def get_state_dict_and_metadata(self, model):
        return checkpoint_state_dict(model)

    def _dequantize(self, model, dtype=None):
        replaced: dict[int, nn.Parameter] = {}
        for mod in model.modules():
            for pname, p in list(mod._parameters.items()):
                if isinstance(p, TorchqTensor):
                    if id(p) not in replaced:
                        replaced[id(p)] = nn.Parameter(p.dequantize(dtype or p.dtype), requires_grad=False)
                    mod._parameters[pname] = replaced[id(p)]
        return model


# ---------------------------------------------------------------------------- helpers
def plan_quantization(model: nn.Module, config: TorchqConfig) -> dict[str, QuantConfig]:
    """Param name -> config for every weight to quantize while loading.

    A tied LM head makes its source embedding weight a target with the head's config (the
    checkpoint holds the embedding; the tie then shares the quantized tensor).
    """
    plan: dict[str, QuantConfig] = {}
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, nn.Linear):
            cfg = config.config_for(name)
            if cfg is not None:
                plan[f"{name}.weight" if name else "weight"] = cfg
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        for a, b in ((target, source), (source, target)):
            owner = modules.get(b.rpartition(".")[0])
            if a in plan and b not in plan and isinstance(owner, nn.Embedding):
                plan[b] = plan[a]
    return plan


def _read_entries(model: nn.Module, checkpoint_files) -> tuple[dict[str, dict], dict[str, int]]:
    """The quantized entries of a torchq checkpoint (all shards must carry the same header) and
    its tensors' CRC-32 table (empty for checkpoints written before it existed)."""
    from safetensors import safe_open

    files = list(checkpoint_files or [])
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        raise ValueError(
            f"a torchq checkpoint is a set of safetensors files written by save_pretrained; got {files or 'no files'}"
        )
    entries: Optional[dict] = None
    checksums: dict[str, int] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            header = read_header(fh.metadata())
        if header is None:
            raise ValueError(
                f"{f} has no torchq header although config.json says quant_method='torchq': the checkpoint was not "
                "written by torchq's save_pretrained (or was rewritten by another tool)"
            )
        checksums.update(header.get("crc32") or {})
        if entries is None:
            entries = header["entries"]
        elif header["entries"] != entries:
            raise ValueError(f"{f}: its torchq header differs from the other shards'; the checkpoint is inconsistent")
        quantized_aliases = set(header.get("aliases", {}).values()) & set(header["entries"])
        if quantized_aliases:
            raise ValueError(f"{f}: shared quantized tensors {sorted(quantized_aliases)} are not supported here")
    model_keys = set(model.state_dict().keys())
    unknown = sorted(k for k in entries if k not in model_keys)
    if unknown:
        raise ValueError(
            f"the checkpoint quantizes {unknown[:5]}{' ...' if len(unknown) > 5 else ''} which this "
            f"{type(model).__name__} does not have: wrong model class for this checkpoint?"
        )
    return entries, checksums


def checkpoint_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(plain tensors, safetensors metadata)`` for ``save_pretrained``: quantized weights
    flattened to their inner tensors + a guard under their own name, tied weights once."""
    state = model.state_dict()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state and _same_parameter(model, target, source):
            del state[target]
    flat, metadata = flatten_state_dict(state)
    header = json.loads(metadata[HEADER_KEY])
    for alias, target in header.pop("aliases", {}).items():
        if target in header["entries"]:
            raise ValueError(
                f"{alias!r} shares its quantized tensor with {target!r} but transformers does not know them as tied "
                "(model.all_tied_weights_keys); tie them through the config or quantize them separately"
            )
        flat[alias] = flat[target]  # plain shared tensors: transformers' own tie handling applies
    header["aliases"] = {}
    for key in header["entries"]:
        flat[key] = torch.tensor(list(GUARD_BYTES), dtype=torch.uint8)
    header["crc32"] = {name: tensor_crc32(t) for name, t in flat.items()}
    header["crc32_complete"] = False  # transformers shards the file and writes tied tensors its own way
    metadata[HEADER_KEY] = json.dumps(header, sort_keys=True)
    return flat, metadata


def _same_parameter(model: nn.Module, a: str, b: str) -> bool:
    try:
        return model.get_parameter(a) is model.get_parameter(b)
    except AttributeError:
        return False


def build_report(model: nn.Module, notes: Mapping[str, str], config: Optional[TorchqConfig]) -> QuantizationReport:
    """One line per linear layer: quantized / padded / tied / skipped, as :func:`torchq.quantize_` reports."""
    embeddings = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    report = QuantizationReport()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        pname = f"{name}.weight"
        w = mod.weight
        if isinstance(w, TorchqTensor):
            scheme = getattr(w, "scheme", type(w).__name__)
            note = notes.get(pname, "")
            k, padded = w.shape[1], getattr(w, "padded_in_features", w.shape[1])
            status = "padded" if padded != k else "quantized"
            if id(w) in embeddings:
                status, note = "tied", f"shared with embedding {embeddings[id(w)]!r}" + (f"; {note}" if note else "")
            report.layers.append(LayerReport(name, status, scheme, note))
        else:
            if config is None:
                reason = "float in the checkpoint"
            elif config.config_for(name) is None:
                reason = "modules_to_not_convert / override None"
            else:
                reason = notes.get(pname, "not quantized")
            report.layers.append(LayerReport(name, "skipped", "-", reason))
    return report


def mark_quantized(model: nn.Module, config: Union[TorchqConfig, QuantConfig, str, None] = None) -> nn.Module:
    """Make a transformers model whose weights were quantized outside ``from_pretrained``
    (``torchq.quantize_``, GGUF import) save as a torchq checkpoint with ``save_pretrained``.

    ``config`` is recorded in ``config.json`` (None when formats differ per layer: the file's
    header describes every tensor either way).
    """
    tq = config if isinstance(config, TorchqConfig) else TorchqConfig(config)
    model.hf_quantizer = TorchqHfQuantizer(tq, pre_quantized=True)
    model.config.quantization_config = tq
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return model


def _register() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(TorchqConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(TorchqHfQuantizer)
    registered = (AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], AUTO_QUANTIZER_MAPPING[QUANT_METHOD])
    if registered != (TorchqConfig, TorchqHfQuantizer):
        raise RuntimeError(
            f"quant_method {QUANT_METHOD!r} is registered with transformers by another module: {registered}"
        )


_register()
