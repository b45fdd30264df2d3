"""4-bit codebook formats (NF4, FP4 e2m1, bitsandbytes' FP4) in plain PyTorch.

A codebook format stores, per block of ``block_size`` consecutive weights along K (input
features), one fp32 ``scale`` and 16-entry-table indices ``q`` (0..15):
``w = values[q] * scale``. The three formats differ only in the table and in how the
scale relates to the block's absolute maximum:

========================  ======================================  ==================
format                    ``values`` (code order)                 ``scale``
========================  ======================================  ==================
``nf4``                   QLoRA NormalFloat4 (design notes, s.3)  ``absmax``
``fp4_e2m1_bnb``          ``[0, .0625, 8, 12, 4, 6, 2, 3,``       ``absmax``
                          ``-0, -.0625, -8, ...] / 12`` (fp32)
``fp4_e2m1``              OCP/MX e2m1: ``0, .5, 1, 1.5, 2, 3, 4,  ``absmax / 6``
                          6``, sign in bit 3
========================  ======================================  ==================

Quantization reproduces bitsandbytes' arithmetic bit for bit (so that NF4 and the bnb FP4
variant equal ``bnb.functional.dequantize_4bit(quantize_4bit(w))`` when K is a multiple
of the block size): ``v = clamp(x * (1 / max(scale, 1e-38)), -vmax, vmax)`` in fp32, then
the code is picked by comparing ``v`` with the fp32 midpoints of the sorted table (a value
exactly on a midpoint takes the lower entry). OCP e2m1 breaks such ties to the even
mantissa instead (the OCP rounding rule) and never emits ``-0`` for a non-negative input.

Signed zero: a table with both ``+0`` and ``-0`` among its decision codes (bitsandbytes'
FP4) picks between them by the sign of the input, as bitsandbytes' CUDA kernel does
(sign bit from ``x < 0``): a value that rounds to zero is ``+0`` if ``x >= 0``, else
``-0``. (bitsandbytes' CPU quantizer breaks this tie with an ``argsort`` over the two
equal zeros, so its choice depends on the sort implementation of the machine; the
dequantized values are the same either way.) The ``-0`` code dequantizes to ``-0`` on every
CPU; bitsandbytes' own CPU dequantizer gives ``-0`` on AVX2 but ``+0`` from its AVX-512
kernel, equal by value.

Double quantization (QLoRA "compress statistics"): the fp32 block scales of a tensor,
flattened row-major, minus their mean, are quantized in blocks of 256 with bitsandbytes'
signed 8-bit "dynamic" code (:func:`dynamic_map`), using the same 65536-entry lookup
arithmetic as bitsandbytes' CPU quantizer; ``scale = dynamic[q] * absmax2 + mean``.

Nibble order: torchq's canonical packing puts the even element in the LOW nibble
(:mod:`torchq.primitives.packing`); bitsandbytes puts it in the HIGH nibble. Use
:func:`swap_nibbles` at that boundary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from torchq.primitives.packing import pack_int4, unpack_int4

__all__ = [
    "Codebook",
    "CODEBOOK_FORMATS",
    "get_codebook",
    "codebook_values",
    "quantize_codebook",
    "dequantize_codebook",
    "dynamic_map",
    "dynamic_map_digest",
    "quantize_blockwise_dynamic",
    "dequantize_blockwise_dynamic",
    "double_quantize_scales",
    "double_dequantize_scales",
    "swap_nibbles",
    "pack_codes",
    "unpack_codes",
    "DOUBLE_QUANT_BLOCK",
    "BLOCK_SIZES",
    "register_codebook",
    "on_codebook_registered",
]

#: Block sizes torchq accepts for codebook formats (bitsandbytes' set).
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block of scales that share one second-level absmax in double quantization (QLoRA).
DOUBLE_QUANT_BLOCK = 256

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_BNB_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Codebook:
    """One 4-bit codebook format.

    ``values`` are fp32 table entries by code. ``vmax`` is the table's largest magnitude:
    ``scale = absmax / vmax``. ``decision_codes`` lists the codes the quantizer may emit,
    in ascending value order (a duplicate zero may be left out); ``ties`` is ``"down"``
    (a value on a midpoint takes the lower entry, bitsandbytes) or ``"even"`` (the entry
    with an even code, i.e. even e2m1 mantissa: OCP round-half-to-even).
    """

    name: str
    description: str
    values: tuple[float, ...]
    decision_codes: tuple[int, ...]
    ties: str
    vmax: float

    def table(self, device=None) -> torch.Tensor:
        return codebook_values(self.name, device)


def _fp32_table(values, divisor: float = 1.0) -> tuple[float, ...]:
    t = torch.tensor(values, dtype=torch.float32)
    if divisor != 1.0:
        t = t / torch.tensor(divisor, dtype=torch.float32)  # fp32 division, as bitsandbytes
    return tuple(t.tolist())


def _stable_order(values: tuple[float, ...]) -> tuple[int, ...]:
    # Stable: equal entries (0 and -0) keep code order, which is what bitsandbytes' sort gives.
    return tuple(torch.argsort(torch.tensor(values, dtype=torch.float32), stable=True).tolist())


_BNB_FP4 = _fp32_table(_BNB_FP4_RAW, 12.0)

CODEBOOK_FORMATS: dict[str, Codebook] = {
    c.name: c
    for c in (
        Codebook("nf4", "NormalFloat4 (QLoRA / bitsandbytes), scale = absmax", _fp32_table(_NF4),
                 _stable_order(_fp32_table(_NF4)), "down", 1.0),
        Codebook("fp4_e2m1_bnb", "bitsandbytes FP4 table / 12, scale = absmax (not OCP e2m1)", _BNB_FP4,
                 _stable_order(_BNB_FP4), "down", 1.0),
        Codebook("fp4_e2m1", "OCP / MX FP4 e2m1, scale = absmax / 6", _fp32_table(_E2M1),
                 (15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7), "even", 6.0),
    )
}


_ON_REGISTER: list = []


def register_codebook(
    name: str, values, description: str = "user codebook, scale = absmax / max|value|"
) -> Codebook:
    """Add a 16-entry 4-bit codebook format ``name`` (``values[q]`` for code q, any 16 finite
    numbers, stored as fp32). Its quantizer picks the nearest entry (ties to the lower one) with
    ``scale = block absmax / max|values|``; everything registered with
    :func:`on_codebook_registered` (reference and C++ kernels, their layouts) follows, so
    ``torchq.codebook4_weight_only(name)`` quantizes, explains, saves and loads like NF4."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a codebook name must be an identifier, got {name!r}")
    if name in CODEBOOK_FORMATS:
        raise ValueError(f"codebook {name!r} is already registered")
    table = _fp32_table(tuple(float(v) for v in values))
    if len(table) != 16 or not all(math.isfinite(v) for v in table):
        raise ValueError(f"a 4-bit codebook has 16 finite values, got {len(table)}: {values!r}")
    vmax = max(abs(v) for v in table)
    if vmax == 0.0:
        raise ValueError("a codebook needs at least one non-zero value")
    cb = Codebook(name, description, table, _stable_order(table), "down", vmax)
    CODEBOOK_FORMATS[name] = cb
    for hook in _ON_REGISTER:
        hook(name)
    return cb


