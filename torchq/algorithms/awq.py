"""AWQ (Lin et al., 2023): protect the weight columns that see large activations.

Per group of linears sharing an input (:func:`~.folding.scale_groups`):

1. scale search: ``s = mean|x|^r`` (normalised so sqrt(max * min) = 1) for ``r`` in
   ``0, 1/n_grid, ...``; pick the ``s`` whose round-to-nearest ``Q(W * s) / s`` gives the
   smallest output error on sampled calibration inputs (``r = 0`` is ``s = 1``: never worse
   than unscaled);
2. the scale is folded into the previous op (:func:`~.folding.fold_scales`), or kept as the
   stored tensor's ``act_scale`` where nothing can take it (codebook weights: no scale);
3. clipping search (``clip``): per (row, group) the range shrink in 1.0 .. 0.5 with the
   smallest output error of that group; applied by clamping the float weights, so any
   rounding that follows (round-to-nearest or a wrapped GPTQ / HQQ / AutoRound) sees it.
"""

from __future__ import annotations

import torch

from torchq.algorithms.configs import AlgorithmConfig, storage_config
from torchq.algorithms.folding import fold_scales, scale_groups
from torchq.algorithms.grid import grid_for
from torchq.algorithms.registry import get_algorithm, register_algorithm
from torchq.algorithms.stats import input_stats

__all__ = ["search_scale", "search_clip", "group_hessians", "round_to_nearest", "rtn_fake"]

CLIP_SHRINKS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5 (AutoAWQ: 20 steps; 10 halve the time)
CLIP_TOKENS = 512


def rtn_fake(base, w: torch.Tensor) -> torch.Tensor:
    """``w`` (N, K) rounded to nearest on the storage config's grid, as floats."""
    grid = grid_for(base, w.shape)
    return grid.rtn(grid.pad(w))[:, : w.shape[1]]


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, mean_abs: torch.Tensor, base, n_grid: int = 20):
    """Best per-input-channel scale for linears ``weights`` reading inputs ``x`` (rows, K);
    returns ``(s, errors)`` with the error of every ratio tried (index 0: unscaled).

    The error is the mean squared output error over ``x``'s rows and the output channels,
    ``sum_n d_n^T (x^T x) d_n / (rows N)`` for the weight error ``d``: ``x^T x`` once, then
    ``N K^2`` per ratio instead of ``rows N K`` (4096 sampled rows against K = 576..1536)."""
    w = torch.cat([wi.float() for wi in weights])
    h = x.float().t() @ x.float()
    norm = x.shape[0] * w.shape[0]
    best, best_err, errs = torch.ones_like(mean_abs), None, []
    for r in range(n_grid):
        s = mean_abs.clamp(min=1e-4).pow(r / n_grid)
        s = s / (s.max() * s.min()).sqrt()
        d = torch.cat([rtn_fake(base, wi.float() * s) for wi in weights]) / s - w
        err = float(((d @ h) * d).sum()) / norm
        errs.append(err)
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best, errs


