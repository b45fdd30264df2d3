"""Per-input-channel scales (AWQ, SmoothQuant) and where they go.

A linear computing ``x @ W^T`` computes the same with ``(x / s) @ (W * s)^T``. The ``x / s``
is folded into the op that produced ``x`` when the graph allows, so nothing changes at
run time and state_dict keys stay the same:

* RMSNorm / LayerNorm -> the linears reading it: norm weight (and bias) ``/ s``;
* a linear -> the linear reading its output: rows (and bias) ``/ s`` (``v -> o`` only when
  v's outputs are o's inputs one to one, i.e. no grouped-query attention; ``up -> down``);
* a fused linear -> the linear reading one part of its output: that part's rows ``/ s``
  (Phi-3: ``qkv_proj``'s last third is v when there is no grouped-query attention, and
  ``gate_up_proj``'s second half is up).

Elsewhere ``s`` goes into the stored tensor's ``act_scale`` (integer affine weights only).
The fold table, in names relative to a decoder layer, covers Llama, SmolLM2, Qwen2, Mistral
and Phi-3. Folds into a part of a fused output are listed per decoder-layer class, since
another model may order (or interleave) its fused outputs differently; other layouts fall
back to ``act_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from torchq.formats.base import TorchqTensor

__all__ = ["FOLDS", "Fold", "ScaleGroup", "scale_groups", "fold_scales", "is_foldable"]


@dataclass(frozen=True)
class Fold:
    """``prev``'s output is the input of ``members``. ``parts > 1``: ``prev`` is a fused linear
    whose output splits into ``parts`` equal parts, and the members read the last one; such a
    fold applies only in the decoder-layer classes ``layers`` (the order of the parts is the
    model's own)."""

    prev: str
    members: tuple[str, ...]
    parts: int = 1
    layers: tuple[str, ...] = ()


FOLDS: tuple[Fold, ...] = (
    Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Fold("self_attn.v_proj", ("self_attn.o_proj",)),
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Fold("mlp.up_proj", ("mlp.down_proj",)),
    Fold("input_layernorm", ("self_attn.qkv_proj",)),
    Fold("self_attn.qkv_proj", ("self_attn.o_proj",), parts=3, layers=("Phi3DecoderLayer",)),  # [q | k | v]
    Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Fold("mlp.gate_up_proj", ("mlp.down_proj",), parts=2, layers=("Phi3DecoderLayer",)),  # [gate | up]
)


@dataclass
class ScaleGroup:
    """Linears sharing one input (and so one scale); ``prev``: the op to fold into, or None
    (for a fused linear, the scale divides the last ``len(s)`` rows of its output)."""

    members: list[str]
    prev: Optional[nn.Module] = None
    prev_name: str = ""


def is_foldable(prev: Optional[nn.Module], k: int, parts: int = 1) -> bool:
    """Can ``x / s`` of width ``k`` be folded into ``prev``'s output (its last of ``parts``
    equal parts)?"""
    if prev is None:
        return False
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, TorchqTensor):
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == parts * k
    if parts != 1:
        return False
    name = type(prev).__name__
    # x * weight norms only (Gemma's norms multiply by 1 + weight)
    return w.dim() == 1 and w.numel() == k and "Norm" in name and "Gemma" not in name


def scale_groups(module: nn.Module, names: list[str]) -> list[ScaleGroup]:
    """Group the target linears ``names`` of ``module`` by the op their input comes from."""
    mods = dict(module.named_modules())
    left = list(names)
    groups = []
    for fold in FOLDS:
        present = [m for m in fold.members if m in left]
        if not present or (fold.layers and type(module).__name__ not in fold.layers):
            continue
        k = mods[present[0]].in_features
        prev = mods.get(fold.prev)
        if len(present) == len(fold.members) and is_foldable(prev, k, fold.parts):
            groups.append(ScaleGroup(present, prev, fold.prev))
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
    rows = slice(prev.weight.shape[0] - s.numel(), None)  # the last part (all of it: parts == 1)
    if isinstance(prev, nn.Linear):
        prev.weight[rows].div_(s.to(prev.weight.dtype).unsqueeze(1))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows].div_(s.to(prev.bias.dtype))
    for m in group.members:
        mods[m].weight.mul_(s.to(mods[m].weight.dtype).unsqueeze(0))
