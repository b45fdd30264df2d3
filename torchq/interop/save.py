"""``torchq.save_pretrained``: write a torchq-quantized transformers model as a checkpoint
directory another runtime loads (AutoAWQ gemm/gemv, GPTQ, compressed-tensors) or as torchq's own.

:data:`EXPORTERS` maps a format name to how one Linear is written and which
``quantization_config`` describes the whole model. Quantized Linear weights are converted
per tensor (:func:`~torchq.interop.intweight.from_torchq`: codes unchanged; AWQ/GPTQ store
fp16 scales, so fp32 scales are rounded to fp16, compressed-tensors keeps them), every other
parameter is written as is (a quantized embedding is written dequantized, which is exact:
these formats have no quantized embedding). Shards are safetensors with an index.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from torchq.interop import awq, compressed_tensors, gptq
from torchq.interop.intweight import IntWeight, from_torchq
from torchq.formats.serialization import atomic_write
from torchq.formats.affine.tensor import AffineQuantizedTensor
from torchq.formats.base import TorchqTensor

__all__ = ["save_pretrained", "EXPORTERS", "Exporter", "FORMAT_NAMES", "write_shards"]

logger = logging.getLogger("torchq")

_WEIGHT_ONLY = ("int4_weight_only", "int8_weight_only", "intx_weight_only")


@dataclass(frozen=True)
class Exporter:
    """One export format: ``write(w, prefix, scheme, options)`` -> tensors of a Linear;
    ``config(weights {name: (w, scheme)}, unquantized linear names, options)`` -> quantization_config."""

    name: str
    schemes: tuple[str, ...]
    scale_dtype: Optional[torch.dtype]
    write: Callable[[IntWeight, str, str, Mapping], dict[str, torch.Tensor]]
    config: Callable[[Mapping[str, tuple[IntWeight, str]], list[str], Mapping], dict]
    extra_files: Callable[[dict], dict[str, dict]] = lambda qcfg: {}


def _gptq_write(w, prefix, scheme, opts):
    return gptq.write_gptq(w, prefix, {"checkpoint_format": opts.get("checkpoint_format", "gptq")})


def _gptq_config(weights, unquantized, opts):
    qcfg = gptq.gptq_config({n: w for n, (w, _) in weights.items()}, opts.get("checkpoint_format", "gptq"))
    skipped = [n for n in unquantized if n != "lm_head"]
    if skipped:  # GPTQModel's per-module rules: "-:" excludes a module
        qcfg["dynamic"] = {f"-:^{n.replace('.', '[.]')}$": {} for n in skipped}
    return qcfg


def _awq_exporter(version: str) -> Exporter:
    def write(w, prefix, scheme, opts):
        return awq.write_awq(w, prefix, {"version": version})

    def config(weights, unquantized, opts):
        qcfg = awq.awq_config({n: w for n, (w, _) in weights.items()}, version)
        qcfg["modules_to_not_convert"] = [n for n in unquantized if n != "lm_head"] or None
        return qcfg

    return Exporter(f"awq-{version}", ("int4_weight_only",), torch.float16, write, config)


def _ct_format(scheme: str) -> str:
    return "int-quantized" if scheme == "w8a8" else "pack-quantized"


def _ct_write(w, prefix, scheme, opts):
    return compressed_tensors.write_ct(w, prefix, _ct_format(scheme))


def _ct_config(weights, unquantized, opts):
    groups: dict[str, list] = {}
    for name, (w, scheme) in weights.items():
        wargs = compressed_tensors.weight_args(w)
        act = dict(compressed_tensors.INT8_TOKEN_ACTIVATIONS) if scheme in ("w8a8", "w4a8") else None
        key = json.dumps([wargs, act, _ct_format(scheme)], sort_keys=True)
        groups.setdefault(key, [wargs, act, _ct_format(scheme), []])[3].append(name)
    formats = {g[2] for g in groups.values()}
    single = len(groups) == 1
    table = {
        f"group_{i}": (wargs, act, ["Linear"] if single else names) for i, (wargs, act, fmt, names) in enumerate(groups.values())
    }
    qcfg = compressed_tensors.ct_config(table, list(unquantized) if single else [], formats.pop() if len(formats) == 1 else "mixed-precision")
    for i, g in enumerate(groups.values()):
        qcfg["config_groups"][f"group_{i}"]["format"] = g[2]
    return qcfg


def _gptq_extra(qcfg: dict) -> dict[str, dict]:
    return {"quantize_config.json": qcfg}


EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter("gptq", _WEIGHT_ONLY, torch.float16, _gptq_write, _gptq_config, _gptq_extra),
        _awq_exporter("gemm"),
        _awq_exporter("gemv"),
        Exporter("compressed-tensors", _WEIGHT_ONLY + ("w8a8", "w4a8"), None, _ct_write, _ct_config),
    )
}
FORMAT_NAMES = ("torchq",) + tuple(EXPORTERS)


def write_shards(tensors: Mapping[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """safetensors shards of at most ``max_shard_bytes`` (a tensor is never split), with
    ``model.safetensors.index.json`` when there is more than one."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, fname in zip(shards, names):
        atomic_write(os.path.join(out_dir, fname), lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {n: fname for shard, fname in zip(shards, names) for n in shard},
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def _float_value(name: str, t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, TorchqTensor):
        logger.info("torchq.save_pretrained: %s written dequantized (the format has no quantized form for it)", name)
        return t.dequantize()
    return t


def save_pretrained(
    model: nn.Module,
    out_dir: str,
    format: str = "torchq",
    *,
    tokenizer: Any = None,
    max_shard_size="2GB",
    checkpoint_format: str = "gptq",
) -> str:
    """Write ``model`` (quantized with torchq, or imported) to ``out_dir`` in ``format``.

    ``format``: ``"torchq"`` (torchq's own checkpoint; every scheme), ``"gptq"`` (4/8-bit
    weight-only, act-order kept; ``checkpoint_format="gptq_v2"`` for v2 zero points),
    ``"awq-gemm"`` / ``"awq-gemv"`` (4-bit weight-only, integer zero point), or
    ``"compressed-tensors"`` (4/8-bit weight-only, W8A8, W4A8). A weight the format cannot hold
    raises a ValueError naming the torchq config that it could hold. Returns ``out_dir``.
    ``format="torchq"`` goes through transformers' ``save_pretrained`` and marks ``model`` as a
    torchq-quantized transformers model (:func:`torchq.integrations.transformers.mark_quantized`).
    """
    if format not in FORMAT_NAMES:
        raise ValueError(f"unknown format {format!r}; choose one of {list(FORMAT_NAMES)}")
    os.makedirs(out_dir, exist_ok=True)
    if format == "torchq":
        _save_torchq(model, out_dir, max_shard_size)
    else:
        _save_foreign(model, out_dir, EXPORTERS[format], {"checkpoint_format": checkpoint_format}, _parse_size(max_shard_size))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _save_torchq(model: nn.Module, out_dir: str, max_shard_size) -> None:
    from torchq.integrations.transformers import QUANT_METHOD, mark_quantized

    if getattr(model, "quantization_method", None) != QUANT_METHOD:
        mark_quantized(model)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)


