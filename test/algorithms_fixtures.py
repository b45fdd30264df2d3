"""Shared toy models and calibration data for the algorithm tests (cheap: CPU seconds)."""

from __future__ import annotations

import torch
from torch import nn


def correlated_inputs(n_items: int = 8, rows: int = 64, k: int = 64, rank: int = 8, seed: int = 0, outliers: bool = False):
    """Calibration items with strongly correlated features (low rank + noise), and a
    held-out batch from the same distribution; a few outlier channels if asked."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, k, generator=g)
    scale = torch.ones(k)
    if outliers:
        scale[torch.randperm(k, generator=g)[: max(1, k // 16)]] = 20.0

    def draw(n):
        return (torch.randn(n, rank, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)) * scale

    return [draw(rows) for _ in range(n_items)], draw(256)


def toy_mlp(k: int = 64, hidden: int = 128, out: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, out))


def tiny_llama(seed: int = 0, bias: bool = False, layers: int = 2):
    """A random 2-layer Llama (hidden 64, GQA 4/2 heads, vocab 128) and token windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=bias, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so folding is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randint(0, 128, (1, 32), generator=g) for _ in range(4)]
    held = torch.randint(0, 128, (2, 32), generator=g)
    return model, calib, held


def tiny_causal_lm(kind: str, kv_heads: int = 2, seed: int = 0):
    """A random 2-layer decoder of another family the calibration driver supports
    (``"qwen2"``: q/k/v bias; ``"mistral"``; ``"phi3"``: fused ``qkv_proj`` / ``gate_up_proj``),
    hidden 64, 4 heads over ``kv_heads`` KV heads, norms away from 1."""
    import transformers

    families = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "phi3": "Phi3"}
    config_cls = getattr(transformers, families[kind] + "Config")
    model_cls = getattr(transformers, families[kind] + "ForCausalLM")
    torch.manual_seed(seed)
    extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    cfg = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False, **extra,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randint(0, 128, (1, 32), generator=g) for _ in range(4)]
    held = torch.randint(0, 128, (2, 32), generator=g)
    return model, calib, held
