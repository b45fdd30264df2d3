"""GPTQ (Frantar et al., 2022): round one column at a time and push each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian
``H = E[x x^T]`` of the layer's inputs, so the layer *output* error stays small.

* damping: ``damp`` x mean(diag H) added to the diagonal; a failed Cholesky raises the
  damping tenfold (with a warning) up to 5 times;
* columns in blocks of ``block_size`` with lazy batch updates of the columns after a block;
* group parameters fitted when the first column of a group is reached (from the
  error-updated weights), optionally by an MSE search over range shrink factors;
* act-order: columns by decreasing ``diag H``;
* static groups (the default with act-order): every group's parameters are fitted up front
  from the unrounded weight in the original column order, then columns are rounded in
  act-order, each with its own group's parameters. Nothing is permuted in the result: any
  base (codebook, padded K), every export format, the plain kernels;
* without static groups, act-order is stored through the tensor's ``perm`` so groups are
  contiguous in the permuted order (affine bases with K a multiple of the group size;
  elsewhere it is turned off and the report says so);
* codebook bases (NF4 / FP4) round each column to the nearest table value x block scale.
* the column loop inside a block runs in a C++ kernel (:mod:`torchq.kernels.cpu_gptq`,
  with its plain-PyTorch reference; the same bits).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from torchq.algorithms.grid import Grid, grid_for
from torchq.algorithms.configs import storage_config
from torchq.algorithms.registry import register_algorithm
from torchq.algorithms.paused_pass import PausedPass
from torchq.algorithms.stats import hessians, input_stages, stage_hessians
from torchq.kernels.cpu_gptq import gptq_block

__all__ = ["gptq_quantize", "fit_mse"]

MSE_SHRINKS = tuple(1.0 - 0.05 * i for i in range(6))  # 1.00 .. 0.75


def fit_mse(grid: Grid, wb: torch.Tensor, shrinks=MSE_SHRINKS):
    """Group parameters minimising the weight MSE over range ``shrinks`` (per row, group)."""
    best_s, best_z, best_err = None, None, None
    for f in shrinks:
        s, z = grid.fit(wb, f)
        err = (grid.fake(wb, s, z) - wb).pow(2).sum(-1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = None if z is None else torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag) I)^-1``, raising the damping on failure."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    d = damp
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + d * mean_diag * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            if attempt == 5:
                raise
            warnings.warn(f"GPTQ {name}: Hessian not positive definite with damp={d:g}; retrying with damp={d * 10:g}")
            d *= 10
    raise AssertionError("unreachable")


def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mse_clip: bool = False,
    name: str = "",
):
    """GPTQ-round ``weight`` ``(N, K)`` (already multiplied by any act_scale) given its
    input Hessian ``h`` ``(K, K)``. Returns ``(codes, scale, zero, perm)`` in stored order
    (``perm`` is None unless act-order without static groups)."""
    w = grid.pad(weight.detach().float()).clone()
    n, kp = w.shape
    k = weight.shape[1]
    if act_order and not static_groups and kp != k:
        raise ValueError(
            f"GPTQ {name}: act_order without static_groups needs K ({k}) to be a multiple of the group size "
            f"({grid.group}): its groups are contiguous in the permuted order; use static_groups=True"
        )
    hp = torch.zeros(kp, kp)
    hp[:k, :k] = h.float()
    dead = torch.diag(hp) == 0
    hp[dead, dead] = 1.0
    g = grid.group
    codes = torch.zeros(n, kp)
    scale = torch.zeros(n, kp // g)
    zero = None
    group_of = None  # static groups: column (in processing order) -> its group
    if static_groups:
        scale, zero = fit_mse(grid, grid.blocked(w)) if mse_clip else grid.fit(grid.blocked(w))
        group_of = torch.arange(kp) // g
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(hp)[:k], descending=True, stable=True)
        if static_groups:  # padding columns (no inputs) last, so the order covers all of kp
            perm = torch.cat([perm, torch.arange(k, kp)])
            group_of = group_of[perm]
        w, hp = w[:, perm], hp[perm][:, perm]
    u = _inverse_cholesky(hp, damp, name)
    rule = grid.column_rule()
    cur_s = cur_z = None  # the parameters of the group being rounded (N, 1)
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        w1 = w[:, i1:i2].clone()
        err1, q1 = torch.zeros_like(w1), torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2].contiguous()
        if group_of is not None:  # static groups: every column's parameters are known
            cols = group_of[i1:i2]
            s1 = scale[:, cols].contiguous()
            z1 = None if zero is None else zero[:, cols].contiguous()
            spans = [(0, i2 - i1)]
        else:
            s1 = torch.empty_like(w1)
            z1 = torch.empty_like(w1) if rule.mode in ("int", "float") else None
            bounds = sorted({i1, i2, *range(-(-i1 // g) * g, i2, g)})  # split where groups start
            spans = [(a - i1, b - i1) for a, b in zip(bounds, bounds[1:])]
        for a, b in spans:
            col = i1 + a
            if group_of is None and col % g == 0:  # fit the group from the error-updated weights
                gw = torch.cat([w1[:, a:], w[:, i2 : col + g]], dim=1)[:, :g] if col + g > i2 else w1[:, a : a + g]
                gb = gw.reshape(n, 1, -1)
                cur_s, cur_z = fit_mse(grid, gb) if mse_clip else grid.fit(gb)
                scale[:, col // g] = cur_s[:, 0]
                if cur_z is not None:
                    if zero is None:
                        zero = torch.zeros(n, kp // g)
                    zero[:, col // g] = cur_z[:, 0]
            if group_of is None:
                s1[:, a:b] = cur_s
                if z1 is not None:
                    z1[:, a:b] = cur_z
            gptq_block(w1, u1, s1, z1, rule.levels, q1, err1, a, b, rule.mode, rule.qmin, rule.qmax)
        codes[:, i1:i2] = rule.codes(q1)
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if static_groups and perm is not None:  # back to the original column order
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        perm = None
    return codes, scale, zero, perm


@register_algorithm("gptq")
def _process(block, names, config, act_scales):
    """GPTQ every named linear of ``block`` from the Hessian of its (act_scale-divided) inputs.

    Sequential within the block too (``config.true_sequential``): the linears reading one
    input (q/k/v) are rounded first and set in place, so the Hessians of the next ones (o)
    come from the outputs of the rounded ones, as the rounded model will compute them. In
    a decoder layer this is one :class:`PausedPass` (the layer computed once, its outputs
    kept for the next layer); elsewhere (a module may call a linear twice) each stage
    re-runs the module."""
    if not config.true_sequential:
        return _round_stage(block, list(names), config, act_scales, hessians(block, names, act_scales))
    stages = input_stages(block, names)
    out = {}
    if not block.sequential:
        for stage in stages:
            out.update(_set(block, _round_stage(block, stage, config, act_scales, hessians(block, stage, act_scales))))
        return out
    with PausedPass(block, stages) as paused:
        for j, stage in enumerate(stages):
            add, result = stage_hessians(stage, act_scales)
            paused.gather(j, add)
            out.update(_set(block, _round_stage(block, stage, config, act_scales, result())))
        block.outputs = paused.finish(release_inputs=not block.inputs_needed)
    return out


def _set(block, done: dict) -> dict:
    for name, (t, _) in done.items():
        block.linears[name].weight = torch.nn.Parameter(t, requires_grad=False)
    return done


def _round_stage(block, names, config, act_scales, hs):
    """GPTQ-round ``names`` from their Hessians ``hs``. Linears that share one Hessian tensor
    (q/k/v, gate/up) are rounded as one weight with their rows stacked: GPTQ treats rows
    independently, so the rounding is the same, in one column loop instead of three."""
    base = storage_config(config)
    out = {}
    for group in _by_hessian(names, hs):
        weights = []
        for name in group:
            a = act_scales.get(name)
            weights.append(block.linears[name].weight.detach().float() * (a if a is not None else 1.0))
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        grid = grid_for(base, stacked.shape)
        act_order, notes = config.act_order, []
        if act_order and not config.static_groups and (not grid.supports_input_transform or grid.padded != grid.k):
            act_order = False
            notes.append("act_order off (" + ("codebook weight" if not grid.supports_input_transform else "K padded") + ")")
        notes.append("gptq" + (" act_order" if act_order else "") + (" static_groups" if config.static_groups else ""))
        with torch.no_grad():
            codes, s, z, perm = gptq_quantize(
                stacked, hs[group[0]], grid, damp=config.damp, block_size=config.block_size, act_order=act_order,
                static_groups=config.static_groups, mse_clip=config.mse_clip, name=block.full_name(",".join(group)),
            )
            row = 0
            for name, w in zip(group, weights):
                rows = slice(row, row + w.shape[0])
                row += w.shape[0]
                own = grid_for(base, w.shape)
                t = own.build(codes[rows], s[rows], None if z is None else z[rows], block.linears[name].weight.dtype,
                              act_scale=act_scales.get(name), perm=None if perm is None else perm.clone())  # own storage each
                out[name] = (t, "; ".join(([own.note] if own.note else []) + notes))
    return out


def _by_hessian(names, hs) -> list[list[str]]:
    """``names`` grouped by the Hessian tensor they share (in order)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(hs[name]), []).append(name)
    return list(groups.values())