def _save_foreign(model: nn.Module, out_dir: str, exporter: Exporter, opts: Mapping, max_shard_bytes: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, tuple[IntWeight, str]] = {}
    unquantized: list[str] = []
    handled: set[str] = set()
    # a head tied to the embedding is not written: the loader ties it again (to the
    # embedding, written dequantized when torchq quantized the shared tensor: same values)
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied_head = {n for n, m in model.named_modules() if tie and head is not None and m is head}
    if tied_head and emb is not None and head.weight is not emb.weight:
        tied_head = set()  # config says tied but the model holds two tensors: write both
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in tied_head:
            continue
        weight = module.weight
        if not isinstance(weight, AffineQuantizedTensor):
            unquantized.append(name)
            continue
        w = from_torchq(weight, what=name, schemes=exporter.schemes, scale_dtype=exporter.scale_dtype)
        tensors.update(exporter.write(w, name, weight.scheme, opts))
        weights[name] = (w, weight.scheme)
        handled.add(f"{name}.weight")
    unquantized.extend(sorted(tied_head))
    if not weights:
        raise ValueError(f"the model has no torchq-quantized Linear weight to write as {exporter.name}; quantize it first")
    for key, value in model.state_dict().items():
        if key in handled or key.rpartition(".")[0] in tied_head:
            continue
        tensors[key] = _float_value(key, value)
    qcfg = exporter.config(weights, unquantized, opts)
    write_shards(tensors, out_dir, max_shard_bytes)
    config = model.config.to_dict()
    for k in ("torchq", "quantization_config"):
        config.pop(k, None)
    # as transformers' save_pretrained does: a model built from a config (or a GGUF file) has
    # architectures=None, and loaders that pick the class from it (vLLM) then guess wrong
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qcfg
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for fname, content in exporter.extra_files(qcfg).items():
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
