"""HQQ (Badri & Shaji, 2023): half-quadratic optimisation of the quantization parameters
against a sparsity-promoting ``lp`` (p < 1) weight error, with no data.

Affine grids with a zero point: HQQ's zero-point iteration (shrink the residual with the
generalized soft threshold, then solve the zero point in closed form), extended with the
same closed-form step for the scale (zero point alone gained ~1 % of the proxy loss on
heavy-tailed weights), ``beta`` growing by ``kappa`` each step. An integer zero point is then rounded and the scale refitted by least
squares for the codes. Grids without a zero point (symmetric, NF4 / FP4): the same
iteration on the scale. Each group keeps the best parameters seen (round-to-nearest's
included), by the proxy loss ``sum |W - Q(W)|^p``; so HQQ never does worse than it on
that loss. Registered as a handler too: ``quantize_(model, HQQ(cfg))`` needs no data.
"""

from __future__ import annotations

import torch

from torchq.quantize.handlers import register_handler
from torchq.algorithms.configs import HQQConfig, storage_config
from torchq.algorithms.grid import AffineGrid, Grid, grid_for
from torchq.algorithms.registry import register_algorithm

__all__ = ["hqq_fit", "proxy_loss", "hqq_tensor"]


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal operator of ``|x|^p / beta``."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def proxy_loss(grid: Grid, wb: torch.Tensor, scale, zero, p: float = 0.7) -> torch.Tensor:
    """``sum |W - Q(W)|^p`` per (row, group)."""
    return (wb - grid.fake(wb, scale, zero)).abs().pow(p).sum(-1)


def _keep_better(best, cand, grid, wb, p):
    s, z, loss = best
    cs, cz = cand
    closs = proxy_loss(grid, wb, cs, cz, p)
    better = closs < loss
    return (
        torch.where(better, cs, s),
        None if z is None else torch.where(better, cz, z),
        torch.minimum(closs, loss),
    )


def hqq_fit(grid: Grid, wb: torch.Tensor, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
    """HQQ parameters ``(scale, zero)`` ``(N, G)`` for blocked weights ``(N, G, g)``.

    The iteration runs on every group at once; the proxy loss picks, per group, among
    round-to-nearest, the last iterate and (integer zero point) its rounded refit."""
    wb = wb.float()
    s, z = grid.fit(wb)
    best = (s, z, proxy_loss(grid, wb, s, z, p))
    affine = isinstance(grid, AffineGrid)
    if affine and grid.domain != "none":
        zf = z.float() if grid.domain == "int" else -z / s
        for _ in range(iters):
            q = torch.clamp(torch.round(wb / s.unsqueeze(-1) + zf.unsqueeze(-1)), grid.qmin, grid.qmax)
            we = _shrink(wb - (q - zf.unsqueeze(-1)) * s.unsqueeze(-1), beta, p)
            zf = (q - (wb - we) / s.unsqueeze(-1)).mean(-1)
            qz = q - zf.unsqueeze(-1)  # then the scale in closed form for the same target
            s2 = (qz * (wb - we)).sum(-1) / (qz * qz).sum(-1).clamp_min(1e-12)
            s = torch.where(s2 > 0, s2, s)
            beta *= kappa
        if grid.domain == "float":
            return _keep_better(best, (s, -zf * s), grid, wb, p)[:2]
        zi = torch.round(zf).clamp(-128, 127)
        best = _keep_better(best, (s, zi), grid, wb, p)
        q = grid.quantize(wb, s, zi) - zi.unsqueeze(-1)
        s2 = (q * wb).sum(-1) / (q * q).sum(-1).clamp_min(1e-12)
        best = _keep_better(best, (torch.where(s2 > 0, s2, s), zi), grid, wb, p)
        return best[0], best[1]
    ones = torch.ones_like(s)
    for _ in range(iters):
        v = grid.dequantize(grid.quantize(wb, s, z), ones, z)
        we = _shrink(wb - v * s.unsqueeze(-1), beta, p)
        s2 = (v * (wb - we)).sum(-1) / (v * v).sum(-1).clamp_min(1e-12)
        s = torch.where(s2 > 0, s2, s)
        beta *= kappa
    return _keep_better(best, (s, z), grid, wb, p)[:2]


def hqq_tensor(weight: torch.Tensor, config: HQQConfig, act_scale=None):
    """The stored tensor of ``weight`` (N, K) under HQQ, and the report note."""
    base = storage_config(config)
    w = weight.detach().float()
    if act_scale is not None:
        w = w * act_scale
    grid = grid_for(base, w.shape)
    with torch.no_grad():
        wb = grid.blocked(grid.pad(w))
        s, z = hqq_fit(grid, wb, config.iters, config.lp_norm, config.beta, config.kappa)
        t = grid.build(grid.quantize(wb, s, z).reshape(wb.shape[0], -1), s, z, weight.dtype, act_scale=act_scale)
    return t, "; ".join(n for n in (grid.note, "hqq") if n)


@register_handler(HQQConfig)
def _hqq_handler(weight, config):
    return hqq_tensor(weight, config)


@register_algorithm("hqq")
def _process(block, names, config, act_scales):
    return {n: hqq_tensor(block.linears[n].weight, config, act_scales.get(n)) for n in names}
