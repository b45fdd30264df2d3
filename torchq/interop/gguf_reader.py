"""A fast GGUF reader: metadata parsed with ``struct`` over a memory map, tensors as views of it.

gguf-py's ``GGUFReader`` builds a numpy memmap slice for every element of every metadata array
(SmolLM2: a 49k-token vocabulary and 49k merges, ~7 s per parse). This reader walks the same
layout (gguf-py ``gguf_reader.py`` / ``constants.py``, GGUF v2 and v3, little-endian):

* ``"GGUF"``, version ``u32``, tensor count ``u64``, metadata count ``u64``;
* per metadata entry: key (``u64`` length + UTF-8 bytes), value type ``u32``, value; an array is
  its element type ``u32``, its count ``u64`` and the elements back to back;
* per tensor: name, ``n_dims`` ``u32`` (at most 4), ``n_dims`` ``u64`` dimensions (fastest
  first), ggml type ``u32``, data offset ``u64`` relative to the data section;
* the data section starts at the next multiple of ``general.alignment`` (``u32``, a power of two,
  default 32) after the tensor table.

Numeric arrays are read in bulk (``np.frombuffer``); string arrays (the vocabulary and merges) are
only walked to find their end and decoded when asked for (:meth:`GGUFReader.strings`). Tensor data
are read-only numpy views of the mapping (:attr:`GGUFTensor.data`, shaped like gguf-py's:
quantized types as ``(rows, bytes per row)`` uint8, F32/F16/... typed), so nothing is read until a
tensor is used; :meth:`GGUFReader.release` drops a used tensor's pages from the process's
resident set again (``madvise(MADV_DONTNEED)``; the data stay in the page cache). Every count,
length, type and offset is checked against the file before use: a damaged file raises
:class:`torchq.CheckpointError` naming the file, the entry and the problem.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from torchq.errors import CheckpointError

__all__ = ["GGUFReader", "GGUFTensor", "StringArray", "VALUE_TYPES", "SUPPORTED_VERSIONS", "DEFAULT_ALIGNMENT"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # gguf-py READER_SUPPORTED_VERSIONS (v1 counted in 32 bits)
DEFAULT_ALIGNMENT = 32  # gguf-py GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # ggml GGML_MAX_DIMS

#: GGUFValueType -> (name, struct format) of the fixed-size value types (8 string, 9 array)
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
#: ggml types stored as plain values (gguf-py's reader types them; all others are blocks of bytes)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}

_FIX = "the file is truncated or corrupt: re-download it (or re-export it with torchq.save_gguf)"


class StringArray:
    """A metadata array of strings, left in the file until asked for: ``len()``, indexing and
    iteration decode on demand; ``list(a)`` decodes all."""

    def __init__(self, reader: "GGUFReader", key: str, starts: np.ndarray, lengths: np.ndarray):
        self._reader, self._key, self._starts, self._lengths = reader, key, starts, lengths
        self._values: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self._starts)

    def tolist(self) -> list[str]:
        if self._values is None:
            buf, out = self._reader._buf, []
            for i, (s, n) in enumerate(zip(self._starts.tolist(), self._lengths.tolist())):
                try:
                    out.append(str(buf[s : s + n], "utf-8"))
                except UnicodeDecodeError:
                    raise CheckpointError(f"string {i} of metadata array {self._key!r} is not valid UTF-8",
                                          file=self._reader.path, fix=_FIX) from None
            self._values = out
        return self._values

    def __getitem__(self, i):
        return self.tolist()[i]

    def __iter__(self):
        return iter(self.tolist())

    def __repr__(self) -> str:
        return f"StringArray({self._key!r}, {len(self)} strings)"


@dataclass
class GGUFTensor:
    """One tensor's entry (gguf-py ``ReaderTensor`` names): ``shape`` in ggml order (fastest
    dimension first), ``data`` a read-only view of the file in numpy order."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    _reader: "GGUFReader"

    @property
    def tensor_type(self):
        """gguf-py's ``GGMLQuantizationType`` of the tensor."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id)

    @property
    def type_name(self) -> str:
        return self.tensor_type.name

    @property
    def data(self) -> np.ndarray:
        """Plain types typed and shaped ``reversed(shape)``; block types uint8 ``(..., bytes per row)``."""
        raw = np.frombuffer(self._reader._buf, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset)
        dims = tuple(reversed(self.shape))
        if self.type_id in _PLAIN:
            return raw.view(_PLAIN[self.type_id]).reshape(dims)
        rows = self.n_elements // self.shape[0] if self.shape[0] else 0
        return raw.reshape(*dims[:-1], self.n_bytes // rows if rows else 0)

    def release(self) -> None:
        """Drop this tensor's pages from the resident set (see :meth:`GGUFReader.release`)."""
        self._reader.release(self.data_offset, self.n_bytes)


