"""Packing unsigned ``bits``-wide codes into int32 words, the way AWQ/GPTQ/compressed-tensors do.

A word holds ``32 // bits`` consecutive elements along one dimension, slot ``i`` at bit
offset ``i * bits`` (lowest bits first). ``order`` permutes the slots: slot ``i`` holds
element ``order[i]`` of its run (AutoAWQ gemm: ``[0, 2, 4, 6, 1, 3, 5, 7]``). Words are
signed int32 as the files store them; the bit pattern is what matters.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["pack_int32", "unpack_int32", "per_word"]


def per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(
            f"{bits}-bit codes do not fit a whole number of times in an int32 word (3-bit GPTQ packing straddles "
            "words and is not supported); use 2, 4 or 8 bits"
        )
    return 32 // bits


def pack_int32(q: torch.Tensor, bits: int, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Pack unsigned codes ``q`` (any int dtype, values in ``[0, 2**bits)``) along ``dim``."""
    p = per_word(bits)
    x = q.movedim(dim, -1).to(torch.int64)
    if x.shape[-1] % p:
        raise ValueError(f"cannot pack {x.shape[-1]} {bits}-bit codes into int32 words of {p}: not a multiple of {p}")
    x = x.reshape(*x.shape[:-1], x.shape[-1] // p, p)
    if order is not None:
        x = x[..., list(order)]
    shifts = torch.arange(p, dtype=torch.int64) * bits
    words = (x << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 unsigned codes, ``dim`` grown ``32 // bits`` times."""
    p = per_word(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    x = words.movedim(dim, -1).to(torch.int64)
    shifts = torch.arange(p, dtype=torch.int64) * bits
    slots = (x.unsqueeze(-1) >> shifts) & (2**bits - 1)
    if order is not None:
        inverse = sorted(range(p), key=lambda i: order[i])
        slots = slots[..., inverse]
    out = slots.reshape(*x.shape[:-1], x.shape[-1] * p).to(torch.int32)
    return out.movedim(-1, dim).contiguous()
