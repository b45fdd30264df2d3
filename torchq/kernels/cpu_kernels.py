"""The C++ CPU kernels as registered :class:`LinearKernel` s (priority above the references).

Each wrapper does the least Python work possible per call: one ``torch.ops.torchq`` call
with the weight's inner tensors (bias fused, output in the activation dtype). Weights
with ``act_scale`` / ``perm`` (AWQ, SmoothQuant, GPTQ act-order) go through
``weight.prepare_input`` first (fp32, divided, permuted, zero-padded), then the same op.

Numerics (all ISA paths; AVX-512 hosts run the same algorithms with 16-lane vectors and
VNNI):

* weight-only int4 / int8 (and the 4-bit codebooks): fp32 math for fp32, bf16 and fp16
  activations (bf16/fp16 are widened exactly), unless the precision rule
  (:mod:`torchq.kernels.numerics`: bf16/fp16 activations, or fp32 activations under
  ``torch.set_float32_matmul_precision("high"|"medium")``) allows bf16 products. Below
  ``GEMM_MIN_M`` rows a GEMV kernel accumulates ``sum_k u*x`` per group in fp32 and applies
  ``s * acc + zt * sum_k x``; from ``GEMM_MIN_M`` rows the weight is dequantized exactly as
  ``dequantize_affine`` does and multiplied by an fp32 FMA micro-kernel. Where bf16 is
  allowed, from ``BF16_MIN_M`` rows: on the ``amx`` path the weight is dequantized to bf16
  a chunk of rows at a time and multiplied by oneDNN (``at::mm``, AMX tiles; its bf16
  result widened to the output dtype); on the ``avx512`` path of CPUs with AVX512-BF16,
  torchq's bf16 GEMM (activations and dequantized weight rounded to bf16, fp32
  accumulate). AVX2 and portable CPUs have no faster bf16 dot product: fp32 always.
  ``exact_fp32=True`` in the config (``numerics="exact"`` on the weight, kept in
  checkpoints) keeps fp32 whatever the setting.
* W8A8 / W4A8: activations quantized per token exactly as
  ``torchq.primitives.quantize_per_token_int8``; integer products accumulated exactly in
  int32 (per group for W4A8), then scaled in fp32.
"""

from __future__ import annotations

import torch

from torchq.kernels import cpu_ext
from torchq.kernels import cpu_layouts  # noqa: F401  (registers the tiled layouts)
from torchq.kernels import (  # noqa: F401  (fake implementations and autograd of the ops, registered at load)
    cpu_ops,
)
from torchq.kernels.numerics import bf16_allowed, weight_only_route
from torchq.formats.dispatch import LinearKernel, register_kernel

__all__ = ["GEMM_MIN_M", "BF16_MIN_M", "CPU_KERNELS", "WEIGHT_ONLY_NUMERICS", "register_cpu_kernel", "weight_only_arithmetic"]

#: rows from which the weight-only kernels switch from GEMV to dequantize + GEMM.
GEMM_MIN_M = 8
#: rows from which weight-only kernels run a bf16 route where the precision rule allows it
#: and the CPU has a bf16 dot product (``torchq.kernels.numerics.weight_only_route``).
BF16_MIN_M = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    return torch.ops.torchq


