"""AutoRound (Cheng et al., 2023): learn each weight's rounding direction and each group's
range by signed gradient descent on the block's output error.

Per block (a decoder layer; a toy module as a whole) and per target linear: rounding
offsets ``V`` in [-0.5, 0.5] (added before rounding) and per-group range factors
``alpha``, ``beta`` in [0.5, 1] that shrink the fitted min / max (absmax for symmetric and
codebook grids). Rounding goes through a straight-through estimator. The loss is the MSE
between the block's output with fake-quantized weights and the float block's output on
the same inputs; SignSGD steps with a linearly decaying learning rate (``1 / iters`` by
default), ``batch_size`` calibration items per step (cut to ``seqlen`` tokens if set; drawn
by a generator seeded with ``config.seed`` in every block), and
the parameters of the best step are kept. Autograd runs on CPU; the block's own
parameters are frozen meanwhile. ``target="float"`` (default, as auto-round): a decoder
layer reads the rounded layers' outputs but is fitted to the float model's own output of
that layer (the driver carries both streams), so each layer also corrects the error the
earlier ones left; ``"block"``: to the float layer's output on the rounded inputs.
``compute_dtype="bfloat16"``: the layer's forward and backward run under bf16 autocast (the
parameters, targets and loss stay fp32), as auto-round runs on CPU. The steps read inputs
and targets as the driver stores them (``stream_dtype``) and compute in the layer's dtype.
``micro_batch_size``: a step's items run forward and backward a few at a time on detached
copies of the fake-quantized weights, whose gradients add up; the fake quantization's
backward then runs once per step (less autograd memory, the same step up to sum order).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch.func import functional_call

from torchq.algorithms.configs import AlgorithmConfig, storage_config
from torchq.algorithms.grid import AffineGrid, CodebookGrid, Grid, grid_for
from torchq.algorithms.registry import register_algorithm

__all__ = ["RoundingParams", "autoround_block"]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


class RoundingParams:
    """Learnable rounding of one weight on its grid (see module docstring)."""

    def __init__(self, weight: torch.Tensor, grid: Grid, act_scale=None):
        self.grid = grid
        self.k = weight.shape[1]
        self.act_scale = act_scale
        w = weight.detach().float() * (act_scale if act_scale is not None else 1.0)
        self.wb = grid.blocked(grid.pad(w))
        n, g, _ = self.wb.shape
        self.v = torch.zeros_like(self.wb, requires_grad=True)
        self.alpha = torch.ones(n, g, requires_grad=True)  # min / absmax factor
        self.beta = torch.ones(n, g, requires_grad=True)  # max factor

    @property
    def params(self):
        return [self.v, self.alpha, self.beta]

    def qparams(self):
        """Differentiable ``(scale, zero)`` of the current range factors."""
        grid, wb = self.grid, self.wb
        if isinstance(grid, CodebookGrid):
            s = wb.abs().amax(-1) * self.alpha / grid.cb.vmax
            return s.clamp_min(1e-12), None
        levels = float(grid.qmax - grid.qmin)
        if grid.domain == "none":
            s = wb.abs().amax(-1) * self.alpha / (levels / 2)
            return s.clamp_min(1e-12), None
        mn, mx = wb.amin(-1) * self.alpha, wb.amax(-1) * self.beta
        s = ((mx - mn) / levels).clamp_min(1e-12)
        if grid.domain == "float":
            return s, mn - grid.qmin * s
        return s, _round_ste(grid.qmin - mn / s).clamp(-128, 127)

    def fake(self) -> torch.Tensor:
        """Fake-quantized weight ``(N, K)`` (act_scale divided back out), differentiable."""
        grid, wb = self.grid, self.wb
        s, z = self.qparams()
        su = s.unsqueeze(-1)
        if isinstance(grid, CodebookGrid):
            v = torch.clamp(wb / su + self.v * (2 * grid.cb.vmax / 15), -grid.cb.vmax, grid.cb.vmax)
            vals = grid.dequantize(grid.quantize(v.detach(), torch.ones_like(s), None), torch.ones_like(s), None)
            dq = ((vals - v).detach() + v) * su
        elif grid.domain == "float":
            q = torch.clamp(_round_ste((wb - z.unsqueeze(-1)) / su + self.v), grid.qmin, grid.qmax)
            dq = q * su + z.unsqueeze(-1)
        else:
            zz = 0 if z is None else z.unsqueeze(-1)
            q = torch.clamp(_round_ste(wb / su + self.v) + zz, grid.qmin, grid.qmax)
            dq = (q - zz) * su
        w = dq.reshape(dq.shape[0], -1)[:, : self.k]
        return w / self.act_scale if self.act_scale is not None else w

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)

    @torch.no_grad()
    def tensor(self, dtype) -> torch.Tensor:
        """The stored tensor of the learned rounding."""
        grid, wb = self.grid, self.wb
        s, z = self.qparams()
        if isinstance(grid, CodebookGrid):
            v = torch.clamp(wb / s.unsqueeze(-1) + self.v * (2 * grid.cb.vmax / 15), -grid.cb.vmax, grid.cb.vmax)
            codes = grid.quantize(v, torch.ones_like(s), None)
        elif grid.domain == "float":
            codes = torch.clamp(torch.round((wb - z.unsqueeze(-1)) / s.unsqueeze(-1) + self.v), grid.qmin, grid.qmax)
        else:
            zz = 0 if z is None else z.unsqueeze(-1)
            codes = torch.clamp(torch.round(wb / s.unsqueeze(-1) + self.v) + zz, grid.qmin, grid.qmax)
        return grid.build(codes.reshape(wb.shape[0], -1), s, z, dtype, act_scale=self.act_scale)


def _cut_tree(obj, seqlen=None, full=None):
    """``obj`` with every tensor dim of size ``full`` cut to ``seqlen`` (views, no copy)."""
    if isinstance(obj, torch.Tensor):
        t = obj
        if seqlen is not None and full is not None and seqlen < full:
            for d in range(t.dim()):
                if t.shape[d] == full:
                    t = t.narrow(d, 0, seqlen)
        return t
    if isinstance(obj, tuple):
        return tuple(_cut_tree(o, seqlen, full) for o in obj)
    if isinstance(obj, list):
        return [_cut_tree(o, seqlen, full) for o in obj]
    if isinstance(obj, dict):
        return {k: _cut_tree(v, seqlen, full) for k, v in obj.items()}
    return obj


def _detach_tree(obj):
    """Normal (non-inference) copies of every tensor in ``obj``: what autograd may save.
    Taken per step for the step's items only (a copy of every item's inputs and targets up
    front held two more layers' activations, about 300 MB at 128 x 512 tokens on SmolLM2)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_detach_tree(o) for o in obj)
    if isinstance(obj, list):
        return [_detach_tree(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach_tree(v) for k, v in obj.items()}
    return obj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _batchable(items) -> bool:
    """Every item differs only in its first argument, a ``(1, ...)`` tensor of one shape (a
    decoder layer's hidden states; positions, rotary tables and masks shared): the items of a
    step then run as one batch, one forward and backward instead of ``batch_size``."""
    args0, kwargs0, target0 = items[0]
    for args, kwargs, target in items:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 or args[0].shape[0] != 1:
            return False
        if args[0].shape != args0[0].shape or target.shape != target0.shape or target.shape[0] != 1:
            return False
        if not (_same(args[1:], args0[1:]) and _same(kwargs, kwargs0)):
            return False
    return True


def _chunk_loss(block, items, chunk, weights, compute, shared):
    """Mean squared error of the layer with ``weights`` on the items ``chunk``: as one batch
    where ``shared`` holds what the items share (:func:`_batchable`; the mean over the batch
    is the mean of the items' means, equal sizes), else item by item."""
    if shared:
        shared_args, shared_kwargs = shared
        x = block.as_hidden(torch.cat([items[i][0][0] for i in chunk]))
        with compute:
            out = _first(functional_call(block.module, weights, (x,) + shared_args, shared_kwargs))
        target = torch.cat([items[i][2] for i in chunk])
        return torch.nn.functional.mse_loss(out.float(), target.float())
    loss = 0.0
    for i in chunk:
        args, kwargs, target = _detach_tree(items[i])
        args = block.hidden_args(args)
        with compute:
            out = _first(functional_call(block.module, weights, args, kwargs))
        loss = loss + torch.nn.functional.mse_loss(out.float(), target.float())
    return loss / len(chunk)


def _native_bf16() -> bool:
    """Whether this CPU has a bf16 dot product (AVX512-BF16 or AMX), as the kernels see it."""
    from torchq.kernels import cpu_ext

    return cpu_ext.available() and bool(torch.ops.torchq._native_bf16())


def _compute_context(compute_dtype: str):
    """The autocast the layer's forward (and so its backward) runs under; a warning where
    bf16 would be emulated (no AVX512-BF16 / AMX dot product), which is slower than fp32."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    if not _native_bf16():
        warnings.warn(
            "AutoRound compute_dtype='bfloat16' on a CPU without a bf16 dot product (AVX512-BF16 or AMX): "
            "bf16 products are emulated here and run slower than float32; use compute_dtype='float32'",
            stacklevel=3,
        )
    return torch.autocast("cpu", dtype=torch.bfloat16)


def autoround_block(block, names, config: AlgorithmConfig, act_scales=None, generator=None, batch_items: bool = True):
    """Learn the rounding of ``names`` in ``block``; returns ``(results, losses)`` with the
    loss of every step (for tests and logs). ``batch_items``: run a step's items as one
    batch where they allow it (:func:`_batchable`)."""
    act_scales = act_scales or {}
    base = storage_config(config)
    float_targets = block.meta.get("float_targets") if getattr(config, "target", "block") == "float" else None
    targets = [_first(t) for t in (float_targets if float_targets is not None else block.run())]
    items = []
    for (args, kwargs), target in zip(block.inputs, targets):
        full = args[0].shape[-2] if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 else None
        seqlen = config.seqlen if block.sequential else None
        items.append((_cut_tree(args, seqlen, full), _cut_tree(kwargs, seqlen, full), _cut_tree(target, seqlen, full)))
    batched = batch_items and _batchable(items)
    if batched:  # what the items share, copied once (torch.cat copies the hidden states per step)
        shared_args, shared_kwargs = _detach_tree(tuple(items[0][0][1:])), _detach_tree(items[0][1])
    rp = {}
    for n in names:
        lin = block.linears[n]
        rp[n] = RoundingParams(lin.weight, grid_for(base, lin.weight.shape), act_scales.get(n))
    params = [p for r in rp.values() for p in r.params]
    frozen = [p for p in block.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    compute = _compute_context(getattr(config, "compute_dtype", "float32"))
    gen = generator or torch.Generator().manual_seed(getattr(config, "seed", 0))
    lr0 = config.learning_rate
    best_loss, best_state, losses = math.inf, None, []
    try:
        for it in range(config.iters):
            pick = torch.randperm(len(items), generator=gen)[: config.batch_size].tolist()
            weights = {f"{n}.weight": r.fake() for n, r in rp.items()}
            # the layer runs on detached copies: each micro-batch's backward stops there and
            # sums into their .grad; the fake quantization's backward then runs once
            leaves = {k: w.detach().requires_grad_() for k, w in weights.items()}
            micro = config.micro_batch_size or len(pick)
            for p in params:
                p.grad = None
            loss = 0.0
            for start in range(0, len(pick), micro):
                chunk = pick[start : start + micro]
                part = _chunk_loss(block, items, chunk, leaves, compute, batched and (shared_args, shared_kwargs))
                part = part * (len(chunk) / len(pick))  # the mean over the step's items
                part.backward()
                loss = loss + part.detach()
            used = [k for k in weights if leaves[k].grad is not None]
            torch.autograd.backward([weights[k] for k in used], [leaves[k].grad for k in used])
            value = float(loss)
            losses.append(value)
            if value < best_loss:  # parameters that produced this loss (before the step)
                best_loss = value
                best_state = [p.detach().clone() for p in params]
            lr = lr0 * (1 - it / config.iters)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(lr * torch.sign(p.grad))
            for r in rp.values():
                r.clamp_()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    results = {}
    for n, r in rp.items():
        t = r.tensor(block.linears[n].weight.dtype)
        note = "; ".join(x for x in (r.grid.note, f"autoround {config.iters} iters, loss {losses[0]:.3g}->{best_loss:.3g}") if x)
        results[n] = (t, note)
    return results, losses


@register_algorithm("autoround")
def _process(block, names, config, act_scales):
    return autoround_block(block, names, config, act_scales)[0]
