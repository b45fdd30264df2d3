"""Perplexity and KL divergence of a causal LM on a text, against its float model.

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens
(the remainder is dropped); each window is one independent forward pass and every token
after the first of a window is scored (``window - 1`` predictions per window):

* perplexity ``exp(mean NLL)`` over all scored tokens;
* KL divergence ``mean KL(P_ref || P_model)`` (nats per token), where ``P_ref`` is the
  reference (float) model's next-token distribution at the same position;
* top-1 agreement: how often both models' most likely next token is the same.

Default text (:func:`default_text`): English held out from anything torchq tunes on, the
last third of Python's ``pydoc_data.topics`` (topics joined in their stored order), first
60,000 characters: 24 windows of 256 tokens with SmolLM2's tokenizer. Any text file works
(:func:`load_text`), and ``datasets:NAME[:CONFIG[:SPLIT]]`` reads a Hugging Face dataset's
``text`` column when online.

Everything is deterministic for a given model, windows and ``batch_size`` (no sampling;
batch size changes matmul shapes and so the last bits of the result).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_WINDOW",
    "DEFAULT_MAX_CHARS",
    "default_text",
    "load_text",
    "token_windows",
    "ReferenceLogProbs",
    "EvalResult",
    "evaluate",
    "perplexity",
    "kl_divergence",
]

DEFAULT_WINDOW = 256
DEFAULT_MAX_CHARS = 60_000


def default_text(max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The held-out English text: last third of ``pydoc_data.topics`` (sorted key order,
    :func:`torchq.algorithms.data.pydoc_text`), first ``max_chars``."""
    from torchq.algorithms.data import pydoc_text

    return pydoc_text()[1][:max_chars]


def load_text(source: Optional[str] = None, max_chars: Optional[int] = DEFAULT_MAX_CHARS) -> str:
    """Text to evaluate on.

    ``None`` or ``"pydoc"``: :func:`default_text`; a path: that UTF-8 file;
    ``"datasets:NAME[:CONFIG[:SPLIT]]"``: the ``text`` column of a Hugging Face dataset
    (needs ``pip install datasets`` and network), joined by blank lines. ``max_chars``
    keeps the first characters (``None``: all).
    """
    if source is None or source == "pydoc":
        return default_text(max_chars if max_chars is not None else 10**12)
    if source.startswith("datasets:"):
        text = _dataset_text(source)
    elif os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            text = f.read()
    else:
        raise FileNotFoundError(
            f"text source {source!r} is neither a file nor 'pydoc' nor 'datasets:NAME[:CONFIG[:SPLIT]]'"
        )
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty")
    return text if max_chars is None else text[:max_chars]


def _dataset_text(source: str) -> str:
    parts = source.split(":")[1:]
    if not parts or not parts[0]:
        raise ValueError(f"expected 'datasets:NAME[:CONFIG[:SPLIT]]', got {source!r}")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source!r} needs the `datasets` package: pip install datasets") from None
    ds = datasets.load_dataset(name, config, split=split)
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if t)


def token_windows(tokenizer, text: str, window: int = DEFAULT_WINDOW, max_windows: Optional[int] = None) -> torch.Tensor:
    """``(W, window)`` int64 token ids: consecutive non-overlapping windows of ``text``."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens: fewer than one window of {window}")
    return ids[: n * window].reshape(n, window)


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of the next token at every position but the last: ``(B, T-1, V)``."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


class ReferenceLogProbs:
    """The reference (float) model's log-probabilities on fixed windows, computed once.

    Memory: ``windows * (window - 1) * vocab * 4`` bytes (SmolLM2, 8 windows of 256:
    400 MB), kept so that many candidate models can be compared without rerunning the
    reference. Pass the reference *model* to :func:`evaluate` instead to run it in lockstep
    with no cache.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True):
        self.windows = windows
        self.log_probs: list[torch.Tensor] = []
        with torch.inference_mode():
            for batch in _batches(windows, batch_size, progress, "reference"):
                self.log_probs.extend(_log_probs(model, batch).unbind(0))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.log_probs[i]


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    kl: Optional[float]  # mean KL(reference || model) per scored token (nats), None without a reference
    top1_agreement: Optional[float]  # fraction of positions where both argmaxes agree
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def __str__(self) -> str:
        kl = f", KL {self.kl:.5f}, top-1 agreement {self.top1_agreement:.1%}" if self.kl is not None else ""
        return f"perplexity {self.perplexity:.3f}{kl} ({self.tokens} tokens in {self.windows} windows, {self.seconds:.1f} s)"


def _batches(windows: torch.Tensor, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        yield windows[s : s + batch_size]


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: Union[None, nn.Module, ReferenceLogProbs] = None,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` (from :func:`token_windows`), and KL / top-1
    agreement against ``reference`` (a float model run in lockstep, or precomputed
    :class:`ReferenceLogProbs` for the same windows)."""
    if isinstance(reference, ReferenceLogProbs) and not torch.equal(reference.windows, windows):
        raise ValueError("the ReferenceLogProbs were computed on different windows than the ones evaluated")
    t0 = time.perf_counter()
    nll = kl = 0.0
    agree = tokens = 0
    index = 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size, progress, desc):
            logp = _log_probs(model, batch)
            targets = batch[:, 1:]
            nll += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            tokens += targets.numel()
            if reference is not None:
                if isinstance(reference, ReferenceLogProbs):
                    ref = torch.stack([reference[index + i] for i in range(batch.shape[0])])
                else:
                    ref = _log_probs(reference, batch)
                kl += (ref.exp() * (ref - logp)).sum().item()
                agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
            index += batch.shape[0]
    mean_nll = nll / tokens
    return EvalResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        kl=kl / tokens if reference is not None else None,
        top1_agreement=agree / tokens if reference is not None else None,
        tokens=tokens,
        windows=windows.shape[0],
        seconds=time.perf_counter() - t0,
    )


def _windows_for(tokenizer, text: Optional[str], window: int, max_windows: Optional[int]) -> torch.Tensor:
    return token_windows(tokenizer, load_text(None) if text is None else text, window, max_windows)


def perplexity(
    model: nn.Module,
    tokenizer,
    text: Optional[str] = None,
    *,
    window: int = DEFAULT_WINDOW,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``text`` (default: :func:`default_text`)."""
    windows = _windows_for(tokenizer, text, window, max_windows)
    return evaluate(model, windows, batch_size=batch_size, progress=progress).perplexity


def kl_divergence(
    model: nn.Module,
    reference: nn.Module,
    tokenizer,
    text: Optional[str] = None,
    *,
    window: int = DEFAULT_WINDOW,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Mean KL(reference || model) per token on ``text`` (default: :func:`default_text`)."""
    windows = _windows_for(tokenizer, text, window, max_windows)
    return evaluate(model, windows, reference, batch_size=batch_size, progress=progress).kl
