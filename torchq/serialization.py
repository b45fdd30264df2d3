"""Checkpoints: ``torch.save``/``torch.load(weights_only=True)`` and safetensors.

Every quantized tensor class registers its *format* here (:func:`register_format`): a
format name, the class (which provides ``checkpoint_state()`` and
``from_checkpoint_state(state)``) and the rebuild function its pickles call. Registering
also allowlists the class and rebuild function for ``torch.load(weights_only=True)``, so
``import torchq`` is all a loader needs. Checkpoints always hold the canonical packing;
tensors repack for this machine's kernel when rebuilt.

Safetensors (:func:`save_file` / :func:`load_file`, mirroring ``safetensors.torch``): a
quantized entry ``key`` is stored as plain tensors ``key::qdata``, ``key::scale``, ... and
its non-tensor state (format name, version, shape, bits, ...) goes into the header under
``"torchq"``. Entries sharing one tensor (tied weights) are written once and restored as
the same object.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

import torch

__all__ = [
    "register_format",
    "registered_formats",
    "save_file",
    "load_file",
    "flatten_state_dict",
    "unflatten_state_dict",
    "read_header",
    "rebuild_entry",
    "HEADER_KEY",
    "SEPARATOR",
]

HEADER_KEY = "torchq"
SEPARATOR = "::"
CONTAINER_VERSION = 1

_FORMATS: dict[str, type] = {}


def register_format(name: str, cls: type, rebuild: Optional[Callable] = None, extra_safe: tuple = ()) -> None:
    """Make ``cls`` savable and ``weights_only``-loadable under format ``name``."""
    _FORMATS[name] = cls
    safe = [cls, *extra_safe]
    if rebuild is not None:
        safe.append(rebuild)
    torch.serialization.add_safe_globals(safe)


def registered_formats() -> dict[str, type]:
    return dict(_FORMATS)


def _split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, meta


def flatten_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors + a header describing the quantized entries (safetensors-ready)."""
    flat: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for key, value in state_dict.items():
        ident = _identity(value)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        if hasattr(value, "checkpoint_state"):
            tensors, meta = _split_state(value.checkpoint_state())
            meta["tensors"] = sorted(tensors)
            entries[key] = meta
            for name, t in tensors.items():
                flat[f"{key}{SEPARATOR}{name}"] = t.detach().contiguous()
        else:
            flat[key] = value.detach().contiguous()
    header = {"container_version": CONTAINER_VERSION, "entries": entries, "aliases": aliases}
    return flat, {HEADER_KEY: json.dumps(header, sort_keys=True)}


def _identity(value: torch.Tensor) -> Any:
    if hasattr(value, "checkpoint_state"):
        # state_dict() detaches each entry separately: tied entries are distinct wrappers
        # around the same inner storage, so compare the inner data, not the wrapper.
        inner = getattr(value, value.tensor_fields[0])
        return ("q", type(value).__name__, inner.data_ptr(), tuple(value.shape))
    if value.device.type == "meta" or value.numel() == 0:
        return ("t", id(value))
    return ("t", value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)


def unflatten_state_dict(flat: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state_dict`."""
    header = read_header(metadata)
    if header is None:
        return dict(flat)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for key, meta in header["entries"].items():
        tensors = {}
        for name in meta["tensors"]:
            fk = f"{key}{SEPARATOR}{name}"
            if fk not in flat:
                raise ValueError(f"{key}: file is missing tensor {fk!r}")
            tensors[name] = flat[fk]
            consumed.add(fk)
        out[key] = rebuild_entry(key, meta, tensors)
    for key, t in flat.items():
        # A plain tensor under an entry's own name is a guard (written by the transformers
        # integration so that loading without torchq fails), not data.
        if key not in consumed and key not in header["entries"]:
            out[key] = t
    for key, target in header.get("aliases", {}).items():
        out[key] = out[target]
    return out


def read_header(metadata: Optional[Mapping[str, str]]) -> Optional[dict[str, Any]]:
    """The torchq header of a safetensors file's metadata (None if the file has none)."""
    if not metadata or HEADER_KEY not in metadata:
        return None
    header = json.loads(metadata[HEADER_KEY])
    if header.get("container_version") != CONTAINER_VERSION:
        raise ValueError(
            f"torchq safetensors container version {header.get('container_version')} is not supported "
            f"(this torchq reads {CONTAINER_VERSION}); upgrade torchq"
        )
    return header


def rebuild_entry(key: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One quantized tensor from its header entry ``meta`` and its inner ``tensors`` by name."""
    fmt = meta.get("format")
    if fmt not in _FORMATS:
        raise ValueError(f"{key}: unknown torchq tensor format {fmt!r}; known: {sorted(_FORMATS)}")
    missing = sorted(set(meta["tensors"]) - set(tensors))
    if missing:
        raise ValueError(f"{key}: checkpoint is missing inner tensor(s) {missing}")
    state = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k != "tensors"}
    for name in meta["tensors"]:
        state[name] = tensors[name]
    try:
        return _FORMATS[fmt].from_checkpoint_state(state)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}: {e}") from e


def save_file(state_dict: Mapping[str, torch.Tensor], filename: str, metadata: Optional[dict[str, str]] = None) -> None:
    """Like ``safetensors.torch.save_file``, but quantized tensors are allowed."""
    from safetensors.torch import save_file as _save

    flat, header = flatten_state_dict(state_dict)
    merged = dict(metadata or {})
    merged.update(header)
    _save(flat, filename, metadata=merged)


def load_file(filename: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Like ``safetensors.torch.load_file``; rebuilds torchq tensors from the header."""
    from safetensors import safe_open

    with safe_open(filename, framework="pt", device=device) as f:
        metadata = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten_state_dict(flat, metadata)
