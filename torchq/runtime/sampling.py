"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and
top-p applied in that order, as transformers' logits warpers do."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["next_token", "check_sampling"]


def check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """The next token id from a (vocab,) fp32 logits vector."""
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits / temperature if temperature != 1.0 else logits.clone()
    if top_k > 0 and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
