"""``torchq.from_pretrained``: any supported quantized checkpoint as a transformers model on
torchq's CPU kernels, with no gptqmodel / autoawq / IPEX.

The source's kind is detected from the path and its config, then dispatched through
:data:`LOADERS`: a ``.gguf`` file (or its magic bytes), a directory whose config.json /
quantize_config.json / quant_config.json names GPTQ, AWQ or compressed-tensors
(:mod:`torchq.interop.checkpoint`: meta skeleton, lazy per-tensor reads), torchq's own
checkpoint (``quant_method: "torchq"``, or the older ``torchq`` marker), or a float directory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch import nn

from torchq.interop.checkpoint import detect_format, load_quantized_dir, read_quantization_config

__all__ = ["from_pretrained", "detect_source", "LOADERS", "load_tokenizer"]

GGUF_MAGIC = b"GGUF"


def _is_gguf_file(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def detect_source(path: str) -> str:
    """``"gguf"``, ``"torchq"``, ``"torchq-legacy"``, ``"float"`` or an importer name (gptq, awq, compressed-tensors)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if _is_gguf_file(path) or path.endswith(".gguf"):
            return "gguf"  # a damaged .gguf gets the GGUF reader's CheckpointError
        raise ValueError(f"{path} is a file but not a GGUF file (no 'GGUF' magic); pass a checkpoint directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected a directory with config.json or a .gguf file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; is it a transformers checkpoint directory?")
    from torchq.interop.model_io import is_torchq_dir

    if is_torchq_dir(path):
        return "torchq-legacy"
    qcfg = read_quantization_config(path)
    if qcfg and str(qcfg.get("quant_method", "")).lower() == "torchq":
        return "torchq"
    return detect_format(qcfg) or "float"


def _load_gguf(path, dtype, **kw):
    from torchq.interop.gguf import load_gguf

    return load_gguf(path, dtype=dtype, **kw)


def _load_foreign(path, dtype, **kw):
    return load_quantized_dir(path, read_quantization_config(path), dtype=dtype, **kw)


def _load_transformers(path, dtype, **kw):
    from transformers import AutoModelForCausalLM

    from torchq import integrations  # noqa: F401  (registers quant_method "torchq")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    _release_file_mapping(model)
    return model.eval()


def _release_file_mapping(model: nn.Module) -> None:
    """Copy the plain (unquantized) parameters of a quantized model out of the checkpoint.

    transformers loads safetensors through a private mapping of the file, and a plain tensor
    (a norm weight) is a view into it: one such view keeps every page of the file resident,
    although the quantized codes were already copied into their kernel layouts (SmolLM2 int4:
    84 MB of RSS for nothing). The copies are the model's float tensors only (a float
    embedding is most of SmolLM2's int4 size), made chunk by chunk so the file's pages and
    the copy are never both resident in full."""
    from torchq.formats import TorchqTensor
    from torchq.memory import copy_out_of_file

    params = list(model.named_parameters())
    if not any(isinstance(p, TorchqTensor) for _, p in params):
        return  # a float model: its tensors are the file's pages, nothing to gain
    with torch.no_grad():
        for _, p in params:
            if not isinstance(p, TorchqTensor):
                p.data = copy_out_of_file(p.data)


def _load_legacy(path, dtype, **kw):
    from torchq.interop.model_io import load_model

    return load_model(path, dtype=dtype).model


#: source kind -> loader(path, dtype, **config_overrides)
LOADERS: dict[str, Callable[..., nn.Module]] = {
    "gguf": _load_gguf,
    "gptq": _load_foreign,
    "awq": _load_foreign,
    "compressed-tensors": _load_foreign,
    "torchq": _load_transformers,
    "torchq-legacy": _load_legacy,
    "float": _load_transformers,
}


def from_pretrained(path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides) -> nn.Module:
    """Load ``path`` (a GPTQ v1/v2, AutoAWQ gemm/gemv, compressed-tensors or torchq
    directory, or a ``.gguf`` file) as a transformers causal LM in ``eval()`` mode whose
    quantized Linear weights are torchq tensors holding the file's codes and scales exactly.

    ``dtype`` is the compute dtype of activations and unquantized weights; ``overrides`` go to
    the transformers config (e.g. ``attn_implementation="sdpa"``) for every source, GGUF
    included; one that no config attribute takes raises ``TypeError``. Only ``device="cpu"``.
    """
    if str(device) != "cpu":
        raise ValueError(f"torchq.from_pretrained loads onto the CPU only, got device={device!r}; move the model afterwards")
    kind = detect_source(path)
    with _one_thread():
        return LOADERS[kind](os.fspath(path), dtype, **overrides)


@contextlib.contextmanager
def _one_thread():
    """Convert tensors with one intra-op thread. Loading runs thousands of small elementwise
    ops (repacking into kernel layouts); on a busy host torch's thread pool makes them ~30x
    slower (SmolLM2: 33 s of repacking with 2 threads, 1 s with 1), and a single tensor is too
    small to gain from threads anyway. The caller's setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_tokenizer(path: str):
    """The tokenizer stored with a checkpoint (directory files or GGUF), or None if it has none."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isfile(path) and _is_gguf_file(path):
        from torchq.interop.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    return AutoTokenizer.from_pretrained(path)
