"""AutoAWQ checkpoints, 4 bit, ``version`` "gemm" or "gemv" (checked against AutoAWQ's
``awq/utils/packing_utils.py`` and ``awq/modules/linear/{gemm,gemv}.py``).

Both store unsigned codes and zero points with ``w = (q - z) * s`` (AutoAWQ rounds the
product to fp16 in ``dequantize_gemm``; torchq computes it exactly in fp32).

* **gemm**: ``qweight`` int32 ``(K, N/8)`` and ``qzeros`` int32 ``(G, N/8)`` packed along N,
  slot ``i`` of a word holding column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``; ``scales`` fp16 ``(G, N)``.
* **gemv**: ``qweight`` int32 ``(N, K/8)`` packed along K in sequential order; ``qzeros`` int32
  ``(N, W)`` packed along the group axis, sequential; ``scales`` fp16 ``(N, 8W)``, where
  ``W = ceil(ceil(G/8) / m) * m`` with ``m`` 1 for group >= 128, 2 for 64, 4 for 32 (other
  group sizes: AutoAWQ raises). The padding (zeros and scales past ``G``) is zero.

``quantization_config``: ``quant_method: "awq"``, ``bits: 4``, ``group_size``, ``zero_point``,
``version``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from torchq.interop.bitpack import pack_int32, unpack_int32
from torchq.interop.intweight import IntWeight, bytes_as_words, words_as_bytes

__all__ = ["read_awq", "write_awq", "awq_config", "AWQ_ORDER", "gemv_zeros_width", "VERSIONS"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
VERSIONS = ("gemm", "gemv")
_GEMV_MULTIPLIER = {32: 4, 64: 2}  # group >= 128: 1


def _version(qcfg: Mapping) -> str:
    v = str(qcfg.get("version", "gemm")).lower()
    if v not in VERSIONS:
        raise ValueError(f"AWQ version {qcfg.get('version')!r} is not supported (known: {list(VERSIONS)})")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"AutoAWQ checkpoints are 4 bit; this one says bits={bits}")
    return v


def _group(qcfg: Mapping, k: int) -> int:
    g = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    return k if g in (-1, 0) else g


def gemv_zeros_width(k: int, group_size: int) -> int:
    """Words per row of a gemv ``qzeros`` (AutoAWQ's padded width of the group axis)."""
    if group_size >= 128:
        m = 1
    elif group_size in _GEMV_MULTIPLIER:
        m = _GEMV_MULTIPLIER[group_size]
    else:
        raise ValueError(f"AutoAWQ gemv supports group sizes 32, 64 and >= 128, not {group_size}; use awq-gemm")
    base = -(-(k // group_size) // 8)
    return -(-base // m) * m


def read_awq(get: Callable[[str], torch.Tensor], prefix: str, qcfg: Mapping) -> IntWeight:
    """The :class:`IntWeight` of AWQ linear ``prefix``."""
    version = _version(qcfg)
    qweight, qzeros, scales = get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales")
    if version == "gemm":
        k, n = qweight.shape[0], qweight.shape[1] * 8
        g = _group(qcfg, k)
        groups = -(-k // g)
        if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // 8):
            raise ValueError(
                f"{prefix}: AWQ gemm qweight {tuple(qweight.shape)} (K={k}, N={n}) at group_size={g} needs scales "
                f"{(groups, n)} and qzeros {(groups, n // 8)}, got {tuple(scales.shape)} and {tuple(qzeros.shape)}"
            )
        z = unpack_int32(qzeros, 4, dim=1, order=AWQ_ORDER).t()
        w = IntWeight(None, scales.t().contiguous(), z.contiguous(), 4, g, None, _gemm_to_packed(qweight), k)
        w.validate(prefix)
        return w
    else:
        n, k = qweight.shape[0], qweight.shape[1] * 8
        g = _group(qcfg, k)
        groups = -(-k // g)
        width = qzeros.shape[1]
        if qzeros.shape[0] != n or width * 8 < groups or tuple(scales.shape) != (n, width * 8):
            raise ValueError(
                f"{prefix}: AWQ gemv qweight {tuple(qweight.shape)} (N={n}, K={k}) at group_size={g} needs qzeros "
                f"({n}, >= {-(-groups // 8)}) and scales ({n}, 8 * qzeros width), got {tuple(qzeros.shape)} and "
                f"{tuple(scales.shape)}"
            )
        z = unpack_int32(qzeros, 4, dim=1)[:, :groups]
        w = IntWeight(None, scales[:, :groups].contiguous(), z.contiguous(), 4, g, None, words_as_bytes(qweight), k)
        w.validate(prefix)
        return w


def _gemm_to_packed(qweight: torch.Tensor) -> torch.Tensor:
    """gemm ``qweight`` (K, N/8) -> torchq canonical bytes (N, K/2), in uint8 steps.

    Byte ``b`` of a word holds slots ``2b`` (low nibble) and ``2b + 1`` (high); slot ``i`` is
    column ``8c + AWQ_ORDER[i]``. One byte per code throughout (no int32/int64 unpacking).
    """
    k = qweight.shape[0]
    b = words_as_bytes(qweight)  # (K, N/2)
    slots = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(k, -1, 8)  # (K, N/8, 8) by slot
    cols = slots[..., _SLOT_OF_COLUMN].reshape(k, -1)  # (K, N) codes by column
    t = cols.t().contiguous()  # (N, K)
    return t[:, 0::2] | (t[:, 1::2] << 4)


#: for column j of a run of 8, the slot holding it (inverse of AWQ_ORDER)
_SLOT_OF_COLUMN = [AWQ_ORDER.index(j) for j in range(8)]


def write_awq(w: IntWeight, prefix: str, qcfg: Mapping) -> dict[str, torch.Tensor]:
    """AWQ tensors of one linear."""
    version = _version(qcfg)
    n, k = w.shape
    if w.bits != 4:
        raise ValueError(f"{prefix}: AutoAWQ stores 4-bit weights, this one has {w.bits} bits; use format='gptq'")
    if w.g_idx is not None:
        raise ValueError(f"{prefix}: AWQ has no act-order (g_idx); export act-order weights with format='gptq'")
    if k % w.group_size:
        raise ValueError(f"{prefix}: AWQ needs K={k} to be a multiple of group_size={w.group_size} (no partial group)")
    if n % 8 or k % 8:
        raise ValueError(f"{prefix}: AWQ packs 8 codes per int32: N={n} and K={k} must be multiples of 8")
    z = w.zeros()
    scale = w.scale.to(torch.float16)
    if version == "gemm":
        return {
            f"{prefix}.qweight": pack_int32(w.codes().t(), 4, dim=1, order=AWQ_ORDER),
            f"{prefix}.qzeros": pack_int32(z.t(), 4, dim=1, order=AWQ_ORDER),
            f"{prefix}.scales": scale.t().contiguous(),
        }
    width = gemv_zeros_width(k, w.group_size)
    groups = z.shape[1]
    zp = torch.zeros(n, width * 8, dtype=torch.int32)
    zp[:, :groups] = z
    sp = torch.zeros(n, width * 8, dtype=torch.float16)
    sp[:, :groups] = scale
    return {
        f"{prefix}.qweight": bytes_as_words(w.packed()),
        f"{prefix}.qzeros": pack_int32(zp, 4, dim=1),
        f"{prefix}.scales": sp,
    }


def awq_config(weights: Mapping[str, IntWeight], version: str = "gemm") -> dict:
    _version({"version": version})
    per_channel = all(w.group_size == w.shape[1] for w in weights.values())
    groups = {-1} if per_channel else {w.group_size for w in weights.values()}
    if len(groups) != 1:
        raise ValueError(f"AWQ needs one group size for all layers; this model has {sorted(groups)}")
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": groups.pop(),
        "zero_point": True,
        "version": version,
        "modules_to_not_convert": None,
    }
