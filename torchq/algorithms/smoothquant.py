"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before
int8 activation quantization (W8A8 / W4A8).

Per group of linears sharing an input: ``s = max|x|^alpha / max|w|^(1 - alpha)`` per input
channel (``max|w|`` over the group's weight columns), folded into the previous norm or
linear (:mod:`.folding`), else kept as ``act_scale``; then the storage config's rounding
(or a wrapped GPTQ / HQQ / AutoRound).

``alpha="auto"`` searches alpha per group (as Intel Neural Compressor's auto-alpha does):
each candidate's simulated W8A8 / W4A8 output — per-token int8 activations of ``x / s``
times the rounded ``W * s`` — is compared with the float output on the calibration sample,
and the smallest error wins. No smoothing (``s = 1``) is a candidate, so a group is never
made worse on its calibration inputs than plain round-to-nearest.
"""

from __future__ import annotations

import torch

from torchq.algorithms.awq import rtn_fake, scale_then_round
from torchq.algorithms.configs import storage_config
from torchq.algorithms.registry import register_algorithm
from torchq.primitives.activation import fake_quantize_per_token_int8

__all__ = ["smooth_scale", "search_alpha", "AUTO_ALPHAS"]

AUTO_ALPHAS = tuple(i / 10 for i in range(11))


def smooth_scale(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_amax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def search_alpha(x: torch.Tensor, x_amax: torch.Tensor, weights: list[torch.Tensor], base, alphas=AUTO_ALPHAS):
    """``(s, alpha, errors)``: the smoothing scale among ``alphas`` (``None``: no smoothing,
    always tried first) with the least W8A8-simulated output error on inputs ``x`` (rows, K)."""
    w = torch.cat([wi.detach().float() for wi in weights])
    x = x.float()
    ref = x @ w.t()
    best = (torch.ones_like(x_amax), None, None)
    errors = {}
    for alpha in (None,) + tuple(alphas):
        s = torch.ones_like(x_amax) if alpha is None else smooth_scale(x_amax, weights, alpha)
        wq = torch.cat([rtn_fake(base, wi.detach().float() * s) for wi in weights])
        err = float((fake_quantize_per_token_int8(x / s) @ wq.t() - ref).pow(2).mean())
        errors[alpha] = err
        if best[2] is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], errors


@register_algorithm("smoothquant")
def _process(block, names, config, act_scales):
    if config.alpha != "auto":
        def choose(members, stats):
            return smooth_scale(stats[members[0]]["amax"], [block.linears[m].weight for m in members], config.alpha), ""

        return scale_then_round(block, names, config, choose, f"smoothquant alpha={config.alpha:g}")

    base = storage_config(config)

    def choose_auto(members, stats):
        st = stats[members[0]]
        s, alpha, errors = search_alpha(st["sample"], st["amax"], [block.linears[m].weight for m in members], base)
        picked = "none" if alpha is None else f"{alpha:g}"
        return s, f"alpha={picked}, error x{errors[alpha] / max(errors[None], 1e-30):.2f} of unsmoothed"

    return scale_then_round(block, names, config, choose_auto, "smoothquant auto")
