"""Tiled storage layouts of the C++ CPU kernels (``torchq/kernels/csrc``).

Output rows are grouped in tiles of 16 so that one SIMD register (or two) holds one value
per row; a partial last tile keeps its real row count. Every layout tensor has the *same
shape and dtype* as its canonical counterpart (only the order of the bytes differs), so
``N``, ``K`` and the group count are always recoverable and sizes are unchanged.

* ``cpu_int4_tile16`` (canonical ``packed_int4``): per tile ``[K/8 chunks][rows][4 bytes]``;
  byte ``b`` of a row's 4-byte lane holds code ``8c+b`` in its low nibble and ``8c+4+b``
  in its high nibble (unpacking low/high nibbles gives 4 consecutive k each, which is
  what the int8 dot products and the fp32 nibble extraction want).
* ``cpu_int8_k16`` (canonical ``plain_int8``, weight-only): per tile ``[K][rows]``.
* ``cpu_int8_k4x16`` (canonical ``plain_int8``, W8A8): per tile ``[K/4][rows][4]`` then
  ``[rows][K % 4]``.
* ``scale`` / ``zero_point`` ``(N, groups)`` of all three: per tile ``[groups][rows]``.
  ``act_scale`` and ``perm`` are left as they are.

Checkpoints always hold the canonical form (``AffineQuantizedTensor.canonical_tensors``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from torchq.primitives.packing import pack_int4, unpack_int4
from torchq.formats.layouts import Layout, register_layout
from torchq.kernels.hugepages import empty_huge

__all__ = ["TILE", "INT4_TILE16", "INT8_K16", "INT8_K4X16"]

TILE = 16
Fields = dict[str, Optional[torch.Tensor]]


_CHUNK_TILES = 64  # tiles converted per step: bounds the temporaries of big weights


def _tile(a: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor], shape=None, dtype=None) -> torch.Tensor:
    """Apply ``inner`` to ``a`` (N, ...) viewed as tiles (T, rows, ...) - the full tiles in
    steps of ``_CHUNK_TILES``, then the partial tail - writing the flattened results
    one after another into a new tensor of ``shape`` (default ``a.shape``)."""
    n = a.shape[0]
    full = n // TILE * TILE
    # huge-page memory (a placement hint, see hugepages.py): the M=1 kernels stream it from DRAM
    out = empty_huge(a.shape if shape is None else shape, dtype or a.dtype, a.device)
    flat = out.view(-1)
    pos = 0
    for r0 in range(0, full, TILE * _CHUNK_TILES):
        r1 = min(full, r0 + TILE * _CHUNK_TILES)
        piece = inner(a[r0:r1].reshape((r1 - r0) // TILE, TILE, *a.shape[1:])).reshape(-1)
        flat[pos : pos + piece.numel()] = piece
        pos += piece.numel()
    if n > full:
        piece = inner(a[full:].unsqueeze(0)).reshape(-1)
        flat[pos : pos + piece.numel()] = piece
    return out


def _untile(flat: torch.Tensor, inner: Callable[[torch.Tensor, int], torch.Tensor], shape=None) -> torch.Tensor:
    """Inverse of :func:`_tile` for a tiled tensor ``flat`` (N, per_row):
    ``inner(block (T, rows * per_row), rows)`` returns the tiles' rows (T, rows, ...) in
    canonical order; the result has ``shape`` (default ``flat.shape``)."""
    n, per_row = flat.shape[0], flat.shape[1]
    full = n // TILE * TILE
    data = flat.reshape(-1)
    out = None
    for r0 in list(range(0, full, TILE * _CHUNK_TILES)) + ([full] if n > full else []):
        r1 = min(full, r0 + TILE * _CHUNK_TILES) if r0 < full else n
        block = data[r0 * per_row : r1 * per_row]
        b = inner(block.reshape((r1 - r0) // TILE, -1), TILE) if r0 < full else inner(block.reshape(1, -1), n - full)
        b = b.reshape(r1 - r0, *b.shape[2:])
        if out is None:
            out = torch.empty((n, *b.shape[1:]) if shape is None else shape, dtype=b.dtype, device=b.device)
        out[r0:r1] = b
    return out


# ---------------------------------------------------------------------- parameters
def _params_to(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if p is None:
        return None
    return _tile(p.contiguous(), lambda b: b.transpose(1, 2).contiguous())


def _params_from(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if p is None:
        return None
    groups = p.shape[1]
    return _untile(p, lambda b, rows: b.reshape(b.shape[0], groups, rows).transpose(1, 2))


def _with_params(fields: Fields, fn) -> Fields:
    out = dict(fields)
    out["scale"] = fn(fields["scale"])
    out["zero_point"] = fn(fields.get("zero_point"))
    return out


# ---------------------------------------------------------------------- int4
def _int4_to(fields: Fields) -> Fields:
    q = fields["qdata"]
    chunks = q.shape[1] // 4  # canonical bytes 4c..4c+3 hold codes 8c..8c+7, low nibble first

    def inner(b: torch.Tensor) -> torch.Tensor:  # (T, rows, Kp/2) canonical -> (T, C, rows, 4) tiled
        t, rows = b.shape[:2]
        x = b.reshape(t, rows, chunks, 4).transpose(1, 2)  # (T, C, rows, 4)
        b0, b1, b2, b3 = x.unbind(-1)
        lo = torch.stack((b0 & 0x0F, b0 >> 4, b1 & 0x0F, b1 >> 4), dim=-1)  # codes 8c+0..3
        hi = torch.stack((b2 << 4, b2 & 0xF0, b3 << 4, b3 & 0xF0), dim=-1)  # codes 8c+4..7, shifted up
        return lo | hi

    out = _with_params(fields, _params_to)
    out["qdata"] = _tile(q.contiguous(), inner)
    return out


def int4_tile16_codes(q: torch.Tensor) -> torch.Tensor:
    """Unsigned codes (N, Kp) uint8 of ``cpu_int4_tile16`` bytes (N, Kp/2)."""
    kp = q.shape[1] * 2

    def inner(b: torch.Tensor, rows: int) -> torch.Tensor:  # (T, C*rows*4) bytes -> (T, rows, Kp) codes
        t = b.shape[0]
        x = b.reshape(t, kp // 8, rows, 4)
        x = torch.stack((x & 0x0F, x >> 4), dim=-1)  # (T, C, rows, 4, 2)
        return x.permute(0, 2, 1, 4, 3).reshape(t, rows, kp)

    return _untile(q, inner)


def untile_params(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Canonical (N, groups) parameters from their tiled layout."""
    return _params_from(p)


