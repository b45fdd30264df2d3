"""The precision rule: when a weight-only kernel may use bf16 products.

One rule on every CPU, PyTorch's own switch, read when the kernel is called (and at trace
time under ``torch.compile``, which guards on it):

* fp32 activations and ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's
  default): fp32 arithmetic at every M; the result equals
  ``F.linear(x, w.dequantize(), bias)`` up to fp32 summation order.
* fp32 activations and ``"high"`` / ``"medium"``: bf16 products with fp32 accumulation
  are allowed, as PyTorch allows them for dense fp32 matmuls.
* bf16 / fp16 activations: bf16 arithmetic is always allowed (what a bf16 dense layer does).

A weight whose ``numerics`` is ``"exact"`` (config ``exact_fp32=True``) never uses bf16,
whatever the setting. Allowed is not forced: a kernel takes bf16 only from
``BF16_MIN_M`` rows and only where the CPU has a bf16 dot product (AVX512-BF16, AMX);
:func:`weight_only_route` says what it runs.
"""

from __future__ import annotations

import torch

__all__ = ["bf16_allowed", "BF16_PRECISIONS", "weight_only_route"]

#: values of torch.get_float32_matmul_precision() under which fp32 activations may use bf16
BF16_PRECISIONS = ("high", "medium")


def bf16_allowed(x_dtype: torch.dtype, weight_numerics: str = "auto") -> bool:
    """Whether a weight-only linear of activations of ``x_dtype`` may use bf16 products now."""
    if weight_numerics == "exact":
        return False
    if x_dtype != torch.float32:
        return True
    return torch.get_float32_matmul_precision() in BF16_PRECISIONS


def weight_only_route(x_dtype: torch.dtype, m: int, weight_numerics: str = "auto") -> str:
    """What the C++ weight-only kernels run for ``m`` rows of ``x_dtype`` activations on the
    current ISA path under the current precision: ``"fp32"``, ``"bf16_gemm"`` (torchq's
    AVX512-BF16 GEMM) or ``"onednn_bf16"`` (weights dequantized to bf16, oneDNN's GEMM)."""
    from torchq.kernels import cpu_ext

    if not cpu_ext.available():
        return "fp32"
    return torch.ops.torchq._weight_only_route(bf16_allowed(x_dtype, weight_numerics), m)
