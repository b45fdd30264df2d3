"""Reading foreign quantized checkpoint directories: format table, lazy tensors, skeleton fill.

:data:`IMPORTERS` maps a format name to how it is detected (from ``quantization_config``)
and how one Linear's stored tensors become an :class:`IntWeight` (plus the torchq scheme).
:func:`load_quantized_dir` builds the transformers model on the meta device from
``config.json`` and fills it one tensor at a time from the safetensors shards (``safe_open``:
only the tensor asked for is read), so no float copy of a quantized weight ever exists.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from torchq.errors import CheckpointError
from torchq.interop import awq, compressed_tensors, gptq
from torchq.interop.intweight import ACTIVATION_SCHEMES, IntWeight, to_torchq

__all__ = ["LazyTensors", "Importer", "IMPORTERS", "detect_format", "read_quantization_config", "load_quantized_dir"]

logger = logging.getLogger("torchq")

#: reads one Linear: (get, module name) -> (IntWeight, torchq scheme or None)
LinearReader = Callable[[Callable[[str], torch.Tensor], str], tuple[IntWeight, Optional[str]]]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyTensors:
    """The tensors of a directory's safetensors shards, read one at a time on request.

    Reads each tensor with a plain ``readinto`` at its offset (the safetensors layout: an
    8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, the data)
    instead of memory-mapping the shards: pages of a mapping stay resident (and counted in
    the process's RSS) once touched, which would add the whole checkpoint to the peak.
    """

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(directory, name) for name in files]
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{directory} has no *.safetensors files (only safetensors checkpoints are read)")
        self._where: dict[str, tuple[str, int, dict]] = {}
        for path in files:
            for name, (base, info) in _safetensors_index(path).items():
                self._where[name] = (path, base, info)

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __call__(self, name: str) -> torch.Tensor:
        try:
            path, base, info = self._where[name]
        except KeyError:
            raise KeyError(name) from None
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(buf.numpy()) != end - start:
                raise CheckpointError("the file ended while reading this tensor (truncated?)", file=path, tensor=name)
        return buf.view(dtype).reshape(info["shape"])


def _safetensors_index(path: str) -> dict[str, tuple[int, dict]]:
    """name -> (data start, header entry) of one safetensors file, every entry checked against
    the format and the file's size before anything is allocated (CheckpointError otherwise)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"header length {n} does not fit a file of {size} bytes", file=path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"the safetensors header is not valid JSON ({e})", file=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("the safetensors header is not a JSON object", file=path)
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        ok = (
            dtype is not None
            and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        )
        if not ok:
            raise CheckpointError(f"malformed header entry {info!r} (or a dtype torchq does not read)", file=path, tensor=name)
        start, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= size - 8 - n or end - start != nbytes:
            raise CheckpointError(
                f"data offsets {offsets} do not hold a {info['dtype']} {shape} tensor inside the file", file=path, tensor=name
            )
        out[name] = (8 + n, info)
    return out


@dataclass(frozen=True)
class Importer:
    """A foreign checkpoint format: ``reader(qcfg, names, module name, class names)`` returns
    the Linear's reader, or None when that module is stored unquantized."""

    name: str
    quant_method: str
    reader: Callable[[Mapping, set, str, tuple], Optional[LinearReader]]


def _gptq_reader(qcfg, names, name, classes):
    if f"{name}.qweight" not in names:
        return None
    return lambda get, prefix: (gptq.read_gptq(get, prefix, qcfg), None)


def _awq_reader(qcfg, names, name, classes):
    if f"{name}.qweight" not in names:
        return None
    return lambda get, prefix: (awq.read_awq(get, prefix, qcfg), None)


def _ct_reader(qcfg, names, name, classes):
    group = compressed_tensors.scheme_for(name, classes, qcfg)
    if group is None:
        return None
    fmt = group.get("format") or qcfg.get("format") or "pack-quantized"
    stored = f"{name}.weight_packed" if fmt == "pack-quantized" else f"{name}.weight_scale"
    if stored not in names:
        return None
    scheme = None
    if compressed_tensors.activation_is_int8_token(group):
        scheme = ACTIVATION_SCHEMES.get(int(group["weights"]["num_bits"]))
    return lambda get, prefix: (compressed_tensors.read_ct(get, prefix, group, fmt), scheme)


IMPORTERS: dict[str, Importer] = {
    i.quant_method: i
    for i in (
        Importer("gptq", "gptq", _gptq_reader),
        Importer("awq", "awq", _awq_reader),
        Importer("compressed-tensors", "compressed-tensors", _ct_reader),
    )
}


def read_quantization_config(directory: str) -> Optional[dict]:
    """``quantization_config`` from config.json, else AutoGPTQ's quantize_config.json or
    AutoAWQ's quant_config.json (older checkpoints keep it there)."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    qcfg = config.get("quantization_config")
    if qcfg:
        return dict(qcfg)
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                qcfg = json.load(f)
            qcfg.setdefault("quant_method", method)
            if method == "awq":  # AutoAWQ's own names
                qcfg.setdefault("bits", qcfg.get("w_bit", 4))
                qcfg.setdefault("group_size", qcfg.get("q_group_size", 128))
            return qcfg
    return None


def detect_format(qcfg: Optional[Mapping]) -> Optional[str]:
    """The importer name for a ``quantization_config`` (None: not quantized, or torchq's own)."""
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "torchq":
        return None
    if method not in IMPORTERS:
        raise ValueError(
            f"quantization method {method!r} is not supported by torchq.from_pretrained "
            f"(supported: {sorted(IMPORTERS)}, torchq, and GGUF files)"
        )
    if qcfg.get("is_marlin_format"):
        raise ValueError("marlin-packed GPTQ checkpoints are not supported; convert them to checkpoint_format 'gptq'")
    return method


def _class_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(module).__mro__)


@contextlib.contextmanager
def _as_checkpoint_error(directory: str, name: str):
    """Any failure while reading one layer's tensors is a damaged or contradictory checkpoint:
    a CheckpointError naming the directory and the layer (the format modules say what)."""
    try:
        yield
    except CheckpointError as e:
        raise e.located(file=directory, tensor=name) from e
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, ArithmeticError) as e:
        raise CheckpointError(f"{type(e).__name__}: {e}", file=directory, tensor=name) from e


