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

Hostile or damaged files: the header also holds a CRC-32 of every tensor's bytes, checked on
load, and every quantized entry is validated against its metadata before any kernel sees it;
whatever does not fit raises :class:`torchq.CheckpointError` naming the file and the tensor.
:func:`save_file` writes a temporary file in the target folder and renames it, so a failed
or killed save leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
import zlib
from typing import Any, Callable, Mapping, Optional

import torch

from torchq.errors import CheckpointError

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
    "CheckpointError",
    "atomic_write",
    "rebuild_checked",
    "tensor_crc32",
    "check_crc32",
]

HEADER_KEY = "torchq"
SEPARATOR = "::"
CONTAINER_VERSION = 1

_FORMATS: dict[str, type] = {}


def register_format(
    name: str, cls: type, rebuild: Optional[Callable] = None, extra_safe: tuple = (), pickle_module: Optional[str] = None
) -> None:
    """Make ``cls`` savable and ``weights_only``-loadable under format ``name``.

    ``pickle_module``: the module path ``torch.save`` writes for ``rebuild``. Pickled
    checkpoints name the function by that path, so it is part of the checkpoint format and
    stays fixed when the code moves (see :func:`_pin_pickle_module`)."""
    _FORMATS[name] = cls
    safe = [cls, *extra_safe]
    if rebuild is not None:
        if pickle_module is not None:
            _pin_pickle_module(rebuild, pickle_module)
        safe.append(rebuild)
    torch.serialization.add_safe_globals(safe)


def _pin_pickle_module(fn: Callable, module: str) -> None:
    """Pickle ``fn`` as ``module.<name>`` and make that path resolve to ``fn``'s real module,
    for ``torch.load`` with and without ``weights_only``: checkpoints written before and
    after a move name the same function."""
    real = sys.modules[fn.__module__]
    known = sys.modules.setdefault(module, real)
    if known is not real:
        raise RuntimeError(f"pickle module name {module!r} is taken by {known!r}; pick another for {fn.__qualname__}")
    fn.__module__ = module


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
    # crc32_complete: the table lists every tensor of the file (a single-file container); a
    # sharded save (transformers) lists more than each shard holds, and may add plain tensors
    header = {"container_version": CONTAINER_VERSION, "entries": entries, "aliases": aliases,
              "crc32": {name: tensor_crc32(t) for name, t in flat.items()}, "crc32_complete": True}
    return flat, {HEADER_KEY: json.dumps(header, sort_keys=True)}


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes (row-major), as stored in the header: a
    reinterpreted dtype or shape fails it as surely as changed data."""
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel() == 0 or t.device.type == "meta":
        return crc
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data), crc)


def _identity(value: torch.Tensor) -> Any:
    if hasattr(value, "checkpoint_state"):
        # state_dict() detaches each entry separately: tied entries are distinct wrappers
        # around the same inner storage, so compare the inner data, not the wrapper.
        inner = getattr(value, value.tensor_fields[0])
        return ("q", type(value).__name__, inner.data_ptr(), tuple(value.shape))
    if value.device.type == "meta" or value.numel() == 0:
        return ("t", id(value))
    return ("t", value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)


def unflatten_state_dict(
    flat: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]], file: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state_dict` (``file`` names the source in errors)."""
    header = read_header(metadata, file)
    if header is None:
        inner = sorted(k for k in flat if SEPARATOR in k)
        if inner:
            raise CheckpointError(
                f"inner tensors of quantized weights ({inner[0]!r}, ...) but no torchq header in the metadata", file=file
            )
        return dict(flat)
    _check_crc(flat, header, file)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    entries = header["entries"]
    if not isinstance(entries, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("tensors"), list) and all(isinstance(n, str) for n in m["tensors"])
        for m in entries.values()
    ):
        raise CheckpointError("the torchq header's entries are malformed", file=file)
    for key, meta in entries.items():
        tensors = {}
        for name in meta["tensors"]:
            fk = f"{key}{SEPARATOR}{name}"
            if fk not in flat:
                raise CheckpointError(f"the file is missing inner tensor {fk!r}", file=file, tensor=key)
            tensors[name] = flat[fk]
            consumed.add(fk)
        try:
            out[key] = rebuild_entry(key, meta, tensors)
        except CheckpointError as e:
            raise e.located(file=file) from e
    for key, t in flat.items():
        # A plain tensor under an entry's own name is a guard (written by the transformers
        # integration so that loading without torchq fails), not data.
        if key not in consumed and key not in header["entries"]:
            out[key] = t
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict):
        raise CheckpointError("the torchq header's aliases are malformed", file=file)
    for key, target in aliases.items():
        if target not in out:
            raise CheckpointError(f"alias of missing entry {target!r}", file=file, tensor=key)
        out[key] = out[target]
    return out