class GGUFReader:
    """A GGUF file's metadata (:attr:`metadata`: key -> int / float / bool / str / numpy array /
    :class:`StringArray`, in file order) and tensor table (:attr:`tensors`), over one read-only
    memory map. Raises :class:`CheckpointError` for anything that is not a well-formed GGUF file."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:
                    raise CheckpointError(f"{self.size} bytes is too short for a GGUF header", file=self.path, fix=_FIX)
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"cannot map the file ({e})", file=self.path,
                                  fix="check that the path is a readable regular file") from e
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, tuple[int, ...]] = {}  # key -> (value type,) or (ARRAY, element type)
        self.tensors: list[GGUFTensor] = []
        self._parse()

    # ------------------------------------------------------------------ primitives
    def _need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.size:
            raise CheckpointError(f"the file ends inside {what} (needs bytes {pos}..{pos + n}, the file has {self.size})",
                                  file=self.path, fix=_FIX)

    def _unpack(self, fmt: str, pos: int, what: str):
        n = struct.calcsize(fmt)
        self._need(pos, n, what)
        return struct.unpack_from(fmt, self._buf, pos), pos + n

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        (n,), pos = self._unpack("<Q", pos, what)
        self._need(pos, n, what)
        try:
            return str(self._buf[pos : pos + n], "utf-8"), pos + n
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} is not valid UTF-8", file=self.path, fix=_FIX) from None

    def _value(self, vtype: int, pos: int, key: str):
        what = f"metadata value {key!r}"
        if vtype in VALUE_TYPES:
            (v,), pos = self._unpack(VALUE_TYPES[vtype][1], pos, what)
            return v, pos, (vtype,)
        if vtype == STRING:
            v, pos = self._string(pos, what)
            return v, pos, (vtype,)
        if vtype != ARRAY:
            raise CheckpointError(f"metadata entry {key!r} has value type {vtype}, which GGUF does not define",
                                  file=self.path, fix=_FIX)
        (etype, count), pos = self._unpack("<IQ", pos, what)
        if etype in VALUE_TYPES:
            width = struct.calcsize(VALUE_TYPES[etype][1])
            self._need(pos, count * width, what)
            arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=pos).copy()
            return arr, pos + count * width, (ARRAY, etype)
        if etype != STRING:
            raise CheckpointError(f"metadata array {key!r} has element type {etype}, which torchq does not read",
                                  file=self.path, fix=_FIX)
        self._need(pos, count * 8, what)  # every string has at least its length
        starts = np.empty(count, dtype=np.int64)
        lengths = np.empty(count, dtype=np.int64)
        buf, size, unpack = self._buf, self.size, struct.Struct("<Q").unpack_from
        for i in range(count):  # lengths only: the bytes are decoded on demand
            if pos + 8 > size:
                self._need(pos, 8, what)
            (n,) = unpack(buf, pos)
            pos += 8
            starts[i] = pos
            lengths[i] = n
            pos += n
        if pos > size:
            self._need(int(starts[-1]), int(lengths[-1]), what)
        return StringArray(self, key, starts, lengths), pos, (ARRAY, STRING)

    # ------------------------------------------------------------------ layout
    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._buf[:4]) != MAGIC:
            raise CheckpointError(f"no 'GGUF' magic (starts with {bytes(self._buf[:4])!r})", file=self.path,
                                  fix="pass a .gguf file, or a checkpoint directory")
        (version,), pos = self._unpack("<I", 4, "the header")
        if version & 0xFFFF == 0 and version:
            raise CheckpointError("a big-endian GGUF file, which torchq does not read", file=self.path,
                                  fix="convert it to little-endian with gguf-py's gguf_convert_endian.py")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"GGUF version {version}, this reader handles {list(SUPPORTED_VERSIONS)}",
                                  file=self.path, fix=_FIX)
        self.version = version
        (n_tensors, n_kv), pos = self._unpack("<QQ", pos, "the header")
        if n_kv * 12 > self.size or n_tensors * 24 > self.size:
            raise CheckpointError(f"the header counts {n_kv} metadata entries and {n_tensors} tensors, more than "
                                  f"a file of {self.size} bytes holds", file=self.path, fix=_FIX)
        for i in range(n_kv):
            key, pos = self._string(pos, f"metadata key {i}")
            (vtype,), pos = self._unpack("<I", pos, f"metadata entry {key!r}")
            value, pos, types = self._value(vtype, pos, key)
            if key in self.metadata:
                raise CheckpointError(f"metadata key {key!r} appears twice", file=self.path, fix=_FIX)
            self.metadata[key], self.types[key] = value, types
        infos = []
        for i in range(n_tensors):
            name, pos = self._string(pos, f"the name of tensor {i}")
            (n_dims,), pos = self._unpack("<I", pos, f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1..{MAX_DIMS})",
                                      file=self.path, fix=_FIX)
            dims, pos = self._unpack(f"<{n_dims}Q", pos, f"tensor {name!r}")
            (type_id, offset), pos = self._unpack("<IQ", pos, f"tensor {name!r}")
            infos.append((name, dims, type_id, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.types and (
            self.types["general.alignment"] != (4,) or alignment == 0 or alignment & (alignment - 1)
        ):
            raise CheckpointError(f"general.alignment {alignment!r} is not a power-of-two u32", file=self.path, fix=_FIX)
        self.alignment = int(alignment)
        self.data_offset = -(-pos // self.alignment) * self.alignment
        seen = set()
        for name, dims, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise CheckpointError(f"tensor {name!r} has ggml type {type_id}, which gguf-py does not know",
                                      file=self.path, fix="upgrade gguf (pip install -U gguf), or re-download the file") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims, dtype=object))
            if name in seen:
                raise CheckpointError(f"tensor {name!r} appears twice", file=self.path, fix=_FIX)
            seen.add(name)
            if dims[0] % block:
                raise CheckpointError(f"tensor {name!r} has rows of {dims[0]} values, not whole {qtype.name} blocks "
                                      f"of {block}", file=self.path, fix=_FIX)
            nbytes = n // block * type_size
            start = self.data_offset + offset
            if start + nbytes > self.size:
                raise CheckpointError(f"tensor {name!r} ({qtype.name} {list(dims)}) lies at bytes {start}..{start + nbytes}, "
                                      f"past the end of the file ({self.size} bytes)", file=self.path, fix=_FIX)
            self.tensors.append(GGUFTensor(name, type_id, tuple(int(d) for d in dims), n, nbytes, start, self))

    # ------------------------------------------------------------------ access
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError("no general.architecture string in the metadata", file=self.path, fix=_FIX)
        return arch

    def strings(self, key: str) -> list[str]:
        """A string array's values (decoded now)."""
        value = self.metadata[key]
        return value.tolist() if isinstance(value, StringArray) else list(value)

    def value(self, key: str, default=None):
        """A metadata value as plain Python (arrays as lists), or ``default``."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        if isinstance(v, StringArray):
            return v.tolist()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v

    def release(self, offset: int, nbytes: int) -> None:
        """Tell the kernel the pages of ``[offset, offset + nbytes)`` are not needed any more: they
        leave the process's resident set (reading them again maps them in again, from the page
        cache). No-op where ``madvise`` is unavailable."""
        if not hasattr(self._buf, "madvise") or sys.platform == "win32":  # pragma: no cover
            return
        page = mmap.PAGESIZE
        start = offset // page * page
        end = min(-(-(offset + nbytes) // page) * page, -(-self.size // page) * page)
        if end > start:
            self._buf.madvise(mmap.MADV_DONTNEED, start, end - start)
