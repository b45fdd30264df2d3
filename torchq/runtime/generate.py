"""``torchq.generate``: greedy or sampled generation through the fused decoder."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from torchq.runtime.decoder import FusedDecoder
from torchq.runtime.sampling import check_sampling, next_token

__all__ = ["generate", "PREFILL_CHUNK"]

#: prompt tokens per prefill call (each row's result is independent of the chunking)
PREFILL_CHUNK = 256


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    streamer=None,
    *,
    eos_token_id: Optional[Union[int, Iterable[int]]] = None,
    kv_dtype: torch.dtype = torch.float32,
    activations: str = "auto",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ((1, T) or (T,)) with the
    fused decoder; returns (1, T + new) token ids, like transformers ``generate``.

    Greedy decoding (``do_sample=False``) returns the tokens transformers' greedy ``generate``
    returns for the same weights; generation stops after an end-of-sequence token
    (``eos_token_id``, default: the model's generation config). Sampling applies
    temperature, top-k and top-p in that order. ``streamer`` gets ``put`` / ``end`` calls
    like transformers streamers. ``kv_dtype``: float32 or bfloat16 KV cache. The model's
    generation config processors (repetition penalty, ...) are not applied.

    Numerics follow torchq's precision rule: decode steps compute weight-only layers in fp32;
    where the rule lets the prompt's rows run a bf16 route (``torch.set_float32_matmul_precision
    ("high")`` on an AMX or AVX512-BF16 host), the prompt is prefilled by the model's own
    forward and its keys and values copied into the fused cache. ``activations="int8"`` is the
    explicit faster option: int4 weight-only layers then quantize their activations per token to
    int8 and use integer dot products, exactly as W4A8 layers do (a numerics change: W4A8's
    quality, not the weight-only model's).

    Raises ``UnsupportedModelError`` (a ``NotImplementedError``) naming what the fused path
    cannot run; ``model.generate`` still runs such models."""
    check_sampling(do_sample, temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise NotImplementedError(
            f"torchq.generate runs batch size 1; got input_ids of shape {tuple(input_ids.shape)}. "
            "Call it once per sequence, or use model.generate for batches."
        )
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    prompt = ids[0].to(torch.long)
    total = prompt.numel() + max_new_tokens
    decoder = FusedDecoder.for_model(model, total, activations)
    k_cache, v_cache = decoder.new_cache(total, kv_dtype)
    eos = _eos_ids(model, eos_token_id)
    if streamer is not None:
        streamer.put(ids.cpu())
    out = []
    if max_new_tokens:
        logits = None
        if decoder.prefill_route(prompt.numel()) == "eager":  # bf16 routes allowed: the model's own prefill
            logits = decoder.prefill_eager(model, prompt, k_cache, v_cache)
        else:
            for start in range(0, prompt.numel(), PREFILL_CHUNK):
                logits = decoder.step(prompt[start : start + PREFILL_CHUNK], k_cache, v_cache, start)
        pos = prompt.numel()
        while True:
            tok = next_token(logits, do_sample, temperature, top_k, top_p, generator)
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
            if tok in eos or len(out) == max_new_tokens:
                break
            logits = decoder.step(torch.tensor([tok]), k_cache, v_cache, pos)
            pos += 1
    if streamer is not None:
        streamer.end()
    new = torch.tensor(out, dtype=ids.dtype).unsqueeze(0)
    return torch.cat([ids, new], dim=1)
