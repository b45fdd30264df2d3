"""Codebook4Tensor: a 4-bit codebook weight (NF4, FP4 e2m1, bitsandbytes FP4) for ``nn.Linear``.

Outer shape and dtype are the float weight's ``(N, K)`` and dtype; inner tensors hold:

* ``qdata``: uint8 ``(N, K_padded / 2)``, two 4-bit table indices per byte, even column in
  the LOW nibble (torchq canonical; bitsandbytes is high-nibble-first, see
  :func:`torchq.primitives.codebook.swap_nibbles`);
* either ``scale``: fp32 ``(N, K_padded / block_size)`` block scales,
* or (double quantization, QLoRA) ``scale_q`` uint8 ``(N, blocks)``, ``scale_absmax`` fp32
  ``(ceil(N * blocks / 256),)`` and ``scale_offset`` fp32 ``(1,)``:
  ``scale = dynamic[scale_q] * scale_absmax[i // 256] + scale_offset`` over the row-major
  flattened scales.

Kernel layouts may add shared constants as inner tensors (``lut``: the 16 table values,
``dq_code``: the dynamic code; see :mod:`torchq.kernels.cpu_codebook4`); they are not
weight data, not counted in ``nbytes_quantized`` and never checkpointed.

``scheme`` is the format name (``nf4``, ``fp4_e2m1``, ``fp4_e2m1_bnb``; the table lives in
:mod:`torchq.primitives.codebook`), ``w = table[q] * scale`` per block of ``block_size``
columns. K is zero-padded up to a multiple of ``block_size`` (``padded_in_features``);
zero columns do not change a block's absmax. ``kernel`` names the registered kernel.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from torchq.formats.dispatch import select_kernel
from torchq.primitives.codebook import (
    BLOCK_SIZES,
    CODEBOOK_FORMATS,
    DOUBLE_QUANT_BLOCK,
    double_dequantize_scales,
    double_quantize_scales,
    dequantize_codebook,
    dynamic_map,
    pack_codes,
    quantize_codebook,
    swap_nibbles,
    unpack_codes,
)
from torchq.formats.serialization import rebuild_checked, register_format
from torchq.formats.affine.tensor import _transpose, quantized_linear
from torchq.formats.base import TorchqTensor
from torchq.formats.common import (
    check_checkpoint_header,
    checkpoint_header,
    copy_same_format,
    embedding_arguments,
    has_values,
    inner_nbytes,
    slice_bounds,
)
from torchq.formats.layouts import Layout, get_layout, register_layout

__all__ = ["Codebook4Tensor", "CODEBOOK4_LAYOUT", "FORMAT_NAME", "FORMAT_VERSION", "BLOCK_SIZES"]

aten = torch.ops.aten

FORMAT_NAME = "torchq.codebook4"
FORMAT_VERSION = 1

CODEBOOK4_LAYOUT = register_layout(
    Layout(
        "codebook4_packed",
        "codebook4_packed",
        "4-bit table indices, two per byte, low nibble = even column (N, K_padded/2); fp32 or double-quantized block scales",
    )
)

_TENSOR_FIELDS = ("qdata",)
_DATA_FIELDS = ("scale", "scale_q", "scale_absmax", "scale_offset")
_KERNEL_CONSTANTS = ("lut", "dq_code")
_OPTIONAL_FIELDS = _DATA_FIELDS + _KERNEL_CONSTANTS
_DQ_FIELDS = ("scale_q", "scale_absmax", "scale_offset")


class Codebook4Tensor(TorchqTensor):
    tensor_fields = _TENSOR_FIELDS
    optional_tensor_fields = _OPTIONAL_FIELDS
    meta_fields = ("scheme", "block_size", "padded_in_features", "double_quant", "quant_layout", "kernel")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_float(
        cls, weight: torch.Tensor, *, scheme: str, block_size: int = 64, double_quant: bool = False
    ) -> "Codebook4Tensor":
        """Quantize a float ``(N, K)`` weight; K is zero-padded to a multiple of ``block_size``."""
        _check_scheme(scheme)
        _check_block(block_size)
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"cannot quantize a {weight.dtype} weight: expected a floating-point tensor")
        n, k = weight.shape
        if n == 0 or k == 0:
            raise ValueError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
        padded = -(-k // block_size) * block_size
        w = weight.detach()
        if padded != k:
            w = F.pad(w, (0, padded - k))
        codes, scale = quantize_codebook(w, block_size, scheme)
        tensors: dict[str, Optional[torch.Tensor]] = {"qdata": pack_codes(codes)}
        if double_quant:
            tensors.update(zip(_DQ_FIELDS, double_quantize_scales(scale)))
        else:
            tensors["scale"] = scale
        return cls.from_canonical(
            tensors,
            outer_shape=(n, k),
            outer_dtype=weight.dtype,
            scheme=scheme,
            block_size=block_size,
            padded_in_features=padded,
            double_quant=bool(double_quant),
        )

    @classmethod
    def from_canonical(cls, tensors: dict, *, outer_shape, outer_dtype, **meta: Any) -> "Codebook4Tensor":
        """Build from canonical inner tensors, validate, then pick a kernel and repack for it."""
        meta = dict(meta)
        meta["quant_layout"] = CODEBOOK4_LAYOUT.name
        meta["kernel"] = "unselected"
        fields = {n: tensors.get(n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
        t = cls(outer_shape=outer_shape, outer_dtype=outer_dtype, device=fields["qdata"].device, **fields, **meta)
        t._validate()
        return t._with_kernel()

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any, dtype: Optional[torch.dtype] = None) -> "Codebook4Tensor":
        """Import a bitsandbytes 4-bit weight (``Params4bit.data`` and its ``QuantState``), losslessly.

        Needs a 2-D weight with K a multiple of the block size (bitsandbytes' blocks run
        over the flattened tensor, so only then do they coincide with torchq's row blocks).
        """
        shape = tuple(quant_state.shape)
        bs = int(quant_state.blocksize)
        if len(shape) != 2 or shape[1] % bs:
            raise ValueError(
                f"bitsandbytes weight of shape {shape} with blocksize {bs}: torchq imports 2-D weights whose "
                "in_features are a multiple of the block size"
            )
        scheme = {"nf4": "nf4", "fp4": "fp4_e2m1_bnb"}.get(quant_state.quant_type)
        if scheme is None:
            raise ValueError(f"unsupported bitsandbytes quant_type {quant_state.quant_type!r} (nf4 or fp4)")
        n, k = shape
        raw = packed.reshape(-1)
        if raw.dtype != torch.uint8:
            raw = raw.view(torch.uint8)
        qdata = swap_nibbles(raw[: n * k // 2].reshape(n, k // 2))
        tensors: dict[str, Optional[torch.Tensor]] = {"qdata": qdata}
        if getattr(quant_state, "nested", False):
            s2 = quant_state.state2
            if int(s2.blocksize) != DOUBLE_QUANT_BLOCK or not torch.equal(s2.code.float().cpu(), dynamic_map()):
                raise ValueError("nested bitsandbytes statistics must use the dynamic map with blocks of 256")
            tensors["scale_q"] = quant_state.absmax.reshape(n, k // bs).to(torch.uint8)
            tensors["scale_absmax"] = s2.absmax.float().reshape(-1)
            tensors["scale_offset"] = torch.as_tensor(quant_state.offset, dtype=torch.float32).reshape(1)
        else:
            tensors["scale"] = quant_state.absmax.float().reshape(n, k // bs)
        return cls.from_canonical(
            tensors,
            outer_shape=shape,
            outer_dtype=dtype or quant_state.dtype,
            scheme=scheme,
            block_size=bs,
            padded_in_features=k,
            double_quant=bool(getattr(quant_state, "nested", False)),
        )

    def _with_kernel(self) -> "Codebook4Tensor":
        kernel = select_kernel(self.scheme, self)
        packed = get_layout(kernel.layout).to_layout(self.canonical_tensors())
        return self._rebuild(**packed, quant_layout=kernel.layout, kernel=kernel.name)

    def _validate(self) -> None:
        n, k = self.shape
        bs = self.block_size
        problems = []
        if self.scheme not in CODEBOOK_FORMATS:
            problems.append(f"unknown scheme {self.scheme!r} (known: {sorted(CODEBOOK_FORMATS)})")
        if bs not in BLOCK_SIZES:
            raise ValueError(f"invalid {type(self).__name__}: block_size {bs!r} not in {BLOCK_SIZES}")
        kp = self.padded_in_features
        if kp % bs or kp < k or kp - k >= bs:
            problems.append(f"padded_in_features {kp} is not K={k} rounded up to block {bs}")
        blocks = kp // bs if bs else 0
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != (n, kp // 2):
            problems.append(f"qdata must be uint8 {(n, kp // 2)}, got {self.qdata.dtype} {tuple(self.qdata.shape)}")
        present = {f for f in _DATA_FIELDS if getattr(self, f) is not None}
        want = set(_DQ_FIELDS) if self.double_quant else {"scale"}
        if present != want:
            problems.append(f"double_quant={self.double_quant} needs inner tensors {sorted(want)}, got {sorted(present)}")
        elif self.double_quant:
            nsb = -(-(n * blocks) // DOUBLE_QUANT_BLOCK)
            if self.scale_q.dtype != torch.uint8 or tuple(self.scale_q.shape) != (n, blocks):
                problems.append(f"scale_q must be uint8 {(n, blocks)}, got {self.scale_q.dtype} {tuple(self.scale_q.shape)}")
            if self.scale_absmax.dtype != torch.float32 or tuple(self.scale_absmax.shape) != (nsb,):
                problems.append(f"scale_absmax must be fp32 {(nsb,)}, got {self.scale_absmax.dtype} {tuple(self.scale_absmax.shape)}")
            if self.scale_offset.dtype != torch.float32 or tuple(self.scale_offset.shape) != (1,):
                problems.append(f"scale_offset must be fp32 (1,), got {self.scale_offset.dtype} {tuple(self.scale_offset.shape)}")
        elif self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (n, blocks):
            problems.append(f"scale must be fp32 {(n, blocks)}, got {self.scale.dtype} {tuple(self.scale.shape)}")
        for name in ("scale", "scale_absmax", "scale_offset"):
            v = getattr(self, name, None)
            if v is not None and has_values(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                problems.append(f"{name} holds NaN or Inf")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    # ------------------------------------------------------------------ views of the data
    def canonical_tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """Inner tensors in the canonical layout (what checkpoints store)."""
        fields = {n: getattr(self, n) for n in _TENSOR_FIELDS + _DATA_FIELDS}
        return get_layout(self.quant_layout).to_canonical(fields)

    def codes(self) -> torch.Tensor:
        """Table indices, uint8 ``(N, K_padded)``."""
        return unpack_codes(self.canonical_tensors()["qdata"])

    def block_scales(self) -> torch.Tensor:
        """fp32 block scales ``(N, K_padded / block_size)`` (double quantization decoded)."""
        c = self.canonical_tensors()
        if self.double_quant:
            return double_dequantize_scales(c["scale_q"], c["scale_absmax"], c["scale_offset"])
        return c["scale"]

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight including padded columns: ``(N, K_padded)``."""
        return dequantize_codebook(self.codes(), self.block_scales(), self.block_size, self.scheme, dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The effective float weight ``(N, K)``: ``F.linear(x, w.dequantize())`` is this weight's linear."""
        w = self.dequantize_stored(torch.float32)[:, : self.shape[1]]
        return w.to(dtype or self.dtype)

    def to_bnb(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, absmax)`` in bitsandbytes' layout (high nibble first, ``(N*K/2, 1)`` uint8,
        fp32 absmax per block) for an NF4 / bnb-FP4 weight with K a multiple of the block size."""
        if self.scheme not in ("nf4", "fp4_e2m1_bnb") or self.padded_in_features != self.shape[1]:
            raise ValueError("to_bnb needs an nf4 or fp4_e2m1_bnb weight whose K is a multiple of the block size")
        packed = swap_nibbles(self.canonical_tensors()["qdata"]).reshape(-1, 1)
        return packed, self.block_scales().reshape(-1)

    @property
    def nbytes_quantized(self) -> int:
        """Bytes of the weight data (packed codes and scales, double-quantized or not); the
        shared kernel constants (``lut``, ``dq_code``) are not counted."""
        return inner_nbytes(self) - sum(
            getattr(self, n).numel() * getattr(self, n).element_size()
            for n in _KERNEL_CONSTANTS
            if getattr(self, n) is not None
        )

    def __repr__(self) -> str:
        pad = f", padded_in_features={self.padded_in_features}" if self.padded_in_features != self.shape[1] else ""
        dq = ", double_quant=True" if self.double_quant else ""
        return (
            f"Codebook4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, scheme={self.scheme}, "
            f"block_size={self.block_size}{dq}{pad}, layout={self.quant_layout}, kernel={self.kernel})"
        )

    # ------------------------------------------------------------------ pickling
    def __reduce_ex__(self, protocol):
        """Pickle the canonical packing plus format name and version; repack on load."""
        return (_rebuild_codebook4, (self.checkpoint_state(),))

    def _meta(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.meta_fields if n not in ("quant_layout", "kernel")}

    def checkpoint_state(self) -> dict[str, Any]:
        state = checkpoint_header(self, FORMAT_NAME, FORMAT_VERSION)
        state.update(self._meta())
        for name, value in self.canonical_tensors().items():
            if value is not None:
                state[name] = value
        return state

    @classmethod
    def from_checkpoint_state(cls, state: dict[str, Any]) -> "Codebook4Tensor":
        check_checkpoint_header(state, FORMAT_NAME, FORMAT_VERSION)
        meta = {n: state[n] for n in cls.meta_fields if n not in ("quant_layout", "kernel")}
        meta["double_quant"] = bool(meta["double_quant"])
        tensors = {n: state.get(n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
        return cls.from_canonical(
            tensors, outer_shape=tuple(state["shape"]), outer_dtype=getattr(torch, state["dtype"]), **meta
        )

    def format_signature(self) -> dict[str, Any]:
        """What must agree for two tensors to hold interchangeable data."""
        sig = self._meta()
        sig["shape"] = tuple(self.shape)
        if self.double_quant:
            sig["scale_absmax"] = tuple(self.scale_absmax.shape)
        return sig


def _rebuild_codebook4(state: dict[str, Any]) -> Codebook4Tensor:
    return rebuild_checked(Codebook4Tensor.from_checkpoint_state, state)


def _check_scheme(scheme: str) -> None:
    if scheme not in CODEBOOK_FORMATS:
        raise ValueError(f"unknown 4-bit codebook scheme {scheme!r}; known: {sorted(CODEBOOK_FORMATS)}")


def _check_block(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


# ---------------------------------------------------------------------- linear / embedding
@Codebook4Tensor.implements_function(F.linear)
def _f_linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, Codebook4Tensor) or isinstance(x, Codebook4Tensor):
        raise NotImplementedError("F.linear with a quantized *input* is not supported; only the weight may be quantized")
    return quantized_linear(x, w, bias)


# x @ w.t() / addmm: the transposed wrapper runs the same kernel as F.linear
Codebook4Tensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(_transpose)


@Codebook4Tensor.implements_function(F.embedding)
def _f_embedding(func, types, args, kwargs):
    indices, weight = embedding_arguments(args, kwargs)
    return embedding_lookup(indices, weight)


@Codebook4Tensor.implements(aten.embedding.default)
def _aten_embedding(func, types, args, kwargs):
    return embedding_lookup(args[1], args[0])


def embedding_lookup(indices: torch.Tensor, weight: Codebook4Tensor) -> torch.Tensor:
    """Rows ``weight[indices]`` dequantized to ``weight.dtype`` (only the rows looked up: the
    layout gathers them without converting the whole table)."""
    flat = indices.reshape(-1)
    fields = {n: getattr(weight, n) for n in _TENSOR_FIELDS + _DATA_FIELDS}
    rows = get_layout(weight.quant_layout).canonical_rows(fields, flat)
    codes = unpack_codes(rows["qdata"])
    blocks = weight.padded_in_features // weight.block_size
    if weight.double_quant:
        # Second-level statistics are stored canonically in every layout. Same elementwise
        # arithmetic as decoding all scales, restricted to these rows.
        pos = flat.unsqueeze(1) * blocks + torch.arange(blocks, device=flat.device)
        q = weight.scale_q.reshape(-1)[pos]
        scale = dynamic_map(q.device)[q.long()] * weight.scale_absmax[pos // DOUBLE_QUANT_BLOCK] + weight.scale_offset
    else:
        scale = rows["scale"]
    vals = dequantize_codebook(codes, scale, weight.block_size, weight.scheme, torch.float32)
    return vals[:, : weight.shape[1]].to(weight.dtype).reshape(*indices.shape, weight.shape[1])


# ---------------------------------------------------------------------- copy_ / slicing
@Codebook4Tensor.implements(aten.copy_.default)
def _copy_(func, types, args, kwargs):
    return copy_same_format(args[0], args[1], Codebook4Tensor)


@Codebook4Tensor.implements(aten.slice.Tensor)
def _slice(func, types, args, kwargs):
    """Rows: any range. Columns: whole blocks only. A double-quantized weight keeps its
    second-level statistics when a row slice starts on a 256-scale boundary; otherwise the
    slice stores its decoded fp32 scales (the same values, so the same dequantized weight)."""
    self = args[0]
    n, k = self.shape
    dim, start, end = slice_bounds(args, (n, k))
    c = self.canonical_tensors()
    bs = self.block_size
    blocks = self.padded_in_features // bs
    if dim == 0:
        sub: dict[str, Optional[torch.Tensor]] = {"qdata": c["qdata"][start:end]}
        if not self.double_quant:
            sub["scale"] = c["scale"][start:end]
        elif (start * blocks) % DOUBLE_QUANT_BLOCK == 0:
            sub["scale_q"] = c["scale_q"][start:end]
            lo = start * blocks // DOUBLE_QUANT_BLOCK
            hi = -(-(end * blocks) // DOUBLE_QUANT_BLOCK)
            sub["scale_absmax"] = c["scale_absmax"][lo:hi]
            sub["scale_offset"] = c["scale_offset"]
        else:
            sub["scale"] = self.block_scales()[start:end]
        return _from_slice(self, sub, (end - start, k), self.padded_in_features, "scale_q" in sub)
    if start % bs or (end % bs and end != k):
        raise ValueError(f"input-dimension slices must cover whole blocks of {bs}: got [{start}:{end}] of {k}")
    g0, g1 = start // bs, -(-end // bs)
    sub = {"qdata": c["qdata"][:, g0 * bs // 2 : g1 * bs // 2], "scale": self.block_scales()[:, g0:g1]}
    return _from_slice(self, sub, (n, end - start), (g1 - g0) * bs, False)


def _from_slice(t: Codebook4Tensor, tensors: dict, shape: tuple[int, int], padded: int, dq: bool) -> Codebook4Tensor:
    meta = t._meta()
    meta["padded_in_features"] = padded
    meta["double_quant"] = dq
    tensors = {key: (v.contiguous() if v is not None else None) for key, v in tensors.items()}
    return Codebook4Tensor.from_canonical(tensors, outer_shape=shape, outer_dtype=t.dtype, **meta)


# .pt files name the rebuild function by its v1 module path: keep it
register_format(FORMAT_NAME, Codebook4Tensor, _rebuild_codebook4, pickle_module="torchq.tensors.codebook4")
