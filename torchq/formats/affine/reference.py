"""Reference linear kernels in plain PyTorch: the numerical definition of every scheme.

Weight-only schemes: ``y = x @ dequantize(W)^T + bias`` computed in fp32, cast to x.dtype.

Dynamic-activation schemes (``w8a8``, ``w4a8``): activations are quantized per token to
symmetric int8 exactly as :func:`torchq.primitives.quantize_per_token_int8` specifies
(after ``act_scale``, ``perm`` and zero padding), then
``y = (q_x * s_x) @ W_stored^T + bias`` in fp32, where ``W_stored`` is the dequantized
weight in stored column order. The integer products are exact; only the fp32 sums
round, which is the tolerance fast kernels are held to.

Reference kernels are always available and register with priority 0; fast kernels
register with higher priority.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from torchq.primitives.activation import quantize_per_token_int8
from torchq.formats.dispatch import LinearKernel, register_kernel

__all__ = ["weight_only_reference", "dynamic_int8_reference", "int_accumulators"]


def _finish(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], n: int) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def weight_only_reference(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = F.linear(x.reshape(-1, x.shape[-1]).float(), weight.dequantize(torch.float32))
    return _finish(y, x, bias, weight.shape[0])


def dynamic_int8_reference(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    xq, xs = quantize_per_token_int8(weight.prepare_input(x))
    y = F.linear(xq.float() * xs, weight.dequantize_stored(torch.float32))
    return _finish(y, x, bias, weight.shape[0])


def int_accumulators(x: torch.Tensor, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-group integer sums of a dynamic scheme, for kernel tests.

    Returns ``(acc, xs, xsum)``: ``acc[m, n, g] = sum_k qx[m,k] * (q[n,k] - z[n,g])``
    (``z = 0`` unless the zero point domain is ``int``), int64; ``xs`` the (M, 1) activation
    scales; ``xsum[m, g] = sum_k qx[m, k]`` (needed by the float zero point domain).
    """
    xq, xs = quantize_per_token_int8(weight.prepare_input(x))
    codes = weight.codes().to(torch.int64)
    if weight.zero_point_domain == "int":
        z = weight.canonical_tensors()["zero_point"].to(torch.int64)
        codes = codes - z.repeat_interleave(weight.group_size, dim=1)
    m, kp = xq.shape
    g = weight.group_size
    xg = xq.to(torch.int64).reshape(m, kp // g, g)
    wg = codes.reshape(codes.shape[0], kp // g, g)
    acc = torch.einsum("mgk,ngk->mng", xg.double(), wg.double()).round().to(torch.int64)
    return acc, xs, xg.sum(-1)


for _scheme in ("int8_weight_only", "int4_weight_only", "intx_weight_only"):
    register_kernel(
        LinearKernel(
            name=f"reference.{_scheme}",
            scheme=_scheme,
            layout={"int4_weight_only": "packed_int4"}.get(_scheme, "plain_int8"),
            linear=weight_only_reference,
            numerics="fp32 dequantize + fp32 matmul (plain PyTorch)",
        )
    )
for _scheme, _layout in (("w8a8", "plain_int8"), ("w4a8", "packed_int4")):
    register_kernel(
        LinearKernel(
            name=f"reference.{_scheme}",
            scheme=_scheme,
            layout=_layout,
            linear=dynamic_int8_reference,
            numerics="per-token int8 activations, fp32 matmul (plain PyTorch)",
            arithmetic=lambda _w: "int8 activations, fp32 matmul",
        )
    )
