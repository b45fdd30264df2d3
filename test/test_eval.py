"""torchq.apps.eval: perplexity / KL definitions, windows, text sources, determinism (tiny GGUF llama)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.apps import eval as teval  # noqa: E402
from torchq.interop.gguf import GGUFFile  # noqa: E402

from gguf_fixtures import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_tiny_llama(path)
    f = GGUFFile(path)
    model, _ = f.model(keep_quantized=False)
    return f.tokenizer(), model


def test_default_text_is_the_held_out_third():
    from pydoc_data.topics import topics

    text = teval.default_text()
    full = "\n\n".join(topics[k] for k in sorted(topics))  # sorted keys: the stored order may differ
    assert len(text) == teval.DEFAULT_MAX_CHARS
    assert full.index(text) == 2 * len(full) // 3
    assert teval.load_text(None) == text == teval.load_text("pydoc")


def test_windows(tiny):
    tok, _ = tiny
    w = teval.token_windows(tok, teval.default_text(2000), window=64)
    ids = tok(teval.default_text(2000), add_special_tokens=False).input_ids
    assert w.shape == (len(ids) // 64, 64) and w.dtype == torch.long
    assert w.reshape(-1).tolist() == ids[: w.numel()]
    assert teval.token_windows(tok, teval.default_text(2000), window=64, max_windows=3).shape == (3, 64)
    with pytest.raises(ValueError, match="fewer than one window"):
        teval.token_windows(tok, "short", window=64)


def test_perplexity_and_kl_definitions(tiny):
    tok, model = tiny
    windows = teval.token_windows(tok, teval.default_text(3000), window=48, max_windows=4)
    other = copy.deepcopy(model)
    torchq.quantize_(other, torchq.int4_weight_only(group_size=32))
    result = teval.evaluate(other, windows, model, batch_size=3, progress=False)

    with torch.no_grad():
        q = F.log_softmax(other(windows).logits[:, :-1].float(), -1)
        p = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
    nll = F.cross_entropy(q.reshape(-1, q.shape[-1]), windows[:, 1:].reshape(-1), reduction="mean")
    kl = F.kl_div(q, p, log_target=True, reduction="sum") / (windows.shape[0] * (windows.shape[1] - 1))
    assert result.tokens == 4 * 47 and result.windows == 4
    assert result.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert result.kl == pytest.approx(kl.item(), rel=1e-4) and result.kl > 0
    assert result.top1_agreement == pytest.approx((q.argmax(-1) == p.argmax(-1)).float().mean().item())
    assert "perplexity" in str(result) and "KL" in str(result)


def test_reference_cache_equals_lockstep_and_self_kl_is_zero(tiny):
    tok, model = tiny
    windows = teval.token_windows(tok, teval.default_text(3000), window=32, max_windows=5)
    other = copy.deepcopy(model)
    torchq.quantize_(other, torchq.int8_weight_only())
    cache = teval.ReferenceLogProbs(model, windows, batch_size=2, progress=False)
    a = teval.evaluate(other, windows, cache, batch_size=2, progress=False)
    b = teval.evaluate(other, windows, model, batch_size=2, progress=False)
    assert (a.perplexity, a.kl, a.top1_agreement) == (b.perplexity, b.kl, b.top1_agreement)  # deterministic
    same = teval.evaluate(model, windows, cache, batch_size=2, progress=False)
    assert same.kl == 0.0 and same.top1_agreement == 1.0
    with pytest.raises(ValueError, match="different windows"):
        teval.evaluate(other, windows[:2], cache, progress=False)


def test_helpers(tiny):
    tok, model = tiny
    text = teval.default_text(3000)
    ppl = teval.perplexity(model, tok, text, window=32, max_windows=2, progress=False)
    windows = teval.token_windows(tok, text, 32, 2)
    assert ppl == teval.evaluate(model, windows, progress=False).perplexity
    assert teval.kl_divergence(model, model, tok, text, window=32, max_windows=2, progress=False) == 0.0


def test_text_sources(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo world " * 10, encoding="utf-8")
    assert teval.load_text(str(p)) == "héllo world " * 10
    assert teval.load_text(str(p), max_chars=5) == "héllo"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        teval.load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="neither a file"):
        teval.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="datasets:NAME"):
        teval.load_text("datasets:")


def test_datasets_source_needs_the_package(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        teval.load_text("datasets:wikitext:wikitext-2-raw-v1:test")
