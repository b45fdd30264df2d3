"""Calibration data: token windows for the algorithms that look at activations.

Default text: the first two thirds of Python's ``pydoc_data.topics`` (topics joined in
sorted key order, :func:`pydoc_text`). :func:`torchq.apps.eval.default_text` scores on the
last third. pydoc repeats whole sections under several topics (``specialnames`` holds
``sequence-types``, ``numeric-types`` and others), so a paragraph of the first two thirds
that also occurs in the last third is left out: calibration never sees evaluation text.
Windows are spread evenly over the tokens (non-overlapping while the text is long enough;
deterministic).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

__all__ = ["calibration_data", "calibration_text", "pydoc_text"]


def pydoc_text() -> tuple[str, str]:
    """``pydoc_data.topics`` joined by blank lines in sorted key order, split at two thirds:
    (first two thirds, last third). The last third is the held-out evaluation text."""
    from pydoc_data.topics import topics

    full = "\n\n".join(topics[k] for k in sorted(topics))
    cut = 2 * len(full) // 3
    return full[:cut], full[cut:]


def calibration_text() -> str:
    """The first two thirds of the pydoc topics without the paragraphs that also occur in
    the last third (pydoc repeats sections across topics; about a quarter of the default
    evaluation text would otherwise be calibration text too)."""
    head, held = pydoc_text()
    kept = [p for p in head.split("\n\n") if p.strip() not in held]
    return "\n\n".join(kept)


def _encode(tokenizer, text: str) -> torch.Tensor:
    if callable(getattr(tokenizer, "encode", None)):
        ids = tokenizer.encode(text, add_special_tokens=False) if _takes_special(tokenizer) else tokenizer.encode(text)
    else:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(text) method")
    ids = getattr(ids, "ids", ids)
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _takes_special(tokenizer) -> bool:
    import inspect

    try:
        return "add_special_tokens" in inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        return False


def calibration_data(
    tokenizer=None,
    n_samples: int = 128,
    seq_len: int = 512,
    texts: Optional[Sequence[Union[str, torch.Tensor]]] = None,
) -> list[torch.Tensor]:
    """``n_samples`` LongTensor windows of shape ``(1, seq_len)`` for ``quantize_(...,
    calibration=)``.

    ``texts``: strings (tokenized and joined) or ready ``input_ids`` tensors (used as they
    are, each reshaped to ``(1, T)``); default: :func:`calibration_text`.
    """
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len <= 1:
        raise ValueError(f"seq_len must be an integer > 1, got {seq_len!r}")
    if texts is not None and len(texts) and all(isinstance(t, torch.Tensor) for t in texts):
        out = [t.reshape(1, -1).long() for t in texts]
        return out[:n_samples]
    if tokenizer is None:
        raise ValueError("calibration_data needs a tokenizer (or texts=[input_ids tensors])")
    strings = [calibration_text()] if texts is None else list(texts)
    if not strings or not all(isinstance(t, str) for t in strings):
        raise TypeError("texts must be a list of strings or a list of input_ids tensors")
    ids = torch.cat([_encode(tokenizer, t) for t in strings])
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    last = ids.numel() - seq_len
    starts = torch.linspace(0, last, n_samples).round().long().tolist() if n_samples > 1 else [0]
    return [ids[s : s + seq_len].reshape(1, -1).clone() for s in starts]


def as_model_inputs(sample) -> tuple[tuple, dict]:
    """One calibration item -> ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, torch.Tensor):
        if sample.dtype in (torch.int64, torch.int32):
            return (), {"input_ids": sample.reshape(1, -1) if sample.dim() == 1 else sample.long()}
        return (sample,), {}
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    raise TypeError(
        f"calibration items must be LongTensor input_ids (1-D or [B, T]), dicts of model inputs or float "
        f"tensors (plain modules); got {type(sample).__name__}"
    )


def check_calibration(calibration) -> list:
    """Materialize ``calibration`` (any iterable) and refuse an empty one."""
    if calibration is None:
        raise ValueError(
            "this algorithm needs calibration data: quantize_(model, config, calibration=torchq.calibration_data(tokenizer))"
        )
    items = list(calibration) if isinstance(calibration, Iterable) else None
    if not items:
        raise ValueError("calibration is empty; pass an iterable of input_ids tensors or dicts of model inputs")
    return items
