"""AffineQuantizedTensor: an integer-quantized weight that stands in for an ``nn.Linear`` weight.

Outer shape and dtype are the float weight's ``(N, K)`` and dtype; inner tensors hold:

* ``qdata``: codes in storage ``layout`` (canonical: ``plain_int8`` or ``packed_int4``),
  covering ``padded_in_features`` columns (K rounded up to the group size);
* ``scale``: fp32 ``(N, groups)`` (fp16 when imported from a format that stores fp16);
* ``zero_point``: ``None`` (symmetric), int8 ``(N, groups)`` (``w = (q - z) * s``) or float
  ``(N, groups)`` (``w = q * s + m``), by ``zero_point_domain``;
* ``act_scale`` (optional, ``(K,)``): per-input-channel activation divisor folded into the
  weight by AWQ / SmoothQuant: ``y = (x / act_scale) @ W_stored^T``;
* ``perm`` (optional, ``(K,)`` int64): input-channel order of the stored columns (GPTQ
  act-order): stored column ``j`` is original column ``perm[j]``.

``scheme`` says how activations are treated (``*_weight_only``: float; ``w8a8`` /
``w4a8``: dynamic per-token int8, see :mod:`torchq.primitives.activation`); ``kernel``
names the registered kernel that computes linear for this weight.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from torchq.formats.dispatch import get_kernel, select_kernel
from torchq.primitives.affine import (
    ZeroPointDomain,
    choose_qparams_affine,
    dequantize_affine,
    quant_range,
    quantize_affine,
)
from torchq.formats.base import TorchqTensor
from torchq.formats.common import copy_same_format, embedding_arguments, has_values, slice_bounds
from torchq.formats.serialization import rebuild_checked, register_format
from torchq.formats.layouts import canonical_from_codes, codes_from_canonical, get_layout

__all__ = ["AffineQuantizedTensor", "SCHEMES", "FORMAT_NAME", "FORMAT_VERSION"]

aten = torch.ops.aten

#: ``numerics`` meta field: "auto" lets kernels use their documented faster arithmetic from
#: a row count up (see each LinearKernel.numerics); "exact" keeps fp32 at every M.
NUMERICS = ("auto", "exact")

FORMAT_NAME = "torchq.affine"
FORMAT_VERSION = 1

#: scheme -> (activation treatment, canonical layout)
SCHEMES: dict[str, tuple[str, str]] = {
    "int8_weight_only": ("float", "plain_int8"),
    "int4_weight_only": ("float", "packed_int4"),
    "intx_weight_only": ("float", "plain_int8"),
    "w8a8": ("int8_per_token", "plain_int8"),
    "w4a8": ("int8_per_token", "packed_int4"),
}

_TENSOR_FIELDS = ("qdata", "scale")
_OPTIONAL_FIELDS = ("zero_point", "act_scale", "perm")


class AffineQuantizedTensor(TorchqTensor):
    tensor_fields = _TENSOR_FIELDS
    optional_tensor_fields = _OPTIONAL_FIELDS
    meta_fields = (
        "scheme",
        "bits",
        "group_size",
        "quant_min",
        "quant_max",
        "zero_point_domain",
        "padded_in_features",
        "quant_layout",
        "kernel",
        "numerics",
    )

    # ------------------------------------------------------------------ building
    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        *,
        scheme: str,
        bits: int,
        group_size: Optional[int],
        symmetric: bool,
        zero_point_domain: ZeroPointDomain | str | None = None,
        numerics: str = "auto",
    ) -> "AffineQuantizedTensor":
        """Quantize a float ``(N, K)`` weight. ``group_size=None`` means per output channel.
        ``numerics``: ``"auto"`` lets kernels use their documented faster arithmetic for large
        M (e.g. bf16 GEMM on AVX512-BF16 CPUs); ``"exact"`` keeps fp32 at every M.

        K is zero-padded up to a multiple of ``group_size``; the padded columns get codes
        but never contribute (activations are padded with zeros).
        """
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"cannot quantize a {weight.dtype} weight: expected a floating-point tensor")
        n, k = weight.shape
        if n == 0 or k == 0:
            raise ValueError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
        domain = ZeroPointDomain(zero_point_domain or (ZeroPointDomain.NONE if symmetric else ZeroPointDomain.INT))
        if symmetric != (domain is ZeroPointDomain.NONE):
            raise ValueError(f"symmetric={symmetric} contradicts zero_point_domain={domain.value!r}")
        g = k if group_size is None else int(group_size)
        padded = -(-k // g) * g
        w = weight.detach()
        if padded != k:
            w = _pad_columns(w, g)
        qmin, qmax = quant_range(bits, symmetric)
        scale, zero = choose_qparams_affine(w, (1, g), qmin, qmax, domain)
        codes = quantize_affine(w, (1, g), scale, zero, qmin, qmax, domain)
        return cls.from_codes(
            codes,
            scale,
            zero,
            outer_shape=(n, k),
            outer_dtype=weight.dtype,
            scheme=scheme,
            bits=bits,
            group_size=g,
            quant_min=qmin,
            quant_max=qmax,
            zero_point_domain=domain,
            numerics=numerics,
        )

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: Optional[torch.Tensor],
        *,
        outer_shape: tuple[int, int],
        outer_dtype: torch.dtype,
        scheme: str,
        bits: int,
        group_size: int,
        quant_min: int,
        quant_max: int,
        zero_point_domain: ZeroPointDomain | str,
        act_scale: Optional[torch.Tensor] = None,
        perm: Optional[torch.Tensor] = None,
        numerics: str = "auto",
    ) -> "AffineQuantizedTensor":
        """Build from signed integer codes ``(N, K_padded)`` and qparams ``(N, groups)``.

        This is the entry point for importers (GGUF, AWQ, GPTQ) and algorithms: nothing is
        re-quantized, so it is lossless.
        """
        layout = SCHEMES[scheme][1]
        qdata = canonical_from_codes(layout, codes, quant_min)
        return cls.from_canonical(
            dict(qdata=qdata, scale=scale, zero_point=zero_point, act_scale=act_scale, perm=perm),
            outer_shape=outer_shape,
            outer_dtype=outer_dtype,
            scheme=scheme,
            bits=bits,
            group_size=group_size,
            quant_min=quant_min,
            quant_max=quant_max,
            zero_point_domain=ZeroPointDomain(zero_point_domain).value,
            padded_in_features=codes.shape[1],
            numerics=numerics,
        )

    @classmethod
    def from_canonical(cls, tensors: dict, *, outer_shape, outer_dtype, **meta: Any) -> "AffineQuantizedTensor":
        """Build from canonical inner tensors, validate, then pick and pack for a kernel."""
        meta = dict(meta)
        meta["quant_layout"] = SCHEMES[meta["scheme"]][1]
        meta["kernel"] = "unselected"
        meta["numerics"] = meta.get("numerics") or "auto"
        if meta["numerics"] not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {meta['numerics']!r}")
        fields = {n: tensors.get(n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
        t = cls(outer_shape=outer_shape, outer_dtype=outer_dtype, device=fields["qdata"].device, **fields, **meta)
        t._validate()
        return t._with_kernel()

    def _with_kernel(self) -> "AffineQuantizedTensor":
        """Select this weight's kernel and repack into the kernel's layout."""
        kernel = select_kernel(self.scheme, self)
        canonical = self.canonical_tensors()
        packed = get_layout(kernel.layout).to_layout(canonical)
        return self._rebuild(**packed, quant_layout=kernel.layout, kernel=kernel.name)

    def _after_device_change(self) -> "AffineQuantizedTensor":
        return self._with_kernel()

    def _metadata_problems(self) -> list[str]:
        """Metadata of the wrong type or out of its domain (a damaged checkpoint header)."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        problems = []
        if self.scheme not in SCHEMES:
            problems.append(f"unknown scheme {self.scheme!r} (known: {sorted(SCHEMES)})")
        for name in ("bits", "group_size", "quant_min", "quant_max", "padded_in_features"):
            if not is_int(getattr(self, name)):
                problems.append(f"{name} must be an integer, got {getattr(self, name)!r}")
        if problems:
            return problems
        if not 2 <= self.bits <= 8:
            problems.append(f"bits={self.bits} outside 2..8")
        elif (self.quant_min, self.quant_max) not in (quant_range(self.bits, True), quant_range(self.bits, False)):
            problems.append(f"code range [{self.quant_min}, {self.quant_max}] is not a {self.bits}-bit range")
        if self.group_size <= 0:
            problems.append(f"group_size must be positive, got {self.group_size}")
        if self.zero_point_domain not in tuple(d.value for d in ZeroPointDomain):
            problems.append(f"unknown zero_point_domain {self.zero_point_domain!r}")
        return problems

    def _validate(self) -> None:
        meta_problems = self._metadata_problems()
        if meta_problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(meta_problems))
        n, k = self.shape
        g = self.group_size
        groups = self.padded_in_features // g
        problems = []
        if self.padded_in_features % g or self.padded_in_features < k or self.padded_in_features - k >= g:
            problems.append(f"padded_in_features {self.padded_in_features} is not K={k} rounded up to group {g}")
        if tuple(self.scale.shape) != (n, groups):
            problems.append(f"scale shape {tuple(self.scale.shape)} != {(n, groups)}")
        if not self.scale.is_floating_point():
            problems.append(f"scale must be floating point, got {self.scale.dtype}")
        domain = ZeroPointDomain(self.zero_point_domain)
        if (self.zero_point is None) != (domain is ZeroPointDomain.NONE):
            problems.append(f"zero_point presence does not match zero_point_domain={domain.value!r}")
        if self.zero_point is not None and tuple(self.zero_point.shape) != (n, groups):
            problems.append(f"zero_point shape {tuple(self.zero_point.shape)} != {(n, groups)}")
        if domain is ZeroPointDomain.FLOAT and self.zero_point is not None and not self.zero_point.is_floating_point():
            problems.append("a float zero point domain needs a floating-point zero_point")
        if domain is ZeroPointDomain.INT and self.zero_point is not None and self.zero_point.dtype != torch.int8:
            problems.append(f"an int zero point domain needs an int8 zero_point, got {self.zero_point.dtype}")
        for name in ("act_scale", "perm"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (k,):
                problems.append(f"{name} shape {tuple(v.shape)} != {(k,)}")
        if self.perm is not None and self.padded_in_features != k:
            problems.append("perm (act-order) needs K to be a multiple of the group size")
        problems += self._data_problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _data_problems(self) -> list[str]:
        """Inner tensors that contradict the metadata (checked on the canonical layout, before
        any kernel sees them): code dtype/shape and range, non-finite parameters, perm."""
        n, k = self.shape
        kp, layout = self.padded_in_features, self.quant_layout
        want = {"packed_int4": (torch.uint8, (n, kp // 2)), "plain_int8": (torch.int8, (n, kp))}.get(layout)
        problems = []
        if layout == "packed_int4" and self.bits != 4:
            problems.append(f"bits={self.bits} stored in the packed_int4 layout (4-bit codes only)")
        if want and (self.qdata.dtype != want[0] or tuple(self.qdata.shape) != want[1]):
            problems.append(f"qdata must be {want[0]} {want[1]}, got {self.qdata.dtype} {tuple(self.qdata.shape)}")
        if not has_values(self.qdata):  # meta / fake tensors (skeletons, tracing): shapes only
            return problems
        if layout == "plain_int8" and self.qdata.numel() and not problems:
            lo, hi = int(self.qdata.min()), int(self.qdata.max())
            if lo < self.quant_min or hi > self.quant_max:
                problems.append(f"codes span [{lo}, {hi}], outside the {self.bits}-bit range [{self.quant_min}, {self.quant_max}]")
        for name in ("scale", "act_scale") + (("zero_point",) if self.zero_point is not None and self.zero_point.is_floating_point() else ()):
            v = getattr(self, name)
            if v is not None and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                problems.append(f"{name} holds NaN or Inf")
        if self.act_scale is not None and bool((self.act_scale == 0).any()):
            problems.append("act_scale holds zeros (it divides the activations)")
        if self.perm is not None and (
            self.perm.dtype != torch.int64 or not torch.equal(torch.sort(self.perm).values, torch.arange(k))
        ):
            problems.append(f"perm must be an int64 permutation of range({k})")
        return problems

    # ------------------------------------------------------------------ views of the data
    def canonical_tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """Inner tensors in the canonical layout (what checkpoints store)."""
        fields = {n: getattr(self, n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
        return get_layout(self.quant_layout).to_canonical(fields)

    def codes(self) -> torch.Tensor:
        """Signed integer codes, int8 ``(N, K_padded)``, in stored column order."""
        c = self.canonical_tensors()
        return codes_from_canonical(get_layout(self.quant_layout).canonical, c["qdata"], self.quant_min)

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in *stored* form: ``(N, K_padded)``, permuted, act_scale folded in."""
        c = self.canonical_tensors()
        codes = codes_from_canonical(get_layout(self.quant_layout).canonical, c["qdata"], self.quant_min)
        return dequantize_affine(
            codes, (1, self.group_size), c["scale"], c["zero_point"], self.zero_point_domain, dtype
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The effective float weight ``(N, K)``: ``F.linear(x, w.dequantize())`` equals the
        weight-only linear of this tensor (permutation undone, act_scale divided out)."""
        w = self.dequantize_stored(torch.float32)[:, : self.shape[1]]
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.act_scale is not None:
            w = w / self.act_scale.float()
        return w.to(dtype or self.dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activations in stored column order: act_scale divided, permuted, zero-padded to
        ``padded_in_features``. Returns fp32 ``(M, K_padded)``."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.act_scale is not None:
            x2 = x2 / self.act_scale.float()
        if self.perm is not None:
            x2 = x2[:, self.perm]
        pad = self.padded_in_features - x2.shape[1]
        return F.pad(x2, (0, pad)) if pad else x2

    @property
    def nbytes_quantized(self) -> int:
        """Bytes of every inner tensor (codes, scales, zero points, extras)."""
        return sum(
            getattr(self, n).numel() * getattr(self, n).element_size()
            for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS
            if getattr(self, n) is not None
        )

    def __repr__(self) -> str:
        extras = "".join(f", {n}=({getattr(self, n).shape[0]},)" for n in ("act_scale", "perm") if getattr(self, n) is not None)
        pad = f", padded_in_features={self.padded_in_features}" if self.padded_in_features != self.shape[1] else ""
        extras += ", numerics=exact" if self.numerics == "exact" else ""
        return (
            f"AffineQuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, scheme={self.scheme}, "
            f"bits={self.bits}, group_size={self.group_size}, range=[{self.quant_min}, {self.quant_max}], "
            f"zero_point={self.zero_point_domain}{pad}{extras}, layout={self.quant_layout}, kernel={self.kernel})"
        )

    # ------------------------------------------------------------------ pickling
    def __reduce_ex__(self, protocol):
        """Pickle the canonical packing plus format name and version; repack on load."""
        return (_rebuild_affine_quantized, (self.checkpoint_state(),))

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shape": tuple(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        for name in self.meta_fields:
            if name not in ("quant_layout", "kernel"):
                state[name] = getattr(self, name)
        for name, value in self.canonical_tensors().items():
            if value is not None:
                state[name] = value
        return state

    @classmethod
    def from_checkpoint_state(cls, state: dict[str, Any]) -> "AffineQuantizedTensor":
        if state.get("format") != FORMAT_NAME:
            raise ValueError(f"not a torchq affine tensor: format {state.get('format')!r}")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"torchq affine tensor format version {state.get('version')} is not supported by this torchq "
                f"(reads version {FORMAT_VERSION}); upgrade torchq"
            )
        meta = {n: state[n] for n in cls.meta_fields if n not in ("quant_layout", "kernel", "numerics")}
        meta["numerics"] = state.get("numerics", "auto")  # absent in checkpoints written before it existed
        tensors = {n: state.get(n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
        return cls.from_canonical(
            tensors, outer_shape=tuple(state["shape"]), outer_dtype=getattr(torch, state["dtype"]), **meta
        )

    def format_signature(self) -> dict[str, Any]:
        """What must agree for two tensors to hold interchangeable data."""
        # numerics is how kernels may compute, not part of the data
        sig = {n: getattr(self, n) for n in self.meta_fields if n not in ("quant_layout", "kernel", "numerics")}
        sig["shape"] = tuple(self.shape)
        sig["optional"] = tuple(n for n in _OPTIONAL_FIELDS if getattr(self, n) is not None)
        return sig


def _rebuild_affine_quantized(state: dict[str, Any]) -> AffineQuantizedTensor:
    return rebuild_checked(AffineQuantizedTensor.from_checkpoint_state, state)


def _pad_columns(w: torch.Tensor, group: int) -> torch.Tensor:
    """Pad K up to a multiple of ``group`` by repeating each row's last group's values.

    Repeating (rather than zeros) keeps the partial group's qparams those of its real
    values: a zero column would widen its range and cost accuracy.
    """
    k = w.shape[1]
    pad = -(-k // group) * group - k
    start = (k // group) * group
    real = w[:, start:]
    reps = -(-pad // real.shape[1])
    return torch.cat([w, real.repeat(1, reps)[:, :pad]], dim=1)


# ---------------------------------------------------------------------- linear / embedding
def quantized_linear(x: torch.Tensor, weight: AffineQuantizedTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear: input has {x.shape[-1]} features but the quantized weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    return get_kernel(weight.kernel).linear(x, weight, bias)


@AffineQuantizedTensor.implements_function(F.linear)
def _f_linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, AffineQuantizedTensor) or isinstance(x, AffineQuantizedTensor):
        raise NotImplementedError("F.linear with a quantized *input* is not supported; only the weight may be quantized")
    return quantized_linear(x, w, bias)


@AffineQuantizedTensor.implements_function(F.embedding)
def _f_embedding(func, types, args, kwargs):
    return embedding_lookup(*embedding_arguments(args, kwargs))


def embedding_lookup(indices: torch.Tensor, weight: AffineQuantizedTensor) -> torch.Tensor:
    """Rows ``weight[indices]`` dequantized to ``weight.dtype`` (only the rows looked up)."""
    if weight.perm is not None or weight.act_scale is not None:
        raise NotImplementedError("embedding lookup of a weight with perm/act_scale is not supported")
    flat = indices.reshape(-1)
    layout = get_layout(weight.quant_layout)
    fields = {n: getattr(weight, n) for n in _TENSOR_FIELDS + _OPTIONAL_FIELDS}
    c = layout.canonical_rows(fields, flat)  # only the rows looked up
    codes = codes_from_canonical(layout.canonical, c["qdata"], weight.quant_min)
    vals = dequantize_affine(
        codes, (1, weight.group_size), c["scale"], c["zero_point"], weight.zero_point_domain, weight.dtype
    )
    return vals[:, : weight.shape[1]].reshape(*indices.shape, weight.shape[1])


@AffineQuantizedTensor.implements(aten.embedding.default)
def _aten_embedding(func, types, args, kwargs):
    return embedding_lookup(args[1], args[0])


# ---------------------------------------------------------------------- copy_ / slicing
@AffineQuantizedTensor.implements(aten.copy_.default)
def _copy_(func, types, args, kwargs):
    return copy_same_format(args[0], args[1], AffineQuantizedTensor)


@AffineQuantizedTensor.implements(aten.slice.Tensor)
def _slice(func, types, args, kwargs):
    self = args[0]
    n, k = self.shape
    dim, start, end = slice_bounds(args, (n, k))
    c = self.canonical_tensors()
    if dim == 0:
        sub = {key: (v[start:end] if v is not None and key in ("qdata", "scale", "zero_point") else v) for key, v in c.items()}
        return _from_slice(self, sub, (end - start, k), self.padded_in_features)
    g = self.group_size
    if self.perm is not None:
        raise NotImplementedError("slicing input columns of an act-order (permuted) weight is not supported")
    if start % g or (end % g and end != k):
        raise ValueError(f"input-dimension slices must cover whole groups of {g}: got [{start}:{end}] of {k}")
    g0, g1 = start // g, -(-end // g)
    per_byte = 2 if get_layout(self.quant_layout).canonical == "packed_int4" else 1
    sub = dict(c)
    sub["qdata"] = c["qdata"][:, g0 * g // per_byte : g1 * g // per_byte]
    sub["scale"] = c["scale"][:, g0:g1]
    if c["zero_point"] is not None:
        sub["zero_point"] = c["zero_point"][:, g0:g1]
    if c["act_scale"] is not None:
        sub["act_scale"] = c["act_scale"][start:end]
    return _from_slice(self, sub, (n, end - start), (g1 - g0) * g)


def _from_slice(t: AffineQuantizedTensor, tensors: dict, shape: tuple[int, int], padded: int) -> AffineQuantizedTensor:
    meta = {n: getattr(t, n) for n in t.meta_fields if n not in ("quant_layout", "kernel")}
    meta["padded_in_features"] = padded
    return AffineQuantizedTensor.from_canonical(tensors, outer_shape=shape, outer_dtype=t.dtype, **meta)


# .pt files name the rebuild function by its v1 module path: keep it
register_format(
    FORMAT_NAME, AffineQuantizedTensor, _rebuild_affine_quantized, pickle_module="torchq.tensors.affine_quantized"
)


# ---------------------------------------------------------------------- transposed use: x @ w.t()
class TransposedQuantizedWeight(TorchqTensor):
    """``w.t()`` of a quantized weight: shape ``(K, N)``, only good as the right operand of
    ``mm`` / ``addmm`` / ``matmul`` (the aten path of ``x @ w.t()``), which run the same kernel
    as ``F.linear(x, w)``. Transposing back returns the weight itself."""

    tensor_fields = ("base",)

    def __repr__(self) -> str:
        return f"TransposedQuantizedWeight(shape={tuple(self.shape)}, base={self.base!r})"

    @property
    def nbytes_quantized(self) -> int:
        return self.base.nbytes_quantized


def _transposed(base: TorchqTensor) -> TransposedQuantizedWeight:
    n, k = base.shape
    return TransposedQuantizedWeight(outer_shape=(k, n), outer_dtype=base.dtype, device=base.device, base=base)


def _is_swap(args) -> bool:
    if args[0].dim() != 2:
        return False
    if len(args) == 1:  # aten.t
        return True
    dims = args[1:] if len(args) > 2 else args[1]
    return sorted(int(d) % 2 for d in (dims if isinstance(dims, (list, tuple)) else [dims])) == [0, 1]


@AffineQuantizedTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])
@TransposedQuantizedWeight.implements([aten.t.default, aten.transpose.int, aten.permute.default])
def _transpose(func, types, args, kwargs):
    self = args[0]
    if not _is_swap(args):
        raise NotImplementedError(f"{type(self).__name__} supports only swapping its two dims, got {func}{args[1:]}")
    # always a fresh wrapper (a view op must not return an existing tensor)
    return self.base._map_tensors(lambda t: t) if isinstance(self, TransposedQuantizedWeight) else _transposed(self)


@TransposedQuantizedWeight.implements(aten.mm.default)
def _mm(func, types, args, kwargs):
    x, wt = args
    if not isinstance(wt, TransposedQuantizedWeight) or isinstance(x, TorchqTensor):
        raise NotImplementedError("a transposed quantized weight can only be the right operand of mm")
    return quantized_linear(x, wt.base, None)


@TransposedQuantizedWeight.implements(aten.addmm.default)
def _addmm(func, types, args, kwargs):
    bias, x, wt = args
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or not isinstance(wt, TransposedQuantizedWeight):
        raise NotImplementedError("addmm with a quantized weight supports only bias + x @ w.t() (alpha = beta = 1)")
    if bias.dim() == 2 and bias.shape[0] != 1:
        return quantized_linear(x, wt.base, None) + bias
    return quantized_linear(x, wt.base, bias.reshape(-1))
