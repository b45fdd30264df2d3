"""Real-model interop on SmolLM2-135M (slow suite): torchq int4 g64 exported to every format
and re-imported with identical logits; AWQ/GPTQ directories load and generate; the GGUF
re-export of the Q4_1 file keeps every quantized block byte for byte."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

gguf = pytest.importorskip("gguf")

import torchq  # noqa: E402
from smollm2 import smollm2_path  # noqa: E402
from torchq.interop.gguf import GGUFFile  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol():
    f = GGUFFile(smollm2_path())
    tok = f.tokenizer()
    model, _ = f.model(keep_quantized=False)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        top5 = model(prompt).logits[0, -1].topk(5).indices.tolist()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=64), filter_fn=lambda m, n: n != "lm_head")
    return dict(file=f, tokenizer=tok, model=model, prompt=prompt, top5=top5)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["gptq", "awq-gemm", "awq-gemv", "compressed-tensors", "torchq"])
def test_smollm2_export_reimport(smol, tmp_path, fmt):
    model, ids = smol["model"], smol["prompt"]
    torchq.save_pretrained(model, tmp_path / "a", fmt, tokenizer=smol["tokenizer"])
    t0 = time.perf_counter()
    loaded = torchq.from_pretrained(str(tmp_path / "a"))
    print(f"{fmt}: from_pretrained {time.perf_counter() - t0:.2f} s")
    torchq.save_pretrained(loaded, tmp_path / "b", fmt)
    again = torchq.from_pretrained(str(tmp_path / "b"))
    assert torch.equal(_logits(loaded, ids), _logits(again, ids))
    if fmt in ("compressed-tensors", "torchq"):
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    else:  # fp16 scales
        torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0.05, atol=0.05)
        with torch.no_grad():
            out = loaded.generate(ids, max_new_tokens=3, do_sample=False)
        assert out[0, ids.shape[1]] in smol["top5"]
    from torchq.interop.load import load_tokenizer

    assert load_tokenizer(str(tmp_path / "a"))(PROMPT)["input_ids"] == ids[0].tolist()


def test_smollm2_gguf_reexport_keeps_blocks(smol, tmp_path):
    f = smol["file"]
    model, _ = f.model()
    out = tmp_path / "smol.gguf"
    torchq.save_gguf(model, out, tokenizer=smol["tokenizer"])
    a = {t.name: t for t in f.reader.tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        assert b[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(b[name].data), np.asarray(t.data)), name
    ids = smol["prompt"]
    assert torch.equal(_logits(torchq.from_pretrained(str(out)), ids), _logits(model, ids))


def test_smollm2_gguf_tokenizer_equals_autotokenizers(smol):
    """SmolLM2's tokenizer from GGUFFile (0.8 s) is AutoTokenizer's (13 s): same class, backend,
    special tokens, chat template and encodings of the held-out text."""
    import os

    from transformers import AutoTokenizer

    from torchq.apps.eval import default_text

    directory, name = os.path.split(smollm2_path())
    ours, ref = smol["tokenizer"], AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert type(ours) is type(ref) and ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.special_tokens_map == ref.special_tokens_map and ours.chat_template == ref.chat_template
    text = default_text()[:20000]
    assert ours(text).input_ids == ref(text).input_ids


def test_smollm2_gguf_fast_loader_equals_gguf_py_loader():
    """The fast GGUF reader loads SmolLM2 into exactly the model the gguf-py-based loader built
    (every inner tensor, logits, 8 greedy tokens), in seconds."""
    from gguf_fixtures import legacy_gguf_file
    from test_gguf import _assert_same_model

    path = smollm2_path()
    torchq.from_pretrained(path)  # warm: kernel library, model code
    t0 = time.perf_counter()
    new = torchq.from_pretrained(path)
    seconds = time.perf_counter() - t0
    old, _ = legacy_gguf_file(path).model()
    _assert_same_model(new, old)
    assert seconds < 8, f"from_pretrained(SmolLM2 GGUF) took {seconds:.1f} s (about 1.5 s expected; was 27 s)"


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_smollm2_gguf_export_perplexity_in_llama_cpp(smol, tmp_path, gtype):
    """llama.cpp runs torchq's GGUF export to within 1 % of torchq's perplexity on the same
    token windows (torchq scoring the very file: its fp16 scales)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (bench-llamacpp)")
    from benchmarks.llamacpp_perplexity import SCHEMES, llamacpp_perplexity
    from torchq.apps.eval import default_text, evaluate, token_windows

    model, _ = smol["file"].model(keep_quantized=False)
    torchq.quantize_(model, SCHEMES[gtype](torchq), filter_fn=lambda m, n: n != "lm_head")
    path = str(tmp_path / f"smol.{gtype}.gguf")
    torchq.save_gguf(model, path, tokenizer=smol["tokenizer"])
    windows = token_windows(smol["tokenizer"], default_text(), 128, 2)
    ours = evaluate(torchq.from_pretrained(path), windows, progress=False).perplexity
    theirs = llamacpp_perplexity(path, windows, threads=2)
    assert abs(theirs / ours - 1) < 0.01, (gtype, ours, theirs)
