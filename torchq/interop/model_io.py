"""Loading and saving whole causal LMs for the CLI, the demo and the real-model tests.

A *model source* is one of

* a GGUF file (``*.gguf``): :mod:`torchq.interop.gguf` (quantized blocks kept, or all
  dequantized with ``keep_quantized=False``);
* a directory saved by :func:`save_quantized` (torchq checkpoint);
* a transformers model directory (``config.json`` + weights): ``from_pretrained``.

Saving: :func:`save_quantized` writes ``model.safetensors`` with :func:`torchq.save_file`
(quantized tensors in torchq's canonical format), ``config.json`` with a ``"torchq"`` entry
saying so, the generation config and the tokenizer.

TODO(lead): when the transformers integration (branch ``hf``) merges, make
:func:`save_quantized` call ``model.save_pretrained`` and :func:`load_model` of such a
directory call ``AutoModelForCausalLM.from_pretrained``; these two functions are the only
places that need to change (the CLI, demo and tests call nothing else).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from torchq.formats.serialization import load_file, save_file
from torchq.formats.base import TorchqTensor

__all__ = ["LoadedModel", "load_model", "save_quantized", "model_size_bytes", "is_torchq_dir", "is_gguf_source"]

WEIGHTS_NAME = "model.safetensors"
MARKER = "torchq"
MARKER_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # gguf | torchq | transformers
    report: Optional[object] = None  # GGUFImportReport for GGUF sources
    extra: dict = field(default_factory=dict)


def is_gguf_source(source: str) -> bool:
    """A ``.gguf`` path that is not a directory (a missing file then gets the GGUF loader's error)."""
    return os.fspath(source).endswith(".gguf") and not os.path.isdir(source)


def is_torchq_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return MARKER in json.load(f)


def load_model(
    source: str, *, dtype: torch.dtype = torch.float32, keep_quantized: bool = True, gguf_file=None
) -> LoadedModel:
    """Load a model source (see the module docstring) in ``eval()`` mode, with its tokenizer.

    ``keep_quantized=False`` gives the float model (GGUF: every tensor dequantized).
    ``gguf_file`` may pass an already parsed :class:`torchq.interop.gguf.GGUFFile`.
    """
    source = os.fspath(source)
    if gguf_file is not None or is_gguf_source(source):
        from torchq.interop.gguf import GGUFFile

        f = gguf_file or GGUFFile(source)
        model, report = f.model(dtype=dtype, keep_quantized=keep_quantized)
        return LoadedModel(model, f.tokenizer(), "gguf", report)
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"model source {source!r} is neither a .gguf file nor a directory (a transformers model directory "
            "with config.json, or a directory written by `torchq quantize`)"
        )
    if is_torchq_dir(source):
        if not keep_quantized:
            raise ValueError(f"{source} holds a quantized torchq checkpoint; there is no float model in it")
        return LoadedModel(_load_torchq_dir(source, dtype), _tokenizer(source), "torchq")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.eval()
    return LoadedModel(model, _tokenizer(source), "transformers")


def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _load_torchq_dir(directory: str, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    marker = getattr(config, MARKER, None) or {}
    if marker.get("version") != MARKER_VERSION:
        raise ValueError(
            f"{directory}: torchq checkpoint marker version {marker.get('version')!r} is not supported "
            f"(this torchq reads {MARKER_VERSION}); upgrade torchq"
        )
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if leftovers:
        raise ValueError(f"{directory}: no weights for {leftovers[:5]}")
    model.eval()
    return model


def save_quantized(
    model: nn.Module, tokenizer, out_dir: str, *, quant_config=None, source: Optional[str] = None
) -> str:
    """Write ``model`` (quantized or not) and ``tokenizer`` to ``out_dir``; returns the weights path.

    ``quant_config`` (a torchq config) and ``source`` are recorded in ``config.json`` for
    the reader's information; loading needs neither (each tensor's format is in the file).
    """
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_NAME)
    save_file(model.state_dict(), weights, metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config[MARKER] = {
        "version": MARKER_VERSION,
        "weights": WEIGHTS_NAME,
        "format": "torchq.save_file",
        "quant_config": quant_config.to_dict() if quant_config is not None else None,
        "source": os.path.basename(source) if source else None,
    }
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return weights


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors counted once; torchq weights
    count their stored (quantized) bytes."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes_quantized if isinstance(t, TorchqTensor) else t.numel() * t.element_size()
    return total
