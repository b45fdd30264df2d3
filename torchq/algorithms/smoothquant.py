"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before
int8 activation quantization (W8A8 / W4A8).

Per group of linears sharing an input: ``s = max|x|^alpha / max|w|^(1 - alpha)`` per input
channel (``max|w|`` over the group's weight columns), folded into the previous norm or
linear (:mod:`.folding`), else kept as ``act_scale``; then the storage config's rounding
(or a wrapped GPTQ / HQQ / AutoRound).
"""

from __future__ import annotations

import torch

from torchq.algorithms.awq import scale_then_round
from torchq.algorithms.registry import register_algorithm

__all__ = ["smooth_scale"]


def smooth_scale(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_amax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@register_algorithm("smoothquant")
def _process(block, names, config, act_scales):
    def choose(members, stats):
        return smooth_scale(stats[members[0]]["amax"], [block.linears[m].weight for m in members], config.alpha), ""

    return scale_then_round(block, names, config, choose, f"smoothquant alpha={config.alpha:g}")
