"""Dynamic per-token activation quantization, specified bit for bit.

Kernels must reproduce these exactly (same codes, same scales) so that reference and
fast paths agree and results are deterministic for a given thread count.

Symmetric int8 (the default for W8A8 / W4A8), per row of ``x`` viewed as (M, K):
    ``amax = max(|x|)`` in fp32; ``scale = amax / 127`` (fp32 division);
    ``q = clamp(round_half_even(x / scale), -127, 127)``; a row of zeros has scale 0 and
    codes 0 (divide by 1 instead of 0).

Asymmetric uint8, per row:
    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``scale = (hi - lo) / 255``;
    ``zp = clamp(round_half_even(-lo / scale), 0, 255)``;
    ``q = clamp(round_half_even(x / scale) + zp, 0, 255)``; zero rows as above;
    ``x ~= (q - zp) * scale``.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_per_token_int8", "quantize_per_token_uint8", "fake_quantize_per_token_int8"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: returns (codes int8 (M, K), scale fp32 (M, 1))."""
    xf = _rows(x)
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] else xf.new_zeros(xf.shape[0], 1)
    scale = amax / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / safe), -127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token uint8: returns (codes uint8, scale fp32 (M, 1), zero point int32 (M, 1))."""
    xf = _rows(x)
    lo = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / safe), 0, 255)
    q = torch.clamp(torch.round(xf / safe) + zp, 0, 255).to(torch.uint8)
    return q, scale, zp.to(torch.int32)


def fake_quantize_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` after symmetric per-token int8 quantize + dequantize, same shape and dtype."""
    q, scale = quantize_per_token_int8(x)
    return (q.float() * scale).reshape(x.shape).to(x.dtype)
