"""The C++ CPU kernels as registered :class:`LinearKernel` s (priority above the references).

Each wrapper does the least Python work possible per call: one ``torch.ops.torchq`` call
with the weight's inner tensors (bias fused, output in the activation dtype). Weights
with ``act_scale`` / ``perm`` (AWQ, SmoothQuant, GPTQ act-order) go through
``weight.prepare_input`` first (fp32, divided, permuted, zero-padded), then the same op.

Numerics (all ISA paths; AVX-512 hosts run the same algorithms with 16-lane vectors and
VNNI):

* weight-only int4 / int8: fp32 math, for fp32, bf16 and fp16 activations (bf16/fp16 are
  widened exactly). Below ``GEMM_MIN_M`` rows a GEMV kernel accumulates ``sum_k u*x`` per
  group in fp32 and applies ``s * acc + zt * sum_k x``; from ``GEMM_MIN_M`` rows the weight
  is dequantized exactly as ``dequantize_affine`` does and multiplied by an fp32 FMA
  micro-kernel. On CPUs with AVX512-BF16 only, from ``BF16_MIN_M`` rows, weights whose
  ``numerics`` is ``"auto"`` (the default) run a bf16 GEMM instead: activations and the
  dequantized weight rounded to bf16 (nearest even), products accumulated in fp32 - what a
  bf16 dense layer computes - at about twice the fp32 rate. ``exact_fp32=True`` in the
  config (``numerics="exact"`` on the weight, kept in checkpoints) keeps fp32 at every M.
  AVX2 and portable CPUs have no faster bf16 dot product, so they compute in fp32 always.
* W8A8 / W4A8: activations quantized per token exactly as
  ``torchq.primitives.quantize_per_token_int8``; integer products accumulated exactly in
  int32 (per group for W4A8), then scaled in fp32.
"""

from __future__ import annotations

import torch

from . import cpu_ext
from . import cpu_layouts  # noqa: F401  (registers the tiled layouts)
from .registry import LinearKernel, register_kernel

__all__ = ["GEMM_MIN_M", "CPU_KERNELS"]

#: rows from which the weight-only kernels switch from GEMV to dequantize + GEMM.
GEMM_MIN_M = 8
#: rows from which weight-only kernels of ``numerics="auto"`` weights run the bf16 GEMM on
#: CPUs with AVX512-BF16 (``torch.ops.torchq._native_bf16()``); never on other CPUs.
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
        x, w.qdata, w.scale, w.zero_point, bias, w.group_size, w.quant_min, w.numerics == "exact"
    )


@_with_prepared_input
def int8_weight_only_linear(x, w, bias):
    return torch.ops.torchq.int8_linear.default(
        x, w.qdata, w.scale, w.zero_point, bias, w.group_size, w.numerics == "exact"
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


_WO_NUMERICS = (
    "fp32: activations widened exactly to fp32, fp32 accumulate (M<{m} per-group GEMV, else exact dequantize + "
    "fp32 GEMM); on AVX512-BF16 CPUs from M>={b}: bf16 GEMM (activations and dequantized weights rounded to "
    "bf16, fp32 accumulate) unless the weight's numerics is 'exact' (config exact_fp32=True)"
).format(m=GEMM_MIN_M, b=BF16_MIN_M)
_DYN_NUMERICS = "per-token int8 activations (bit-exact with quantize_per_token_int8), exact int32 accumulate, fp32 scale"

CPU_KERNELS = [
    LinearKernel(
        name="cpu.int4_weight_only",
        scheme="int4_weight_only",
        layout="cpu_int4_tile16",
        linear=int4_weight_only_linear,
        priority=10,
        available=cpu_ext.available,
        accepts=_int4_ok,
        numerics=_WO_NUMERICS,
    ),
    LinearKernel(
        name="cpu.int8_weight_only",
        scheme="int8_weight_only",
        layout="cpu_int8_k16",
        linear=int8_weight_only_linear,
        priority=10,
        available=cpu_ext.available,
        accepts=_int8_ok,
        numerics=_WO_NUMERICS,
    ),
    LinearKernel(
        name="cpu.intx_weight_only",
        scheme="intx_weight_only",
        layout="cpu_int8_k16",
        linear=int8_weight_only_linear,
        priority=10,
        available=cpu_ext.available,
        accepts=_int8_ok,
        numerics=_WO_NUMERICS,
    ),
    LinearKernel(
        name="cpu.w8a8",
        scheme="w8a8",
        layout="cpu_int8_k4x16",
        linear=w8a8_linear,
        priority=10,
        available=cpu_ext.available,
        accepts=_w8a8_ok,
        numerics=_DYN_NUMERICS,
    ),
    LinearKernel(
        name="cpu.w4a8",
        scheme="w4a8",
        layout="cpu_int4_tile16",
        linear=w4a8_linear,
        priority=10,
        available=cpu_ext.available,
        accepts=_int4_ok,
        numerics=_DYN_NUMERICS + " per group",
    ),
]
for _k in CPU_KERNELS:
    register_kernel(_k)
