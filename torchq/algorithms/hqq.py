"""HQQ (Badri & Shaji, 2023): data-free optimisation of each group's scale and zero point
against an ``lp`` weight error ``sum |W - Q(W)|^p``.

Two solvers, chosen by ``lp_norm``:

* ``p <= 1`` (the paper's setting, p = 0.7): the half-quadratic proximal iteration (shrink
  the residual with the generalized soft threshold, then solve the zero point in closed
  form; here also the scale), ``beta`` growing by ``kappa`` each step. An integer zero
  point is then rounded and the scale refitted by least squares for the codes.
* ``p > 1`` (the default, p = 3): a search over the group's (scale, zero point): the range
  width ``(max - min) x f`` for ``f`` in :data:`SEARCH_FACTORS` (1.00 .. 1.16), centred on the
  group, with the integer zero points next to the centre's (``-1, 0, +1``); symmetric and
  codebook grids search the scale alone. Padding columns (K not a multiple of the group)
  count neither in the range nor in the loss.

Why the default departs from the paper: on SmolLM2-135M int4 g64 (LM head float, 24 windows,
float 15.59, round-to-nearest 20.78) the p = 0.7 iteration measured 20.42 (7 % of the gap):
an integer zero point removes most of what a free zero point buys, and a sparsity-promoting
``p < 1`` happily clips a group's extreme weights, which this model's outputs need (a
``p < 1`` *search* measured 41 on 8 windows). Searching widths 0.90 .. 1.16 on 8 windows
(float 17.60, RTN 23.65): p = 2 (weight MSE) 23.7, p = 3 21.83, p = 4 22.02, p = 6 23.1;
p = 3 on 24 windows 19.31 (28 % of the gap). At g128 the widths below 1 cost perplexity
(24.52 against RTN 23.35 on 8 windows) and 1.00 .. 1.16 gains (22.60); at g64 1.00 .. 1.16
measured 21.70 on 8 windows and 19.34 on 24 (28 % of the gap, KL 0.325 vs 0.350). Each group keeps the best parameters seen, round-to-nearest's
included, by its proxy loss, so HQQ never does worse than it on that loss. Registered as a
handler too: ``quantize_(model, HQQ(cfg))`` needs no data.
"""

from __future__ import annotations

import torch

from torchq.quantize.handlers import register_handler
from torchq.algorithms.configs import HQQConfig, storage_config
from torchq.algorithms.grid import AffineGrid, Grid, grid_for
from torchq.algorithms.registry import register_algorithm

__all__ = ["hqq_fit", "proxy_loss", "hqq_tensor", "lp_search", "SEARCH_FACTORS"]

#: range-width factors the ``p > 1`` search tries (1.0: the group's min..max; none below:
#: clipping a group's extremes cost perplexity at g128, see the module docstring)
SEARCH_FACTORS = tuple(round(1.0 + 0.02 * i, 2) for i in range(9))
_ROWS = 512  # rows per chunk of the search (bounded temporaries)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal operator of ``|x|^p / beta``."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def _lp(err: torch.Tensor, p: float) -> torch.Tensor:
    a = err.abs()
    if p == 3:
        return (a * a * a).sum(-1)
    if p == 2:
        return (a * a).sum(-1)
    return a.pow(p).sum(-1)


def proxy_loss(grid: Grid, wb: torch.Tensor, scale, zero, p: float = 3.0) -> torch.Tensor:
    """``sum |W - Q(W)|^p`` per (row, group)."""
    return _lp(wb - grid.fake(wb, scale, zero), p)


def _candidates(grid: Grid, wb: torch.Tensor, valid, factors):
    """``(scale, zero)`` candidates of the ``p > 1`` search for blocked ``wb`` (``valid``:
    the real columns, padding excluded from the range, or None)."""
    if isinstance(grid, AffineGrid) and grid.domain in ("int", "float"):
        if valid is None:
            mn, mx = wb.amin(-1), wb.amax(-1)
        else:
            inf = torch.tensor(float("inf"))
            mn, mx = torch.where(valid, wb, inf).amin(-1), torch.where(valid, wb, -inf).amax(-1)
        levels = float(grid.qmax - grid.qmin)
        mid_code = (grid.qmin + grid.qmax) / 2
        centre = (mn + mx) / 2
        for f in factors:
            s = (mx - mn) / levels * f
            s = torch.where(s > 0, s, torch.ones_like(s))
            if grid.domain == "float":
                yield s, centre - mid_code * s
                continue
            zc = torch.round(mid_code - centre / s)
            for d in (-1.0, 0.0, 1.0):
                yield s, (zc + d).clamp(-128, 127)
    else:  # symmetric / codebook: the scale alone (padding is 0: it never sets an absmax)
        for f in factors:
            yield grid.fit(wb, f)


def lp_search(grid: Grid, wb: torch.Tensor, p: float = 3.0, factors=None):
    """Per (row, group) the candidate ``(scale, zero)`` (round-to-nearest's included) with the
    least ``sum |W - Q(W)|^p`` over the real (unpadded) columns; rows in chunks of :data:`_ROWS`."""
    factors = SEARCH_FACTORS if factors is None else factors
    wb = wb.float()
    valid = None
    if grid.padded != grid.k:
        valid = (torch.arange(grid.padded) < grid.k).reshape(1, grid.groups, grid.group)
        # every group needs one real column: resolve_group pads only the last group, by < group
    s_all, z_all = grid.fit(wb)
    s_all, z_all = s_all.clone(), None if z_all is None else z_all.clone()

    def loss_of(w, s, z):
        err = w - grid.fake(w, s, z)
        return _lp(err if valid is None else err * valid, p)

    for r0 in range(0, wb.shape[0], _ROWS):
        w = wb[r0 : r0 + _ROWS]
        s0, z0 = s_all[r0 : r0 + _ROWS], None if z_all is None else z_all[r0 : r0 + _ROWS]
        best = loss_of(w, s0, z0)
        for s, z in _candidates(grid, w, valid, factors):
            loss = loss_of(w, s, z)
            better = loss < best
            s0.copy_(torch.where(better, s, s0))
            if z0 is not None:
                z0.copy_(torch.where(better, z, z0))
            best = torch.minimum(loss, best)
    return s_all, z_all


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


def hqq_fit(grid: Grid, wb: torch.Tensor, iters: int = 20, p: float = 3.0, beta: float = 10.0, kappa: float = 1.01):
    """HQQ parameters ``(scale, zero)`` ``(N, G)`` for blocked weights ``(N, G, g)``.

    ``p > 1``: :func:`lp_search`. ``p <= 1``: the half-quadratic iteration runs on every
    group at once; the proxy loss picks, per group, among round-to-nearest, the last
    iterate and (integer zero point) its rounded refit."""
    wb = wb.float()
    if p > 1:
        return lp_search(grid, wb, p)
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
