"""The C++ CPU kernel of the 4-bit codebook schemes (``nf4``, ``fp4_e2m1``, ``fp4_e2m1_bnb``).

``torch.ops.torchq.codebook4_linear`` (csrc/codebook4_impl.h, dispatched per ISA like the
integer kernels): the 16 table values live in registers (AVX-512: one ``vpermps``; AVX2:
two 8-entry ``vpermps`` and a blend), fp32 / bf16 / fp16 activations are widened exactly,
bias is fused, any M (GEMV tiles below ``GEMM_MIN_M`` rows; from there the weight is
dequantized exactly as the reference does, block by block, into an fp32 GEMM
micro-kernel; bf16 routes only under the precision rule, as for the integer kernels). Double-quantized scales stay 8-bit in memory; each thread decodes them a
few tiles at a time right before use (measured cost at M=1, 1 thread: 1.0-1.2x the plain
NF4 time).

Measured on the 2-core AVX2 (Zen3) dev host, M=1, 2 threads, 4096x4096 and 11008x4096
(benchmarks/dev/dev_codebook4.py): fp4_e2m1 1.03-1.10x torchq int4 g64 latency, nf4 and
fp4_e2m1_bnb 1.2-1.3x (lookup bound: four byte planes per exact fp32 table value), nf4
with double quantization ~1.5x (before the scale decode was sped up; now ~1.1-1.2x plain
NF4); all 40-90x faster than bitsandbytes' CPU path. M=32: same as int4, 4-7x faster than
bitsandbytes.

Layouts ``cpu_codebook4_tile16.<scheme>`` (canonical ``codebook4_packed``): codes tiled
like ``cpu_int4_tile16``, fp32 scales ``[groups][16]`` per tile, double-quantized scale
codes left as they are. They add kernel-only inner tensors shared by all weights of a
scheme: ``lut`` (the 16 fp32 table values) and, with double quantization, ``dq_code``
(the 256-entry dynamic code), so nothing is built per call and ``torch.compile`` sees
ordinary inputs. Checkpoints never hold them (``to_canonical`` drops them).
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch

from torchq.primitives.codebook import codebook_values, dynamic_map, on_codebook_registered
from torchq.formats.layouts import Layout, register_layout
from torchq.kernels import cpu_ext
from torchq.kernels.cpu_kernels import WEIGHT_ONLY_NUMERICS, register_cpu_kernel, weight_only_arithmetic
from torchq.kernels.numerics import bf16_allowed
from torchq.kernels.cpu_layouts import _int4_from, _int4_rows, _int4_to
from torchq.formats.dispatch import LinearKernel

__all__ = ["CODEBOOK4_LAYOUTS", "CODEBOOK4_KERNELS", "codebook4_linear", "KERNEL_CONSTANTS"]

#: inner tensors that only kernel layouts carry (shared constants, not weight data)
KERNEL_CONSTANTS = ("lut", "dq_code")


@lru_cache(maxsize=None)
def _lut(scheme: str, device: str) -> torch.Tensor:
    return codebook_values(scheme, device)


@lru_cache(maxsize=None)
def _dq_code(device: str) -> torch.Tensor:
    return dynamic_map(device)


def _to_tiles(scheme: str, fields: dict) -> dict:
    out = _int4_to({**fields, "zero_point": None})  # tiles qdata and an fp32 scale
    out.pop("zero_point")
    device = str(fields["qdata"].device)
    out["lut"] = _lut(scheme, device)
    out["dq_code"] = _dq_code(device) if fields.get("scale_q") is not None else None
    return out


def _from_tiles(fields: dict) -> dict:
    out = _int4_from({**fields, "zero_point": None})
    out.pop("zero_point")
    return out


def _rows(fields: dict, index: torch.Tensor) -> dict:
    """Canonical packed codes (and fp32 scales, unless double-quantized) of rows ``index``
    only: embedding lookups must not untile a 49152-row table per call."""
    return _int4_rows({**fields, "zero_point": None}, index)


def codebook4_linear(x: torch.Tensor, w, bias):
    """One ``torch.ops.torchq.codebook4_linear`` call (bias fused, output in ``x.dtype``;
    bf16 products only as the precision rule allows, :mod:`torchq.kernels.numerics`)."""
    allow = bf16_allowed(x.dtype)
    if w.double_quant:
        return torch.ops.torchq.codebook4_linear.default(
            x, w.qdata, w.scale_q, w.lut, bias, w.block_size, w.dq_code, w.scale_absmax, w.scale_offset, allow
        )
    return torch.ops.torchq.codebook4_linear.default(
        x, w.qdata, w.scale, w.lut, bias, w.block_size, None, None, None, allow
    )


def _accepts(w) -> bool:
    return w.qdata.device.type == "cpu"


CODEBOOK4_LAYOUTS: dict[str, Layout] = {}
CODEBOOK4_KERNELS: list[LinearKernel] = []


def _register(scheme: str) -> None:
    """The tiled layout and the C++ kernel of one codebook format (the table is an input)."""
    CODEBOOK4_LAYOUTS[scheme] = register_layout(
        Layout(
            f"cpu_codebook4_tile16.{scheme}",
            "codebook4_packed",
            f"{scheme} codes tiled like cpu_int4_tile16, fp32 scales [groups][16] per tile, + table (C++ CPU kernel)",
            partial(_to_tiles, scheme),
            _from_tiles,
            _rows,
        )
    )
    CODEBOOK4_KERNELS.append(
        register_cpu_kernel(
            scheme,
            f"cpu_codebook4_tile16.{scheme}",
            codebook4_linear,
            _accepts,
            WEIGHT_ONLY_NUMERICS,
            weight_only_arithmetic,
        )
    )


on_codebook_registered(_register)
