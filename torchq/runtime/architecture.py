"""Which decoder models the fused path runs, and where their parts are.

Llama-family decoder-only transformers models (Llama, SmolLM2, Mistral, Qwen2 with q/k/v
bias): RMSNorm, rotary embeddings with a position-independent table, grouped-query
attention, a SiLU-gated MLP. Anything else raises :class:`UnsupportedModelError` naming the
feature, before any work is done; ``model.generate`` still runs such models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchq.runtime.errors import UnsupportedModelError

__all__ = ["SUPPORTED_MODEL_TYPES", "STATIC_ROPE_TYPES", "DecoderArchitecture", "inspect_model"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: rotary variants whose cos/sin depend only on the position (one table for the whole run)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DecoderArchitecture:
    layers: list  # decoder layer modules
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    embed: nn.Module
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    scale: float


def _window_layers(config) -> bool:
    """True when some layer uses sliding-window attention."""
    types = getattr(config, "layer_types", None)
    if types:
        return any(t == "sliding_attention" for t in types)
    if config.model_type == "qwen2":
        return bool(getattr(config, "use_sliding_window", False))
    return getattr(config, "sliding_window", None) is not None


def _rope_type(rotary: nn.Module, config) -> str:
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
    return rope_type


def inspect_model(model: nn.Module, max_len: int) -> DecoderArchitecture:
    """Check that the fused decoder can run ``model`` for ``max_len`` positions and locate its
    parts; raise :class:`UnsupportedModelError` naming the first unsupported feature."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"torchq.generate runs {SUPPORTED_MODEL_TYPES} decoder models; this one is {model_type!r}. "
            "Use model.generate."
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"the MLP activation {act!r} is not supported (only silu); use model.generate")
    if _window_layers(config):
        window = getattr(config, "sliding_window", None)
        if window is None or max_len > window:
            raise UnsupportedModelError(
                f"sliding-window attention (window {window}) over {max_len} positions is not supported; use "
                "model.generate, or keep prompt + max_new_tokens within the window"
            )
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if inner is None or rotary is None or not hasattr(model, "lm_head"):
        raise UnsupportedModelError("expected a *ForCausalLM model with .model.rotary_emb and .lm_head")
    rope = _rope_type(rotary, config)
    if rope not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope!r} changes with the sequence length; the fused decoder supports {STATIC_ROPE_TYPES}. "
            "Use model.generate."
        )
    layers = list(inner.layers)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in LINEAR_NAMES:
            mod = getattr(attn if name in LINEAR_NAMES[:4] else mlp, name, None)
            if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
                raise UnsupportedModelError(
                    f"model.layers.{i}.{name} is {type(mod).__name__}, not a plain nn.Linear (adapters, hooks or "
                    "fused modules are not supported); use model.generate"
                )
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm"):
                raise UnsupportedModelError(f"model.layers.{i} uses {type(norm).__name__}; only RMSNorm is supported")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scale = getattr(layers[0].self_attn, "scaling", head_dim**-0.5)
    return DecoderArchitecture(
        layers=layers,
        final_norm=inner.norm,
        lm_head=model.lm_head,
        rotary=rotary,
        embed=model.get_input_embeddings(),
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=config.intermediate_size,
        vocab=model.lm_head.weight.shape[0],
        eps=float(layers[0].input_layernorm.variance_epsilon),
        scale=float(scale),
    )


def rope_tables(arch: DecoderArchitecture, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, head_dim) fp32 from the model's own rotary module (so every
    static rope variant and its attention scaling come out exactly as the model computes them)."""
    probe = torch.zeros(1, 1, arch.head_dim, dtype=torch.float32)
    positions = torch.arange(max_len).unsqueeze(0)
    with torch.no_grad():
        cos, sin = arch.rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()