def _check_crc(flat: Mapping[str, torch.Tensor], header: Mapping[str, Any], file: Optional[str]) -> None:
    """Every tensor listed in the header's CRC table is present and has its bytes (files
    written before the table existed have none: nothing to check)."""
    table = header.get("crc32")
    if ("crc32" in header) != ("crc32_complete" in header):  # written together, or (older files) not at all
        raise CheckpointError("the torchq header's checksum fields are damaged", file=file)
    if table is None:
        return
    complete = header["crc32_complete"]
    if not isinstance(table, dict) or not isinstance(complete, bool):
        raise CheckpointError("the torchq header's checksum table is malformed", file=file)
    for name, t in flat.items():
        if name not in table:
            if complete or SEPARATOR in name:  # inner tensors of quantized weights are always listed
                raise CheckpointError("tensor not listed in the header's checksum table", file=file, tensor=name)
            continue
        check_crc32(t, table[name], name, file)
    missing = sorted(set(table) - set(flat))
    if complete and missing:
        raise CheckpointError(f"tensors listed in the header are missing: {missing[:5]}", file=file)


def check_crc32(t: torch.Tensor, expected: Any, name: str, file: Optional[str] = None) -> None:
    """Raise CheckpointError unless ``t``'s dtype, shape and bytes have CRC-32 ``expected``."""
    if tensor_crc32(t) != expected:
        raise CheckpointError("data does not match its checksum (the file is damaged)", file=file, tensor=name)


def read_header(metadata: Optional[Mapping[str, str]], file: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The torchq header of a safetensors file's metadata (None if the file has none)."""
    if not metadata or HEADER_KEY not in metadata:
        return None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the torchq header is not valid JSON ({e})", file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError("the torchq header is not a JSON object", file=file)
    if header.get("container_version") != CONTAINER_VERSION:
        raise CheckpointError(
            f"torchq safetensors container version {header.get('container_version')!r} is not supported "
            f"(this torchq reads {CONTAINER_VERSION})", file=file, fix="upgrade torchq, or re-save the checkpoint"
        )
    if "entries" not in header:
        raise CheckpointError("the torchq header has no entries table", file=file)
    return header


def rebuild_entry(key: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One quantized tensor from its header entry ``meta`` and its inner ``tensors`` by name."""
    fmt = meta.get("format")
    if not isinstance(fmt, str) or fmt not in _FORMATS:
        raise CheckpointError(f"unknown torchq tensor format {fmt!r}; known: {sorted(_FORMATS)}", tensor=key,
                              fix="upgrade torchq, or import the package that registers this format")
    missing = sorted(set(meta["tensors"]) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint is missing inner tensor(s) {missing}", tensor=key)
    state = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k != "tensors"}
    for name in meta["tensors"]:
        state[name] = tensors[name]
    return rebuild_checked(_FORMATS[fmt].from_checkpoint_state, state, key)


def rebuild_checked(build: Callable[[dict], torch.Tensor], state: dict, key: Optional[str] = None) -> torch.Tensor:
    """``build(state)``, any failure of a damaged or contradictory state as a CheckpointError
    (metadata of the wrong type, missing fields, shapes that do not fit, bad values)."""
    try:
        return build(state)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, ArithmeticError) as e:
        problem = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(problem, tensor=key) from e


def save_file(state_dict: Mapping[str, torch.Tensor], filename: str, metadata: Optional[dict[str, str]] = None) -> None:
    """Like ``safetensors.torch.save_file``, but quantized tensors are allowed."""
    from safetensors.torch import save_file as _save

    flat, header = flatten_state_dict(state_dict)
    merged = dict(metadata or {})
    merged.update(header)
    atomic_write(filename, lambda tmp: _save(flat, tmp, metadata=merged))


def atomic_write(filename: str, write: Callable[[str], None]) -> None:
    """``write(path)`` to a temporary file in ``filename``'s folder, flushed to disk, then
    renamed over ``filename``: a failure (full disk, killed process) never leaves a partial
    file under the real name, and the previous file stays intact until the rename."""
    folder = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(folder, f".{os.path.basename(filename)}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()
    try:
        write(tmp)
        # the permissions open() would give (safetensors creates its files 0600), or the old file's
        os.chmod(tmp, os.stat(filename).st_mode & 0o7777 if os.path.exists(filename) else 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_file(filename: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Like ``safetensors.torch.load_file``; rebuilds torchq tensors from the header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(filename, framework="pt", device=device) as f:
            metadata = f.metadata()
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"not a readable safetensors file ({type(e).__name__}: {e})", file=str(filename),
                              fix="the file is truncated or corrupt: re-download or re-save it") from e
    return unflatten_state_dict(flat, metadata, file=str(filename))
