"""Sub-byte packing in torchq's canonical order.

Canonical int4 order ("low nibble first"): byte ``j`` of a row holds element ``2j`` in
its low nibble (bits 0-3) and element ``2j+1`` in its high nibble (bits 4-7). This is the
MX / OCP order; bitsandbytes (high nibble first) and GGUF (element j with j+16 in one
byte) are converted at the interop boundary. Nibbles store *unsigned* codes 0..15; a
signed range [qmin, qmax] is stored as ``q - qmin``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (any integer dtype, values 0..15) along the last dim.

    An odd last dimension is padded with a zero code. Returns uint8 ``(..., ceil(K/2))``.
    """
    if codes.dtype.is_floating_point:
        raise TypeError(f"pack_int4 takes integer codes, got {codes.dtype}")
    c = codes.to(torch.int16)
    if c.numel() and c.device.type != "meta" and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("pack_int4 codes must lie in 0..15 (shift signed codes by -qmin first)")
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    low = c[..., 0::2]
    high = c[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., K/2)`` -> uint8 codes ``(..., K)``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    out = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if k is not None:
        out = out[..., :k]
    return out