def _int4_from(fields: Fields) -> Fields:
    out = _with_params(fields, _params_from)
    out["qdata"] = pack_int4(int4_tile16_codes(fields["qdata"]))
    return out


# ---------------------------------------------------------------------- int8, [K][rows]
def _k16_to(fields: Fields) -> Fields:
    out = _with_params(fields, _params_to)
    out["qdata"] = _tile(fields["qdata"].contiguous(), lambda b: b.transpose(1, 2).contiguous())
    return out


def int8_k16_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, Kp) of ``cpu_int8_k16`` data."""
    kp = q.shape[1]
    return _untile(q, lambda b, rows: b.reshape(b.shape[0], kp, rows).transpose(1, 2))


def _k16_from(fields: Fields) -> Fields:
    out = _with_params(fields, _params_from)
    out["qdata"] = int8_k16_codes(fields["qdata"])
    return out


# ---------------------------------------------------------------------- int8, [K/4][rows][4] + [rows][K%4]
def _k4_to(fields: Fields) -> Fields:
    q = fields["qdata"].contiguous()
    kp = q.shape[1]
    k4 = kp // 4 * 4

    def inner(b: torch.Tensor) -> torch.Tensor:  # (T, rows, Kp) -> (T, rows*Kp)
        t, rows = b.shape[:2]
        main = b[:, :, :k4].reshape(t, rows, k4 // 4, 4).permute(0, 2, 1, 3).reshape(t, -1)
        return torch.cat([main, b[:, :, k4:].reshape(t, -1)], dim=1)

    out = _with_params(fields, _params_to)
    out["qdata"] = _tile(q, inner)
    return out


def int8_k4x16_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, Kp) of ``cpu_int8_k4x16`` data."""
    kp = q.shape[1]
    k4 = kp // 4 * 4

    def inner(b: torch.Tensor, rows: int) -> torch.Tensor:  # (T, rows*Kp) -> (T, rows, Kp)
        t = b.shape[0]
        main = b[:, : rows * k4].reshape(t, k4 // 4, rows, 4).permute(0, 2, 1, 3).reshape(t, rows, k4)
        tail = b[:, rows * k4 :].reshape(t, rows, kp - k4)
        return torch.cat([main, tail], dim=2)

    return _untile(q, inner)


def _k4_from(fields: Fields) -> Fields:
    out = _with_params(fields, _params_from)
    out["qdata"] = int8_k4x16_codes(fields["qdata"])
    return out


# ---------------------------------------------------------------------- row gathers (embedding lookups)
def _row_bases(n: int, index: torch.Tensor, row_elems: int):
    """Per looked-up row: (start of its tile in elements, row within the tile, rows in the tile)."""
    t = index // TILE
    r = index % TILE
    full = n // TILE
    rows = torch.where(t < full, torch.full_like(t, TILE), torch.full_like(t, n - full * TILE))
    return t * TILE * row_elems, r, rows


def _gather_params(p: Optional[torch.Tensor], index: torch.Tensor) -> Optional[torch.Tensor]:
    if p is None:
        return None
    n, groups = p.shape
    base, r, rows = _row_bases(n, index, groups)
    g = torch.arange(groups, device=p.device)
    return p.reshape(-1)[(base + r)[:, None] + g[None, :] * rows[:, None]]


def _int4_rows(fields: Fields, index: torch.Tensor) -> Fields:
    q = fields["qdata"]
    n, half = q.shape
    chunks = half // 4
    base, r, rows = _row_bases(n, index, half)
    c = torch.arange(chunks, device=q.device)
    lane = (base + r * 4)[:, None] + c[None, :] * (rows * 4)[:, None]  # (I, C): start of each 4-byte lane
    t0, t1, t2, t3 = (q.reshape(-1)[lane + j] for j in range(4))  # tiled bytes: low k=8c+j, high k=8c+4+j
    canon = torch.stack(
        ((t0 & 0x0F) | (t1 << 4), (t2 & 0x0F) | (t3 << 4), (t0 >> 4) | (t1 & 0xF0), (t2 >> 4) | (t3 & 0xF0)), dim=-1
    )
    return dict(qdata=canon.reshape(len(index), half), scale=_gather_params(fields["scale"], index),
                zero_point=_gather_params(fields.get("zero_point"), index))


def _k16_rows(fields: Fields, index: torch.Tensor) -> Fields:
    q = fields["qdata"]
    n, kp = q.shape
    base, r, rows = _row_bases(n, index, kp)
    k = torch.arange(kp, device=q.device)
    codes = q.reshape(-1)[(base + r)[:, None] + k[None, :] * rows[:, None]]
    return dict(qdata=codes, scale=_gather_params(fields["scale"], index),
                zero_point=_gather_params(fields.get("zero_point"), index))


def _k4_rows(fields: Fields, index: torch.Tensor) -> Fields:
    q = fields["qdata"]
    n, kp = q.shape
    k4 = kp // 4 * 4
    base, r, rows = _row_bases(n, index, kp)
    k = torch.arange(kp, device=q.device)
    main = (k // 4)[None, :] * (rows * 4)[:, None] + (r * 4)[:, None] + (k % 4)[None, :]
    tail = (k4 * rows)[:, None] + (r * (kp - k4))[:, None] + (k - k4)[None, :]
    off = torch.where(k[None, :] < k4, main, tail)
    return dict(qdata=q.reshape(-1)[base[:, None] + off], scale=_gather_params(fields["scale"], index),
                zero_point=_gather_params(fields.get("zero_point"), index))


INT4_TILE16 = register_layout(
    Layout(
        "cpu_int4_tile16",
        "packed_int4",
        "int4 codes tiled by 16 rows, [K/8][16][4 bytes] per tile; params [groups][16] per tile (C++ CPU kernels)",
        _int4_to,
        _int4_from,
        _int4_rows,
    )
)
INT8_K16 = register_layout(
    Layout(
        "cpu_int8_k16",
        "plain_int8",
        "int8 codes tiled by 16 rows, [K][16] per tile; params [groups][16] per tile (C++ CPU kernels)",
        _k16_to,
        _k16_from,
        _k16_rows,
    )
)
INT8_K4X16 = register_layout(
    Layout(
        "cpu_int8_k4x16",
        "plain_int8",
        "int8 codes tiled by 16 rows, [K/4][16][4] + [16][K%4] per tile (C++ CPU W8A8 kernel)",
        _k4_to,
        _k4_from,
        _k4_rows,
    )
)