def search_clip(w: torch.Tensor, x: torch.Tensor, base, shrinks=CLIP_SHRINKS) -> torch.Tensor:
    """Clamp each (row, group) of ``w`` to the range shrink with the least output error on ``x``."""
    grid = grid_for(base, w.shape)
    wp = grid.pad(w.float())
    wb = grid.blocked(wp)
    xb = torch.nn.functional.pad(x.float(), (0, grid.padded - grid.k)).reshape(x.shape[0], grid.groups, grid.group)
    hg = group_hessians(xb)
    best_err, best_f = None, None
    for f in shrinks:
        s, z = grid.fit(wb, f)
        d = grid.fake(wb, s, z) - wb
        err = _group_out_err(hg, d)
        if best_err is None:
            best_err, best_f = err, torch.full_like(err, f)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(err, f), best_f)
    if getattr(grid, "domain", "none") in ("int", "float"):  # the fitted range is [min, max]
        lo, hi = wb.amin(-1) * best_f, wb.amax(-1) * best_f
    else:  # symmetric / codebook: the range is +-absmax
        hi = wb.abs().amax(-1) * best_f
        lo = -hi
    clipped = torch.maximum(torch.minimum(wb, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    return clipped.reshape(wp.shape)[:, : grid.k]


def group_hessians(xb: torch.Tensor) -> torch.Tensor:
    """``sum_t x_tG x_tG^T`` per group ``G`` of the blocked inputs ``xb`` (T, G, g): (G, g, g)."""
    xg = xb.transpose(0, 1)  # (G, T, g)
    return xg.transpose(1, 2) @ xg


def _group_out_err(hg: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``sum_t (x_tG . d_nG)^2 = d_nG^T H_G d_nG`` per (row n, group G), from the group
    Hessians ``hg`` (G, g, g) and the blocked weight error ``d`` (N, G, g): ``g`` products per
    weight instead of one per sampled token."""
    dg = d.transpose(0, 1)  # (G, N, g)
    return ((dg @ hg) * dg).sum(-1).t()


def round_to_nearest(block, names, base, act_scales) -> dict:
    """The storage config's rounding (free integer zero point, see :mod:`.grid`)."""
    out = {}
    for n in names:
        lin = block.linears[n]
        a = act_scales.get(n)
        w = lin.weight.detach().float() * (a if a is not None else 1.0)
        grid = grid_for(base, w.shape)
        out[n] = (grid.tensor(grid.pad(w), lin.weight.dtype, act_scale=a), grid.note)
    return out


def scale_then_round(block, names, config: AlgorithmConfig, choose_scale, label: str) -> dict:
    """Shared by AWQ and SmoothQuant: per scale group choose ``s`` (``choose_scale(members,
    stats) -> (s, note)``), fold it or keep it as act_scale, optionally clip, then round
    with the wrapped algorithm (or to nearest)."""
    base = storage_config(config)
    # AWQ's next_inputs (SmoothQuant: always rounded): the statistics pass then runs the
    # whole float layer, and its outputs feed the next one. It is then the layer's last pass
    # unless a wrapped algorithm reads the inputs again: each output replaces its input.
    outputs = [] if getattr(config, "feeds_float_outputs", False) else None
    inner = config.base
    last_pass = outputs is not None and not block.inputs_needed and not (isinstance(inner, AlgorithmConfig) and inner.needs_calibration)
    stats = input_stats(block, names, getattr(config, "max_tokens", 4096), outputs=outputs, release_inputs=last_pass)
    act_scales: dict = {}
    notes: dict = {}
    with torch.no_grad():
        for group in scale_groups(block.module, names):
            grid0 = grid_for(base, block.linears[group.members[0]].weight.shape)
            if group.prev is None and (config.unfoldable == "skip" or not grid0.supports_input_transform):
                why = "unfoldable='skip'" if config.unfoldable == "skip" else f"{base.type_name} stores no act_scale"
                for m in group.members:
                    notes[m] = f"{label}: no scale (nothing to fold into; {why})"
                continue
            s, note = choose_scale(group.members, stats)
            if group.prev is not None:
                fold_scales(block.module, group, s)
                where = f"folded into {group.prev_name}"
            else:
                for m in group.members:
                    act_scales[m] = s
                where = "act_scale"
            for m in group.members:
                notes[m] = f"{label} ({where}{', ' + note if note else ''})"
        if getattr(config, "clip", False):
            for n in names:
                lin = block.linears[n]
                a = act_scales.get(n)
                a1 = a if a is not None else torch.ones(lin.in_features)
                x = stats[n]["sample"][:CLIP_TOKENS] / a1
                lin.weight.copy_((search_clip(lin.weight.float() * a1, x, base) / a1).to(lin.weight.dtype))
    results = get_algorithm(inner)(block, names, inner, act_scales) if isinstance(inner, AlgorithmConfig) else round_to_nearest(block, names, base, act_scales)
    if outputs is not None:
        block.outputs = outputs
    return {n: (t, "; ".join(x for x in (notes.get(n, ""), note) if x)) for n, (t, note) in results.items()}


@register_algorithm("awq")
def _process(block, names, config, act_scales):
    base = storage_config(config)

    def choose(members, stats):
        x = stats[members[0]]["sample"]
        s, errs = search_scale([block.linears[m].weight for m in members], x, stats[members[0]]["mean_abs"], base, config.n_grid)
        return s, f"error x{errs[min(range(len(errs)), key=errs.__getitem__)] / max(errs[0], 1e-30):.2f}"

    return scale_then_round(block, names, config, choose, "awq")
