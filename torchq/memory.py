"""Give memory back to the OS while quantizing a model that streams in (Linux; no-ops elsewhere).

Two things keep a process's resident size high after a float tensor has been quantized
and dropped, even though nothing uses the memory any more:

* the C allocator (glibc) keeps freed temporaries in its heap: :func:`release_free_memory`
  calls ``malloc_trim``;
* safetensors hands out tensors that are views of a memory-mapped checkpoint, and every
  page that was read stays resident (and counted in RSS) until the whole file is unmapped,
  i.e. the whole float checkpoint: :func:`release_file_pages` drops the pages of one
  consumed tensor (``madvise(MADV_DONTNEED)``; a later read would fault them back in from
  the file, so this never loses data). It acts only on tensors that lie in a file-backed
  mapping and only on pages that lie wholly inside the tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from typing import Optional

import torch

__all__ = ["available_memory", "release_free_memory", "release_file_pages", "copy_out_of_file"]

_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def available_memory() -> Optional[int]:
    """Bytes of memory the OS can give this process now (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Return memory freed by the C allocator to the OS (glibc ``malloc_trim``)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the resident pages of ``t`` if it is a contiguous CPU view of a file mapping.

    Call it only for a tensor whose values are no longer needed from this memory (e.g. a
    float weight that has been quantized); the file still holds them. Returns whether
    anything was released.
    """
    if type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return False
    return _mapped_from_file(t) and _drop_pages(t)


def copy_out_of_file(t: torch.Tensor, chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """A copy of ``t`` in ordinary memory; if ``t`` is a view of a file mapping, the copy is
    made ``chunk_bytes`` at a time and each chunk's file pages are dropped once copied.

    A plain ``clone()`` of a mapped tensor faults the whole tensor in before the copy is
    complete, so for a moment both the file's pages and the copy are resident (a tied
    SmolLM2 embedding: 113 MB twice). Chunking bounds that overlap to one chunk.
    """
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous() or not _mapped_from_file(t):
        return out.copy_(t)
    src, dst = t.reshape(-1), out.view(-1)
    step = max(1, chunk_bytes // t.element_size())
    for i in range(0, src.numel(), step):
        dst[i : i + step].copy_(src[i : i + step])
        _drop_pages(src[i : i + step])
    return out


def _page_range(t: torch.Tensor) -> tuple[int, int]:
    """The whole pages inside ``t``'s bytes (empty when none)."""
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return -(-start // page) * page, (end // page) * page


def _mapped_from_file(t: torch.Tensor) -> bool:
    lo, hi = _page_range(t)
    return hi > lo and _in_file_mapping(lo, hi)


def _drop_pages(t: torch.Tensor) -> bool:
    libc = _libc()
    lo, hi = _page_range(t)
    if libc is None or getattr(libc, "madvise", None) is None or hi <= lo:
        return False
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED)) == 0


def _in_file_mapping(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` lies inside one mapping of a regular file (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, _, stop = fields[0].partition("-")
                if int(start, 16) <= lo and hi <= int(stop, 16):
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return path.startswith("/") and not path.startswith("/dev/") and not path.endswith("(deleted)")
    except OSError:
        pass
    return False