def on_codebook_registered(hook) -> None:
    """Call ``hook(name)`` for every codebook format, those registered so far and later ones
    (kernel modules register their per-format kernels and layouts this way)."""
    _ON_REGISTER.append(hook)
    for name in sorted(CODEBOOK_FORMATS):
        hook(name)


def get_codebook(name: str) -> Codebook:
    try:
        return CODEBOOK_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown 4-bit codebook format {name!r}; known: {sorted(CODEBOOK_FORMATS)}") from None


def codebook_values(name: str, device=None) -> torch.Tensor:
    """The 16 fp32 table entries of format ``name``, indexed by code (a fresh tensor).

    Built from Python floats on every call (16 values: cheap) so that it is also a fresh
    constant under ``torch.compile`` tracing, where a cached real tensor would not be."""
    return torch.tensor(get_codebook(name).values, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _decision_cached(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cb = get_codebook(name)
    codes = torch.tensor(cb.decision_codes, dtype=torch.long, device=device)
    sorted_vals = torch.tensor([cb.values[c] for c in cb.decision_codes], dtype=torch.float32, device=device)
    midpoints = (sorted_vals[:-1] + sorted_vals[1:]) / 2  # fp32, as bitsandbytes
    return codes, midpoints


@lru_cache(maxsize=None)
def signed_zero_codes(name: str) -> Optional[tuple[int, int]]:
    """``(+0 code, -0 code)`` when both zeros are decision codes of format ``name``, else None."""
    cb = get_codebook(name)
    zeros = [c for c in cb.decision_codes if cb.values[c] == 0.0]
    if len(zeros) != 2:
        return None
    pos = [c for c in zeros if math.copysign(1.0, cb.values[c]) > 0]
    neg = [c for c in zeros if math.copysign(1.0, cb.values[c]) < 0]
    return (pos[0], neg[0]) if pos and neg else None


# ---------------------------------------------------------------------- 4-bit codes
def _check_blocks(w: torch.Tensor, block_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, K) tensor, got shape {tuple(w.shape)}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even integer, got {block_size!r}")
    if w.shape[1] % block_size:
        raise ValueError(
            f"K={w.shape[1]} is not a multiple of block_size={block_size}: pad K first "
            "(Codebook4Tensor.from_float pads with zeros)"
        )


def quantize_codebook(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (rows, K) with K a multiple of ``block_size``.

    Returns ``(codes, scale)``: uint8 codes 0..15 of shape (rows, K) and fp32 block scales
    of shape (rows, K / block_size).
    """
    cb = get_codebook(fmt)
    _check_blocks(w, block_size)
    if not w.is_floating_point():
        raise TypeError(f"quantize_codebook takes a floating-point tensor, got {w.dtype}")
    rows, k = w.shape
    x = w.detach().float().reshape(rows, k // block_size, block_size)
    absmax = x.abs().amax(dim=-1)
    scale = absmax if cb.vmax == 1.0 else absmax / cb.vmax
    v = torch.clamp(x * (1.0 / scale.clamp(min=1e-38)).unsqueeze(-1), -cb.vmax, cb.vmax)
    codes, mids = _decision_cached(fmt, str(x.device))
    pos = torch.bucketize(v, mids, right=False)
    if cb.ties == "even":
        upper = torch.bucketize(v, mids, right=True)
        tie = upper != pos
        pos = torch.where(tie & (codes[upper] % 2 == 0), upper, pos)
    q = codes[pos]
    zero_codes = signed_zero_codes(fmt)
    if zero_codes is not None:  # the sign rule (module docstring), on every machine
        plus, minus = zero_codes
        signed = torch.where(v < 0, minus, plus)
        q = torch.where((q == plus) | (q == minus), signed, q)
    return q.to(torch.uint8).reshape(rows, k), scale


def dequantize_codebook(
    codes: torch.Tensor, scale: torch.Tensor, block_size: int, fmt: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``values[codes] * scale`` per block, computed in fp32 and cast to ``dtype``."""
    rows, k = codes.shape
    table = codebook_values(fmt, codes.device)
    vals = table[codes.long()].reshape(rows, k // block_size, block_size)
    return (vals * scale.float().unsqueeze(-1)).reshape(rows, k).to(dtype)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (rows, K) -> canonical packed (rows, K/2), even element in the low nibble."""
    return pack_int4(codes)


def unpack_codes(packed: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    return unpack_int4(packed, k)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Convert between torchq's low-nibble-first and bitsandbytes' high-nibble-first bytes
    (the operation is its own inverse)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"swap_nibbles takes uint8, got {packed.dtype}")
    return (packed << 4) | (packed >> 4)


# ---------------------------------------------------------------------- 8-bit dynamic code
@lru_cache(maxsize=None)
def _dynamic_map_cached(device: str) -> torch.Tensor:
    # bitsandbytes' signed dynamic map (7 exponent bits, 8 bits): for exponent e = 0..6 the
    # midpoints of 2**e + 1 evenly spaced points on [0.1, 1], times 10**(e - 6), both signs;
    # plus 0 and 1. Built with the same fp32 torch ops so the values are identical.
    entries = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scaled = mids * (10 ** (e - 6))
        entries += [scaled, -scaled]
    values = torch.cat(entries).sort().values
    assert values.numel() == 256
    return values.to(device)


@lru_cache(maxsize=None)
def _dynamic_map_values() -> tuple[float, ...]:
    return tuple(_dynamic_map_cached("cpu").tolist())


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code: 256 sorted fp32 values in [-0.993, 1]
    (a fresh tensor built from cached Python floats, so ``torch.compile`` can trace it)."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)


def dynamic_map_digest() -> str:
    """sha256 of the dynamic map's bytes: pinned in the tests, so a change in how torch
    builds it (which would change how stored double-quantized scales decode) is caught."""
    return hashlib.sha256(_dynamic_map_cached("cpu").numpy().tobytes()).hexdigest()


@lru_cache(maxsize=None)
def _dynamic_lut_cached(device: str) -> torch.Tensor:
    # bitsandbytes' CPU quantizer maps v in [-1, 1] to a grid of 65536 points
    # g_j = 2j / 65535 - 1 (fp32) and looks up the nearest code of the grid point, where
    # "nearest" counts the fp32 midpoints strictly below g_j.
    code = _dynamic_map_cached(device)
    j = torch.arange(65536, dtype=torch.float32, device=device)
    grid = (j + j) / 65535.0 - 1.0
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(grid, mids, right=False).clamp(max=255).to(torch.uint8)


def quantize_blockwise_dynamic(x: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic blockwise quantization of a 1-D fp32 tensor, as bitsandbytes' CPU path.

    Returns ``(codes uint8 (n,), absmax fp32 (ceil(n / block),))``. Per block:
    ``absmax = max|x|``; ``v = clamp(x * (1 / absmax), -1, 1)``;
    ``j = trunc(fma((v + 1) * 0.5, 65535, 0.5))``; ``code = lut[j]``; an all-zero block gets
    code 0 everywhere.
    """
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"quantize_blockwise_dynamic takes a 1-D fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    n = x.numel()
    nb = -(-n // block)
    xb = torch.nn.functional.pad(x, (0, nb * block - n)).reshape(nb, block)
    absmax = xb.abs().amax(dim=1)
    v = torch.clamp(xb * (1.0 / absmax).unsqueeze(1), -1.0, 1.0)
    t = (v + 1.0) * 0.5
    # fma in fp32 == one rounding of the exact t * 65535 + 0.5, which float64 holds exactly.
    j = (t.double() * 65535.0 + 0.5).float().trunc().long() & 0xFFFF
    codes = _dynamic_lut_cached(str(x.device))[j]
    codes = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].contiguous(), absmax


def dequantize_blockwise_dynamic(codes: torch.Tensor, absmax: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_dynamic`: ``dynamic[codes] * absmax[i // block]`` (fp32)."""
    n = codes.numel()
    code = dynamic_map(codes.device)
    idx = torch.arange(n, device=codes.device) // block
    return code[codes.reshape(-1).long()] * absmax.float()[idx]


def double_quantize_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA double quantization of fp32 block scales (any shape, flattened row-major).

    Returns ``(scale_q uint8 (same shape), scale_absmax fp32 (ceil(n / 256),), offset fp32 (1,))``
    with ``offset = mean(scale)``.
    """
    flat = scale.float().reshape(-1).contiguous()
    offset = flat.mean()
    q, absmax = quantize_blockwise_dynamic(flat - offset)
    return q.reshape(scale.shape), absmax, offset.reshape(1)


def double_dequantize_scales(scale_q: torch.Tensor, scale_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """fp32 block scales from their double-quantized form (same shape as ``scale_q``)."""
    flat = dequantize_blockwise_dynamic(scale_q.reshape(-1), scale_absmax)
    return (flat + offset.float().reshape(())).reshape(scale_q.shape)
