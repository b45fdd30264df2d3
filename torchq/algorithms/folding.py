"""Per-input-channel scales (AWQ, SmoothQuant) and where they go.

A linear computing ``x @ W^T`` computes the same with ``(x / s) @ (W * s)^T``. The ``x / s``
is folded into the op that produced ``x`` when the graph allows, so nothing changes at
run time and state_dict keys stay the same:

* RMSNorm / LayerNorm -> the linears reading it: norm weight (and bias) ``/ s``;
* a linear -> the linear reading its output: rows (and bias) ``/ s`` (``v -> o`` only when
  v's outputs are o's inputs one to one, i.e. no grouped-query attention; ``up -> down``).

Elsewhere ``s`` goes into the stored tensor's ``act_scale`` (integer affine weights only).
The fold table, in names relative to a decoder layer, covers Llama, SmolLM2, Qwen2 and
Mistral; other layouts (Phi-3's fused projections) fall back to ``act_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from torchq.formats.base import TorchqTensor

__all__ = ["FOLDS", "ScaleGroup", "scale_groups", "fold_scales", "is_foldable"]

#: (previous op, linears reading its output)
FOLDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass
class ScaleGroup:
    """Linears sharing one input (and so one scale); ``prev``: the op to fold into, or None."""

    members: list[str]
    prev: Optional[nn.Module] = None
    prev_name: str = ""


def is_foldable(prev: Optional[nn.Module], k: int) -> bool:
    """Can ``x / s`` of width ``k`` be folded into ``prev``'s output?"""
    if prev is None:
        return False
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, TorchqTensor):
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == k
    name = type(prev).__name__
    # x * weight norms only (Gemma's norms multiply by 1 + weight)
    return w.dim() == 1 and w.numel() == k and "Norm" in name and "Gemma" not in name


def scale_groups(module: nn.Module, names: list[str]) -> list[ScaleGroup]:
    """Group the target linears ``names`` of ``module`` by the op their input comes from."""
    mods = dict(module.named_modules())
    left = list(names)
    groups = []
    for prev_name, members in FOLDS:
        present = [m for m in members if m in left]
        if not present:
            continue
        k = mods[present[0]].in_features
        prev = mods.get(prev_name)
        if len(present) == len(members) and is_foldable(prev, k):
            groups.append(ScaleGroup(present, prev, prev_name))
            for m in present:
                left.remove(m)
    if set(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) <= set(left):
        trio = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        groups.append(ScaleGroup(trio))  # same input, no foldable norm: one shared act_scale each
        left = [n for n in left if n not in trio]
    groups.extend(ScaleGroup([n]) for n in left)
    return groups


@torch.no_grad()
def fold_scales(module: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold ``s`` into ``group.prev`` and multiply the members' weight columns by it."""
    mods = dict(module.named_modules())
    if group.prev is None:
        raise ValueError("this group has no op to fold into; its scale goes into act_scale")
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for m in group.members:
        mods[m].weight.mul_(s.to(mods[m].weight.dtype).unsqueeze(0))
