"""The one integer weight every foreign checkpoint format reduces to, and its torchq mapping.

AWQ, GPTQ and compressed-tensors all store, per linear, unsigned ``bits``-wide codes ``q``,
fp16 scales and integer zero points per group along K, meaning ``w = (q - z) * s``
(symmetric formats: a fixed ``z = 2**(bits-1)``). :class:`IntWeight` holds exactly that,
unpacked and in original column order; each format module only packs/unpacks bits. The
torchq side (:func:`to_torchq`, :func:`from_torchq`) is written once here, so every format
maps onto the same torchq schemes:

* 4 bit -> ``int4_weight_only``: symmetric (all ``z == 8``) as codes ``q - 8`` in [-8, 7],
  otherwise codes ``q`` in [0, 15] with an int8 zero point ``z``;
* 8 bit -> ``int8_weight_only``: codes ``q - 128`` in [-128, 127], zero ``z - 128``;
* 2/3 bit -> ``intx_weight_only`` (one code per byte).

Act-order (``g_idx``: group of each original input column) becomes torchq's ``perm``
(stored column ``j`` is original column ``perm[j]``, groups consecutive in stored order):
``perm = stable argsort(g_idx)``. That is lossless exactly when every group but the last
has ``group_size`` members, which GPTQ's act-order always produces; anything else is refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from torchq.primitives.affine import ZeroPointDomain
from torchq.primitives.packing import pack_int4, unpack_int4
from torchq.formats.affine.tensor import AffineQuantizedTensor

__all__ = ["IntWeight", "to_torchq", "from_torchq", "words_as_bytes", "bytes_as_words", "SCHEME_FOR_BITS", "ACTIVATION_SCHEMES"]

#: bits -> torchq scheme an imported weight of that width becomes
SCHEME_FOR_BITS = {2: "intx_weight_only", 3: "intx_weight_only", 4: "int4_weight_only", 8: "int8_weight_only"}


@dataclass
class IntWeight:
    """A foreign integer weight, unpacked: ``w[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with
    ``g = g_idx[k]`` (or ``k // group_size`` when ``g_idx`` is None).

    ``q``: int32 ``(N, K)`` unsigned codes; ``scale``: fp16 (or fp32) ``(N, G)``, ``G =
    ceil(K / group_size)``; ``zero``: int32 ``(N, G)`` unsigned zero points, or None for
    the symmetric ``z = 2**(bits-1)``; ``g_idx``: int64 ``(K,)`` or None.

    4-bit weights may instead carry ``packed4``: uint8 ``(N, ceil(K/2))`` in torchq's
    canonical nibble order (byte ``j`` = codes ``2j`` low, ``2j+1`` high) with ``q=None`` and
    ``in_features=K``. GPTQ, AWQ gemv and compressed-tensors words *are* that byte order
    when viewed as little-endian bytes, so importing them moves bytes without unpacking.
    """

    q: Optional[torch.Tensor]
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    group_size: int
    g_idx: Optional[torch.Tensor] = None
    packed4: Optional[torch.Tensor] = None
    in_features: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.q is not None:
            return tuple(self.q.shape)
        return (self.packed4.shape[0], int(self.in_features))

    def codes(self) -> torch.Tensor:
        """Unsigned codes, int32 ``(N, K)``."""
        if self.q is not None:
            return self.q
        return unpack_int4(self.packed4, self.in_features).to(torch.int32)

    def packed(self) -> torch.Tensor:
        """4-bit codes as canonical bytes, uint8 ``(N, ceil(K/2))``."""
        if self.bits != 4:
            raise ValueError(f"only 4-bit weights pack two codes per byte, this one has {self.bits} bits")
        return self.packed4 if self.packed4 is not None else pack_int4(self.q)

    def zeros(self) -> torch.Tensor:
        """Zero points ``(N, G)`` int32, the implicit midpoint when symmetric."""
        if self.zero is not None:
            return self.zero
        return torch.full(self.scale.shape, 2 ** (self.bits - 1), dtype=torch.int32)

    def group_index(self) -> torch.Tensor:
        k = self.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(k) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """fp32 ``(N, K)`` by the formats' own definition, exact (small int times fp16 fits fp32)."""
        g = self.group_index()
        z = self.zeros()[:, g].float()
        return (self.codes().float() - z) * self.scale[:, g].float()

    def validate(self, what: str = "weight") -> None:
        n, k = self.shape
        groups = -(-k // self.group_size)
        top = 2**self.bits - 1
        problems = []
        if self.q is None and (self.packed4 is None or self.bits != 4 or self.packed4.shape[1] != -(-k // 2)):
            problems.append("packed4 needs 4 bits and (N, ceil(K/2)) bytes")
        if tuple(self.scale.shape) != (n, groups):
            problems.append(f"scales have shape {tuple(self.scale.shape)}, expected {(n, groups)}")
        if self.zero is not None and tuple(self.zero.shape) != (n, groups):
            problems.append(f"zero points have shape {tuple(self.zero.shape)}, expected {(n, groups)}")
        if self.q is not None and self.q.numel() and (int(self.q.min()) < 0 or int(self.q.max()) > top):
            problems.append(f"codes outside [0, {top}]")
        if self.zero is not None and self.zero.numel() and (int(self.zero.min()) < 0 or int(self.zero.max()) > top):
            problems.append(f"zero points outside [0, {top}] (min {int(self.zero.min())}, max {int(self.zero.max())})")
        if self.g_idx is not None:
            if tuple(self.g_idx.shape) != (k,):
                problems.append(f"g_idx has shape {tuple(self.g_idx.shape)}, expected {(k,)}")
            elif k and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups):
                problems.append(f"g_idx values outside [0, {groups - 1}]")
        if problems:
            raise ValueError(f"{what}: " + "; ".join(problems))


def words_as_bytes(words: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of int32 words along the last dim: ``(R, W)`` -> uint8 ``(R, 4W)``."""
    if sys.byteorder != "little":  # pragma: no cover - every supported CPU is little-endian
        raise NotImplementedError("byte views of packed words assume a little-endian CPU")
    # through a flat view: a size-1 dim can leave "contiguous" tensors with a stride != 1
    return words.contiguous().reshape(-1).view(torch.uint8).reshape(*words.shape[:-1], words.shape[-1] * 4)


def bytes_as_words(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`words_as_bytes`; the byte count is zero-padded to a multiple of 4."""
    if sys.byteorder != "little":  # pragma: no cover
        raise NotImplementedError("byte views of packed words assume a little-endian CPU")
    pad = -b.shape[-1] % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return b.contiguous().reshape(-1).view(torch.int32).reshape(*b.shape[:-1], b.shape[-1] // 4)


# ---------------------------------------------------------------------- import
def _perm_from_g_idx(g_idx: torch.Tensor, group_size: int, what: str) -> Optional[torch.Tensor]:
    """torchq ``perm`` for an act-order ``g_idx``, None when the order is the trivial one."""
    k = g_idx.shape[0]
    trivial = torch.arange(k) // group_size
    if torch.equal(g_idx.long(), trivial):
        return None
    perm = torch.sort(g_idx.long(), stable=True).indices
    if not torch.equal(g_idx.long()[perm], trivial):
        counts = torch.bincount(g_idx.long()).tolist()
        raise ValueError(
            f"{what}: g_idx groups have sizes {counts[:8]}{'...' if len(counts) > 8 else ''}, but torchq's "
            f"act-order needs every group but the last to hold group_size={group_size} columns; "
            "this checkpoint's grouping has no lossless torchq form"
        )
    if k % group_size:
        raise ValueError(
            f"{what}: act-order (g_idx) with K={k} not a multiple of group_size={group_size} is not supported by torchq"
        )
    return perm


#: schemes with int8 dynamic per-token activations, by weight bits
ACTIVATION_SCHEMES = {8: "w8a8", 4: "w4a8"}


def to_torchq(
    w: IntWeight, dtype: torch.dtype = torch.float32, what: str = "weight", scheme: Optional[str] = None
) -> AffineQuantizedTensor:
    """The torchq tensor holding exactly ``w``'s codes, scales and zero points (see module doc).

    ``scheme`` overrides the weight-only scheme, e.g. ``"w8a8"`` for a checkpoint that also
    quantizes activations (compressed-tensors W8A8).
    """
    w.validate(what)
    if w.bits not in SCHEME_FOR_BITS:
        raise ValueError(f"{what}: {w.bits}-bit weights have no torchq scheme (supported: {sorted(SCHEME_FOR_BITS)})")
    if scheme is not None and scheme != SCHEME_FOR_BITS[w.bits] and ACTIVATION_SCHEMES.get(w.bits) != scheme:
        raise ValueError(f"{what}: torchq scheme {scheme!r} does not hold {w.bits}-bit weights")
    n, k = w.shape
    g = w.group_size
    groups = -(-k // g)
    half = 2 ** (w.bits - 1)
    zeros = w.zeros()
    symmetric = bool((zeros == half).all())
    perm = _perm_from_g_idx(w.g_idx, g, what) if w.g_idx is not None else None
    meta = dict(
        outer_shape=(n, k),
        outer_dtype=dtype,
        scheme=scheme or SCHEME_FOR_BITS[w.bits],
        bits=w.bits,
        group_size=g,
    )
    if w.bits == 4 and perm is None:
        # canonical packed_int4 stores q - quant_min: the unsigned code itself for both the
        # symmetric (quant_min -8, z = 8) and the asymmetric (quant_min 0) mapping
        qdata = w.packed()
        pad = groups * g // 2 - qdata.shape[1]
        if pad:
            qdata = torch.nn.functional.pad(qdata, (0, pad))
        zero = None if symmetric else zeros.to(torch.int8)
        qmin, qmax, domain = (-8, 7, ZeroPointDomain.NONE) if symmetric else (0, 15, ZeroPointDomain.INT)
        return AffineQuantizedTensor.from_canonical(
            dict(qdata=qdata.contiguous(), scale=w.scale, zero_point=zero),
            quant_min=qmin,
            quant_max=qmax,
            zero_point_domain=domain.value,
            padded_in_features=groups * g,
            **meta,
        )
    q = w.codes()
    if perm is not None:
        q = q[:, perm]
    if w.bits == 4 and not symmetric:
        codes, zero, qmin, qmax, domain = q, zeros, 0, 15, ZeroPointDomain.INT
    elif symmetric:
        codes, zero, qmin, qmax, domain = q - half, None, -half, half - 1, ZeroPointDomain.NONE
        if w.bits == 8 and (codes.numel() == 0 or int(codes.min()) > -128):
            qmin = -127  # torchq's own symmetric int8 range (its fast kernels take it); -128 stays exact
    elif w.bits == 8:
        codes, zero, qmin, qmax, domain = q - half, zeros - half, -half, half - 1, ZeroPointDomain.INT
    else:
        codes, zero, qmin, qmax, domain = q, zeros, 0, 2**w.bits - 1, ZeroPointDomain.INT
    pad = groups * g - k
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=qmin if domain is ZeroPointDomain.INT else 0)
    return AffineQuantizedTensor.from_codes(
        codes.to(torch.int8),
        w.scale,
        zero.to(torch.int8) if zero is not None else None,
        quant_min=qmin,
        quant_max=qmax,
        zero_point_domain=domain,
        perm=perm,
        **meta,
    )


# ---------------------------------------------------------------------- export
_EXPORTABLE_SCHEMES = ("int4_weight_only", "int8_weight_only", "intx_weight_only")


def from_torchq(
    t: torch.Tensor,
    *,
    what: str = "weight",
    schemes: tuple[str, ...] = _EXPORTABLE_SCHEMES,
    scale_dtype: Optional[torch.dtype] = torch.float16,
) -> IntWeight:
    """The foreign-format view of a torchq weight: unsigned codes in original column order.

    Raises a ValueError naming the torchq config that would be exportable when ``t`` has
    no lossless form (float zero point, act_scale folded in, an unsupported scheme).
    ``scale_dtype`` is what the target format stores (fp16 for AWQ/GPTQ): scales are cast to it
    (None keeps torchq's own, fp32 or fp16).
    """
    if not isinstance(t, AffineQuantizedTensor):
        raise ValueError(
            f"{what} is a {type(t).__name__}, not an integer-quantized torchq weight; quantize it with e.g. "
            "torchq.int4_weight_only(group_size=128) first"
        )
    if t.scheme not in schemes:
        raise ValueError(f"{what}: scheme {t.scheme!r} cannot be exported to this format (supported: {list(schemes)})")
    domain = ZeroPointDomain(t.zero_point_domain)
    if domain is ZeroPointDomain.FLOAT:
        raise ValueError(
            f"{what} has a float zero point (w = q*s + m), which AWQ/GPTQ/compressed-tensors cannot store; "
            f"quantize with an integer zero point: torchq.int4_weight_only(group_size={t.group_size}, "
            'zero_point_domain="int")'
        )
    if t.act_scale is not None:
        raise ValueError(
            f"{what} has an act_scale (AWQ / SmoothQuant smoothing kept apart, where no previous op could take it); this "
            "format has no place for it: calibrate with torchq.AWQ(..., unfoldable='skip') (CLI: --algo awq-exportable; "
            "SmoothQuant(..., unfoldable='skip') likewise) to leave such linears unscaled, as AutoAWQ does"
        )
    n, k = t.shape
    bits = t.bits
    half = 2 ** (bits - 1)
    shift = half if domain is ZeroPointDomain.NONE else -t.quant_min
    c = t.canonical_tensors()
    zero = None if domain is ZeroPointDomain.NONE else c["zero_point"].to(torch.int32) + shift
    g_idx = None
    codes = packed4 = None
    if bits == 4 and t.perm is None and shift == -t.quant_min and c["qdata"].dtype == torch.uint8:
        packed4 = c["qdata"][:, : -(-k // 2)]  # canonical bytes hold q - quant_min = the unsigned code
        if k % 2:
            packed4 = packed4.clone()
            packed4[:, -1] &= 0x0F  # the padding code in the last high nibble is not part of the weight
    else:
        codes = t.codes().to(torch.int32) + shift
        if t.perm is not None:
            codes = codes[:, torch.argsort(t.perm)]
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[t.perm] = torch.arange(k) // t.group_size
        codes = codes[:, :k].contiguous()
    scale = c["scale"]
    if scale_dtype is not None and scale.dtype != scale_dtype:
        scale = scale.to(scale_dtype)
    if not torch.isfinite(scale).all():
        raise ValueError(f"{what}: scales overflow {scale_dtype} (largest {float(c['scale'].abs().max()):.3g})")
    out = IntWeight(codes, scale.contiguous(), zero, bits, t.group_size, g_idx, packed4, k)
    out.validate(what)
    return out
