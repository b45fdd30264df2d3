"""Quantization grids: what an algorithm may round a weight to, for each storage config.

A :class:`Grid` is built per layer from the storage config and the weight shape. It
fits per-group parameters to float values (:meth:`Grid.fit`), rounds to codes
(:meth:`Grid.quantize`) and back (:meth:`Grid.dequantize`), all on *blocked* tensors
``(N, groups, group)``, and finally builds the ordinary torchq tensor from codes and
parameters (:meth:`Grid.build`), so algorithms share one definition of every format and
their output runs the same kernels as round-to-nearest.

Integer zero point (``zero_point_domain="int"``): algorithms fit ``[min, max]`` of each
group exactly with a *free* integer zero point (``z = round(qmin - min / s)``, stored as
int8, so it may lie outside ``qmin..qmax``; the kernels compute ``(q - z) * s`` for any
int8 ``z``). It differs from ``choose_qparams_affine``'s range-includes-0 rule only for
groups whose values all have one sign: on SmolLM2 int4 g64 none do, and both rules give
the same perplexity (21.752, 4 windows), so the issue's 19.9-vs-22.9 gap is not the
zero-point rule. Groups whose zero point would not fit int8 use the range-includes-0 rule.

Registration table: storage config type -> grid class (:func:`register_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from torchq.formats.codebook4.config import FP4WeightOnlyConfig, NF4WeightOnlyConfig
from torchq.formats.affine.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchq.quantize.configs import QuantConfig
from torchq.quantize.handlers import resolve_group
from torchq.primitives.affine import quant_range
from torchq.primitives.codebook import (
    _decision_cached,
    codebook_values,
    double_quantize_scales,
    get_codebook,
    pack_codes,
)
from torchq.formats.affine.tensor import AffineQuantizedTensor, _pad_columns
from torchq.formats.codebook4.tensor import Codebook4Tensor

__all__ = ["Grid", "AffineGrid", "CodebookGrid", "ColumnRule", "grid_for", "register_grid"]

_GRIDS: dict[type, type["Grid"]] = {}


def register_grid(*config_types: type):
    def deco(cls):
        for t in config_types:
            _GRIDS[t] = cls
        return cls

    return deco


def grid_for(config: QuantConfig, weight_shape: tuple[int, int]) -> "Grid":
    """The grid of ``config`` (a storage config) for a ``(N, K)`` weight."""
    for klass in type(config).__mro__:
        if klass in _GRIDS:
            return _GRIDS[klass](config, tuple(weight_shape))
    raise TypeError(f"no quantization grid for {type(config).__name__}; known: {sorted(k.__name__ for k in _GRIDS)}")


@dataclass(frozen=True)
class ColumnRule:
    """How a grid rounds one column, in the terms of the GPTQ column kernel
    (:mod:`torchq.kernels.cpu_gptq`): its ``mode`` and clamp range, and for codebooks the
    sorted ``levels`` and ``code_of`` (level index -> stored code)."""

    mode: str
    qmin: float
    qmax: float
    levels: Optional[torch.Tensor] = None
    code_of: Optional[torch.Tensor] = None

    def codes(self, q: torch.Tensor) -> torch.Tensor:
        """The kernel's output ``q`` as this grid's codes (floats)."""
        return q if self.code_of is None else self.code_of[q.long()].float()


class Grid:
    """Per-layer grid. ``group``: columns per group; ``padded``: K rounded up to it."""

    supports_input_transform = False  # act_scale / perm on the stored tensor
    group: int
    padded: int
    note: str

    def __init__(self, config: QuantConfig, shape: tuple[int, int]):
        self.config = config
        self.n, self.k = shape

    @property
    def groups(self) -> int:
        return self.padded // self.group

    def pad(self, w: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` float -> ``(N, padded)`` (padding never contributes: inputs are 0 there)."""
        raise NotImplementedError

    def blocked(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1, self.group)

    def fit(self, wb: torch.Tensor, shrink=1.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Parameters ``(scale, zero)`` each ``(N, G)`` for blocked values ``(N, G, g)``;
        ``shrink`` (scalar or ``(N, G)``) scales the fitted range (clipping search)."""
        raise NotImplementedError

    def quantize(self, wb: torch.Tensor, scale, zero) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, scale, zero) -> torch.Tensor:
        raise NotImplementedError

    def column_rule(self) -> ColumnRule:
        """:meth:`quantize` + :meth:`dequantize` of one column, for the GPTQ kernel."""
        raise NotImplementedError

    def fake(self, wb: torch.Tensor, scale, zero) -> torch.Tensor:
        return self.dequantize(self.quantize(wb, scale, zero), scale, zero)

    def rtn(self, w: torch.Tensor, shrink=1.0) -> torch.Tensor:
        """Round-to-nearest of ``(N, padded)`` values on this grid, as floats ``(N, padded)``."""
        wb = self.blocked(w.float())
        s, z = self.fit(wb, shrink)
        return self.fake(wb, s, z).reshape(w.shape)

    def build(self, codes, scale, zero, dtype, act_scale=None, perm=None) -> torch.Tensor:
        """The stored tensor from codes ``(N, padded)`` and parameters ``(N, G)``."""
        raise NotImplementedError

    def tensor(self, w: torch.Tensor, dtype, scale=None, zero=None, act_scale=None, perm=None) -> torch.Tensor:
        """Quantize padded ``w`` with given (or fitted) parameters and build the tensor."""
        wb = self.blocked(w.float())
        if scale is None:
            scale, zero = self.fit(wb)
        return self.build(self.quantize(wb, scale, zero).reshape(w.shape), scale, zero, dtype, act_scale, perm)


@register_grid(
    Int4WeightOnlyConfig,
    IntxWeightOnlyConfig,
    Int8WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
)
class AffineGrid(Grid):
    supports_input_transform = True
    _SCHEME = {
        Int4WeightOnlyConfig: ("int4_weight_only", 4),
        IntxWeightOnlyConfig: ("intx_weight_only", None),
        Int8WeightOnlyConfig: ("int8_weight_only", 8),
        Int8DynamicActivationInt4WeightConfig: ("w4a8", 4),
        Int8DynamicActivationInt8WeightConfig: ("w8a8", 8),
    }

    def __init__(self, config, shape):
        super().__init__(config, shape)
        self.scheme, bits = self._SCHEME[type(config)]
        self.bits = bits if bits is not None else config.bits
        if isinstance(config, (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig)):
            self.symmetric, self.domain = True, "none"
        else:
            self.symmetric, self.domain = config.symmetric, config.domain
        group_size = None if isinstance(config, Int8DynamicActivationInt8WeightConfig) else config.group_size
        g, self.note = resolve_group(self.k, group_size, getattr(config, "pad_policy", "pad"))
        self.group = self.k if g is None else g
        self.padded = -(-self.k // self.group) * self.group
        self.qmin, self.qmax = quant_range(self.bits, self.symmetric)
        self.numerics = "exact" if getattr(config, "exact_fp32", False) else "auto"

    def pad(self, w):
        return _pad_columns(w, self.group) if self.padded != self.k else w

    def fit(self, wb, shrink=1.0):
        wb = wb.float()
        shrink = torch.as_tensor(shrink, dtype=torch.float32)
        levels = float(self.qmax - self.qmin)
        if self.domain == "none":
            amax = wb.abs().amax(-1) * shrink
            s = amax / (levels / 2)
            return torch.where(s > 0, s, torch.ones_like(s)), None
        mn, mx = wb.amin(-1) * shrink, wb.amax(-1) * shrink
        s = (mx - mn) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        if self.domain == "float":
            return s, mn - self.qmin * s
        z = torch.round(self.qmin - mn / s)
        bad = (z < -128) | (z > 127)
        if bool(bad.any()):  # zero point would not fit int8: widen the range to include 0
            mn0, mx0 = mn.clamp(max=0), mx.clamp(min=0)
            s0 = (mx0 - mn0) / levels
            s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
            z0 = torch.clamp(self.qmin - torch.round(mn0 / s0), self.qmin, self.qmax)
            s, z = torch.where(bad, s0, s), torch.where(bad, z0, z)
        return s, z

    def quantize(self, wb, scale, zero):
        s = scale.unsqueeze(-1)
        if self.domain == "none":
            q = torch.round(wb / s)
        elif self.domain == "int":
            q = torch.round(wb / s) + zero.unsqueeze(-1)
        else:
            q = torch.round((wb - zero.unsqueeze(-1)) / s)
        return q.clamp(self.qmin, self.qmax)

    def dequantize(self, codes, scale, zero):
        s = scale.unsqueeze(-1)
        if self.domain == "none":
            return codes * s
        if self.domain == "int":
            return (codes - zero.unsqueeze(-1)) * s
        return codes * s + zero.unsqueeze(-1)

    def column_rule(self):
        return ColumnRule(self.domain, float(self.qmin), float(self.qmax))

    def build(self, codes, scale, zero, dtype, act_scale=None, perm=None):
        if zero is not None and self.domain == "int":
            zero = zero.to(torch.int8)
        return AffineQuantizedTensor.from_codes(
            codes.to(torch.int8), scale.float().contiguous(), None if zero is None else zero.contiguous(),
            outer_shape=(self.n, self.k), outer_dtype=dtype, scheme=self.scheme, bits=self.bits,
            group_size=self.group, quant_min=self.qmin, quant_max=self.qmax, zero_point_domain=self.domain,
            act_scale=None if act_scale is None else act_scale.float().contiguous(),
            perm=perm, numerics=self.numerics,
        )


@register_grid(NF4WeightOnlyConfig, FP4WeightOnlyConfig)
class CodebookGrid(Grid):
    """NF4 / FP4: ``w = table[q] * scale`` per block; the scale is the block's (shrunk) absmax."""

    def __init__(self, config, shape):
        super().__init__(config, shape)
        self.scheme = config.scheme
        self.cb = get_codebook(self.scheme)
        self.group, self.note = resolve_group(self.k, config.block_size, config.pad_policy)
        self.padded = -(-self.k // self.group) * self.group

    def pad(self, w):
        return F.pad(w, (0, self.padded - self.k)) if self.padded != self.k else w

    def fit(self, wb, shrink=1.0):
        amax = wb.float().abs().amax(-1) * torch.as_tensor(shrink, dtype=torch.float32)
        s = amax / self.cb.vmax
        return torch.where(s > 0, s, torch.ones_like(s)), None

    def quantize(self, wb, scale, zero):
        v = torch.clamp(wb.float() / scale.unsqueeze(-1), -self.cb.vmax, self.cb.vmax)
        codes, mids = _decision_cached(self.scheme, str(v.device))
        return codes[torch.bucketize(v, mids)].float()

    def dequantize(self, codes, scale, zero):
        table = codebook_values(self.scheme, codes.device)
        return table[codes.long()] * scale.unsqueeze(-1)

    def column_rule(self):
        code_of, _ = _decision_cached(self.scheme, "cpu")
        levels = torch.tensor([self.cb.values[c] for c in self.cb.decision_codes], dtype=torch.float32)
        return ColumnRule("codebook", -float(self.cb.vmax), float(self.cb.vmax), levels, code_of)

    def build(self, codes, scale, zero, dtype, act_scale=None, perm=None):
        if act_scale is not None or perm is not None:
            raise ValueError(f"{self.scheme} weights cannot store act_scale / perm (only integer affine weights can)")
        tensors = {"qdata": pack_codes(codes.to(torch.uint8))}
        if self.config.double_quant:
            tensors.update(zip(("scale_q", "scale_absmax", "scale_offset"), double_quantize_scales(scale.float())))
        else:
            tensors["scale"] = scale.float().contiguous()
        return Codebook4Tensor.from_canonical(
            tensors, outer_shape=(self.n, self.k), outer_dtype=dtype, scheme=self.scheme,
            block_size=self.group, padded_in_features=self.padded, double_quant=bool(self.config.double_quant),
        )