def reject_unused_overrides(path: str, config, unused: Mapping) -> None:
    """A ``from_pretrained`` keyword that no config attribute took raises (transformers would
    drop it silently: a typo then changes nothing without a word)."""
    if unused:
        raise TypeError(f"{path}: unknown config overrides {sorted(unused)}; {type(config).__name__} has no such "
                        "attribute (transformers 5 keeps RoPE settings in rope_parameters)")


def load_quantized_dir(directory: str, qcfg: Mapping, *, dtype: torch.dtype = torch.float32, **config_overrides) -> nn.Module:
    """A transformers causal LM from a foreign quantized checkpoint directory (see module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    importer = IMPORTERS[detect_format(qcfg)]
    config, unused = AutoConfig.from_pretrained(directory, return_unused_kwargs=True, **config_overrides)
    reject_unused_overrides(directory, config, unused)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights become torchq tensors: no foreign quantizer
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = LazyTensors(directory)
    names = tensors.names()
    done: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reader = importer.reader(qcfg, names, name, _class_names(module))
        if reader is None:
            continue
        with _as_checkpoint_error(directory, name):
            w, scheme = reader(tensors, name)
            if tuple(w.shape) != (module.out_features, module.in_features):
                raise CheckpointError(
                    f"holds a {tuple(w.shape)} weight, the model expects {(module.out_features, module.in_features)}",
                    file=directory, tensor=name, fix="check that config.json belongs to these weights",
                )
            module.weight = nn.Parameter(to_torchq(w, dtype, what=name, scheme=scheme), requires_grad=False)
        done.add(f"{name}.weight")
        if module.bias is not None:
            module.bias = nn.Parameter(tensors(f"{name}.bias").to(dtype), requires_grad=False)
            done.add(f"{name}.bias")
    for key, param in list(model.named_parameters()) + list(model.named_buffers()):
        if key in done or param.device.type != "meta" or key not in tensors:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = tensors(key)
        value = value.to(dtype) if value.is_floating_point() else value
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}",
                                  file=directory, tensor=key, fix="check that config.json belongs to these weights")
        if isinstance(param, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value)
    if getattr(config, "tie_word_embeddings", False):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and emb is not None and head.weight.device.type == "meta":
            head.weight = emb.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise ValueError(f"{directory}: no tensor in the checkpoint for {left[:6]}{' ...' if len(left) > 6 else ''}")
    model.eval()
    logger.info("torchq.from_pretrained(%s): %s checkpoint, %d quantized linears", directory, importer.name, len(done) - sum(k.endswith(".bias") for k in done))
    return model