def _with_prepared_input(fn):
    """Run ``fn`` directly, or on ``weight.prepare_input(x)`` when the weight carries an
    activation scale or permutation (the result is reshaped and cast back)."""

    def linear(x, weight, bias):
        if weight.act_scale is None and weight.perm is None:
            return fn(x, weight, bias)
        y = fn(weight.prepare_input(x), weight, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    linear.__name__ = fn.__name__
    linear.__doc__ = fn.__doc__
    return linear


@_with_prepared_input
def int4_weight_only_linear(x, w, bias):
    return torch.ops.torchq.int4_linear.default(
        x, w.qdata, w.scale, w.zero_point, bias, w.group_size, w.quant_min, bf16_allowed(x.dtype, w.numerics)
    )


@_with_prepared_input
def int8_weight_only_linear(x, w, bias):
    return torch.ops.torchq.int8_linear.default(
        x, w.qdata, w.scale, w.zero_point, bias, w.group_size, bf16_allowed(x.dtype, w.numerics)
    )


@_with_prepared_input
def w4a8_linear(x, w, bias):
    return torch.ops.torchq.w4a8_linear.default(x, w.qdata, w.scale, w.zero_point, bias, w.group_size, w.quant_min)


@_with_prepared_input
def w8a8_linear(x, w, bias):
    return torch.ops.torchq.w8a8_linear.default(x, w.qdata, w.scale, bias)


# ---------------------------------------------------------------------- accepts()
def _common_ok(w) -> bool:
    # "meta": skeletons built on the meta device keep their kernel and layout through
    # to_empty(device="cpu") and checkpoint loading, so they must pick the CPU kernel too.
    zp = w.zero_point
    return (
        w.qdata.device.type in ("cpu", "meta")
        and w.scale.dtype in _FLOAT_DTYPES
        and (zp is None or zp.dtype == torch.int8 or zp.dtype in _FLOAT_DTYPES)
    )


def _int4_ok(w) -> bool:
    return _common_ok(w) and w.bits == 4 and w.group_size % 8 == 0


def _int8_ok(w) -> bool:
    return _common_ok(w)


def _w8a8_ok(w) -> bool:
    # per-channel symmetric int8 only: |w| <= 127 keeps the AVX2 byte-pair sums in int16
    return (
        _common_ok(w) and w.zero_point is None and w.group_size == w.padded_in_features and w.quant_min >= -127
    )


WEIGHT_ONLY_NUMERICS = (
    "fp32: activations widened exactly to fp32, fp32 accumulate (M<{m} per-group GEMV, else exact dequantize + "
    "fp32 GEMM); where the precision rule allows bf16 (bf16/fp16 activations, or fp32 matmul precision "
    "'high'/'medium') and the CPU has bf16 dot products, from M>={b}: bf16 products, fp32 accumulate "
    "(amx path: oneDNN GEMM on bf16-dequantized weights, bf16 result; avx512-bf16: torchq's bf16 GEMM); "
    "never for weights with numerics 'exact' (config exact_fp32=True)"
).format(m=GEMM_MIN_M, b=BF16_MIN_M)
def weight_only_arithmetic(w) -> str:
    """Route now for activations of the weight's dtype: GEMV rows, then from BF16_MIN_M."""
    large = weight_only_route(w.dtype, BF16_MIN_M, getattr(w, "numerics", "auto"))
    return "fp32" if large == "fp32" else f"fp32 (M<{BF16_MIN_M}), {large} (M>={BF16_MIN_M})"


def _dynamic_arithmetic(_w) -> str:
    return "int8 x int8 -> int32"


_DYN_NUMERICS = "per-token int8 activations (bit-exact with quantize_per_token_int8), exact int32 accumulate, fp32 scale"

#: (scheme, layout, linear, accepts, numerics, arithmetic): one C++ kernel per scheme,
#: registered as ``cpu.<scheme>`` above the references (priority 10).
_TABLE = (
    ("int4_weight_only", "cpu_int4_tile16", int4_weight_only_linear, _int4_ok, WEIGHT_ONLY_NUMERICS, weight_only_arithmetic),
    ("int8_weight_only", "cpu_int8_k16", int8_weight_only_linear, _int8_ok, WEIGHT_ONLY_NUMERICS, weight_only_arithmetic),
    ("intx_weight_only", "cpu_int8_k16", int8_weight_only_linear, _int8_ok, WEIGHT_ONLY_NUMERICS, weight_only_arithmetic),
    ("w8a8", "cpu_int8_k4x16", w8a8_linear, _w8a8_ok, _DYN_NUMERICS, _dynamic_arithmetic),
    ("w4a8", "cpu_int4_tile16", w4a8_linear, _int4_ok, _DYN_NUMERICS + " per group", _dynamic_arithmetic),
)

def register_cpu_kernel(scheme, layout, linear, accepts, numerics, arithmetic) -> LinearKernel:
    """Register ``cpu.<scheme>``: a C++ kernel, above the references (priority 10), available
    once the extension builds."""
    return register_kernel(
        LinearKernel(
            name=f"cpu.{scheme}",
            scheme=scheme,
            layout=layout,
            linear=linear,
            priority=10,
            available=cpu_ext.available,
            accepts=accepts,
            numerics=numerics,
            arithmetic=arithmetic,
        )
    )


CPU_KERNELS = [register_cpu_kernel(*entry) for entry in _TABLE]
