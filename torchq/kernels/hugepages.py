"""Huge-page placement of the packed kernel-layout weights.

An M=1 (decode) GEMV streams each packed weight once from DRAM. In ordinary 4 KiB pages
that stream takes a TLB miss every 4 KiB and the hardware prefetchers stop at every page
boundary; measured on the AVX2 dev host, DRAM read bandwidth is ~28 GB/s in 4 KiB pages
and ~50 GB/s in transparent huge pages. :func:`empty_huge` allocates a CPU tensor in
memory that is ``madvise(MADV_HUGEPAGE)``'d before first touch
(``torch.ops.torchq._empty_huge``, csrc/ops.cpp), and the tiled layouts
(:mod:`torchq.kernels.cpu_layouts`) build their packed tensors in it:

* from 2 MiB: a mapping of its own, starting on a 2 MiB boundary;
* from :data:`HUGE_MIN_BYTES` (16 KiB) to 2 MiB: carved from a shared 16 MiB arena chunk
  (2 MiB aligned), so that a small model's many small weights share huge pages. A chunk is
  unmapped once every tensor carved from it is freed and the arena has moved on to a newer
  chunk; the memory of a freed tensor is not reused before that.

It is a placement hint only: values, shapes and dtypes are those of ``torch.empty``.
Documented fallback to a plain ``torch.empty`` tensor (silently, by design): not Linux,
the C++ extension not available, fewer than :data:`HUGE_MIN_BYTES` bytes, a non-CPU
device, or ``mmap`` failing. With ``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``never`` the memory is allocated the same way but the kernel backs it with 4 KiB pages.
Copies made later (``.clone()``, ``.to()``, ``copy.deepcopy``) are ordinary allocations;
loading a checkpoint repacks through the layouts, so loaded weights get huge pages too.
``TORCHQ_HUGEPAGES=0`` turns the placement off.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

__all__ = ["HUGE_MIN_BYTES", "enabled", "empty_huge", "thp_mode", "huge_bytes"]

#: smaller tensors are allocated with ``torch.empty`` (csrc/ops.cpp ``kArenaMin``)
HUGE_MIN_BYTES = 16 << 10


def enabled() -> bool:
    """Whether :func:`empty_huge` uses huge-page placement in this process."""
    if not sys.platform.startswith("linux") or os.environ.get("TORCHQ_HUGEPAGES", "1") == "0":
        return False
    from torchq.kernels import cpu_ext

    return cpu_ext.available()


def empty_huge(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, in huge-page-backed memory when
    possible (see the module docstring for when it falls back to ``torch.empty``)."""
    shape = tuple(int(s) for s in shape)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.ops.torchq._empty_huge(list(shape), dtype)


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), or
    ``unavailable`` (not Linux, or no THP support)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s memory backed by transparent huge pages (``AnonHugePages`` of the
    mapping that holds its data in ``/proc/self/smaps``); 0 when unknown. Diagnostics, tests."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
