"""Real-model suite on SmolLM2-135M-Instruct (GGUF Q4_1): marked slow, run by CI.

* GGUF import: 210 Q4_1 linears, 61 F32 norms and one Q8_0 embedding tied to the LM head;
  every imported weight equals transformers' own dequantized load bit for bit and so do
  the logits.
* Every scheme quantizes the model, generates, reloads bit-exact through
  ``torchq.save_file`` (:mod:`torchq.interop.model_io`, what ``torchq quantize`` writes), and keeps
  its perplexity on held-out text within a bound at least as good as the issue's reference
  points (plain-PyTorch fake quantization, float 15.16 on its text):

  ======================  =========  ==============  ======================
  case                    reference  bound (here)    measured here (24 w.)
  ======================  =========  ==============  ======================
  int8 per channel        +0.26 %    +0.27 %         -0.05 %
  W8A8 per token          +3.2 %     +3.3 %          +3.23 %
  int4 g32 float zero     +0.0 %     +0.001 %        +0.000 % (lossless)
  int4 g32 int zero       +26.2 %    +26.2 %         +23.2 %
  int4 g64 int zero       +31..35 %  +35 %           +33.3 %
  int4 g128 int (padded)  +32.6 %    +32.6 %         +32.2 %
  W4A8 g32 asymmetric     +31 %      +31 %           +28.9 %
  ======================  =========  ==============  ======================

  Reference ratios are design.md's perplexities over float 15.16 (15.20, 15.65, 15.16,
  19.13, 19.9-20.5, 20.1); the W8A8 bound allows for their 2-decimal rounding. Like those
  references, the LM head (tied to the embedding) stays float in the perplexity cases; the
  import case covers a quantized tied head. The text is :func:`torchq.apps.eval.default_text`,
  24 windows of 256 tokens (float perplexity 15.588 here).

TODO(hf): when the transformers integration merges, also reload every case through
``save_pretrained`` / ``from_pretrained`` (see :mod:`torchq.interop.model_io`'s TODO).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.kernels import prefer_kernels  # noqa: E402
from torchq.apps import eval as teval  # noqa: E402
from torchq.quantize.schemes import config_from_scheme, scheme_names  # noqa: E402

SCHEME_NAMES = tuple(scheme_names())
from smollm2 import smollm2_path  # noqa: E402
from torchq.interop.gguf import GGUFFile  # noqa: E402
from torchq.interop.model_io import load_model, save_quantized  # noqa: E402

WINDOWS = 24
BATCH = 8
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol():
    f = GGUFFile(smollm2_path())
    tokenizer = f.tokenizer()
    fp32, _ = f.model(keep_quantized=False)
    windows = teval.token_windows(tokenizer, teval.default_text(), 256, WINDOWS)
    float_ppl = teval.evaluate(fp32, windows, batch_size=BATCH, progress=False).perplexity
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        top5 = fp32(prompt).logits[0, -1].topk(5).indices.tolist()
    return dict(file=f, tokenizer=tokenizer, fp32=fp32, windows=windows, float_ppl=float_ppl, prompt=prompt, top5=top5)


def _logits(model, ids=None):
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 1015]]) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def _round_trip(model, smol, tmp_path) -> None:
    """Save with torchq.save_file (via model_io, as `torchq quantize` does), reload, compare bit for bit."""
    out = str(tmp_path / "saved")
    save_quantized(model, smol["tokenizer"], out)
    reloaded = load_model(out).model
    assert torch.equal(_logits(reloaded), _logits(model))
    for (name, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert type(a) is type(b), name
    # TODO(hf): the same through model.save_pretrained(out) + AutoModelForCausalLM.from_pretrained(out)


def _generate(model, smol) -> list[int]:
    with torch.no_grad():
        out = model.generate(smol["prompt"], max_new_tokens=3, do_sample=False)
    new = out[0, smol["prompt"].shape[1] :].tolist()
    assert len(new) == 3
    assert new[0] in smol["top5"], f"first generated token {new[0]} is not among the float model's top 5 {smol['top5']}"
    return new


# ---------------------------------------------------------------------- GGUF import
def test_gguf_import_counts_and_matches_transformers(smol):
    from transformers import AutoModelForCausalLM

    model, report = smol["file"].model(keep_quantized=True)
    assert report.count("Q4_1", "quantized", "linear") == 210
    assert report.count("F32", "float", "norm") == 61
    assert report.count("Q8_0", "quantized", "embedding") == 1
    assert report.count(action="dequantized") == 0 and len(report.tensors) == 272
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, torchq.AffineQuantizedTensor)

    path = smol["file"].path
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
    hf_state = hf.state_dict()
    for name, p in model.named_parameters():
        w = p.dequantize() if isinstance(p, torchq.AffineQuantizedTensor) else p
        assert torch.equal(w, hf_state[name]), name
    ids = smol["windows"][:1, :64]
    # the weights are bit-identical (above); logits differ only by the kernels' fp32 summation order
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(_logits(model), _logits(smol["fp32"]), rtol=1e-4, atol=1e-3)


def test_gguf_import_generates_and_round_trips(smol, tmp_path):
    model, _ = smol["file"].model(keep_quantized=True)
    new = _generate(model, smol)
    assert "Paris" in smol["tokenizer"].decode(new)
    _round_trip(model, smol, tmp_path)


# ---------------------------------------------------------------------- schemes
FLOAT_REF = 15.16
CASES = {
    # name: (config, max relative perplexity increase, reference point)
    "int8": (torchq.int8_weight_only(), 0.0027, 15.20 / FLOAT_REF - 1),
    "w8a8": (torchq.int8_dynamic_activation_int8_weight(), 0.033, 15.65 / FLOAT_REF - 1),
    "int4_g32_float": (torchq.int4_weight_only(group_size=32, zero_point_domain="float"), 0.00001, 0.0),
    "int4_g32_int": (torchq.int4_weight_only(group_size=32), 0.262, 19.13 / FLOAT_REF - 1),
    "int4_g64_int": (torchq.int4_weight_only(group_size=64), 0.35, 20.5 / FLOAT_REF - 1),
    "int4_g128_int_padded": (torchq.int4_weight_only(group_size=128), 0.326, 20.1 / FLOAT_REF - 1),
    "w4a8_g32_int": (torchq.int8_dynamic_activation_int4_weight(group_size=32), 0.31, 0.31),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scheme_perplexity_generation_and_reload(name, smol, tmp_path):
    config, bound, reference = CASES[name]
    assert bound <= reference + 0.001, "a bound must be at least as good as its reference point"
    model = copy.deepcopy(smol["fp32"])
    report = torchq.quantize_(model, config, overrides={"lm_head": None})
    assert report.count("skipped") == 1  # the (tied) LM head, as in the reference measurements
    assert report.count("padded") == (180 if name.endswith("padded") else 0)  # K=576: q k v o gate up
    ppl = teval.evaluate(model, smol["windows"], batch_size=BATCH, progress=False).perplexity
    increase = ppl / smol["float_ppl"] - 1
    print(f"\n{name}: perplexity {ppl:.4f} vs float {smol['float_ppl']:.4f}: {increase:+.3%} (bound {bound:+.3%})")
    assert increase <= bound
    _generate(model, smol)
    _round_trip(model, smol, tmp_path)


#: tokens for the fast-kernel vs reference-kernel comparison. Per layer the two agree to ~1e-6
#: (test_kernels_match_references_layer_by_layer), but over 30 layers such differences flip
#: a few int8 activation roundings and perplexity on short text moves chaotically: W4A8 on one
#: 64-token window measured 25.4 (C++) vs 23.0 (reference), on 8 x 256 tokens 29.85 vs 29.55
#: (+1 %). Four full windows keep that noise well inside the 3 % bound.
COMPARE_WINDOWS = 4


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_every_vocabulary_scheme_quantizes_the_whole_model(scheme, smol):
    """Each command-line scheme with its defaults, tied LM head and embedding included, runs on
    SmolLM2 and stays a language model whose fast kernels cost no accuracy against the format's
    own plain-PyTorch reference kernels (issue 5: within 3 %)."""
    config = config_from_scheme(scheme)
    model = copy.deepcopy(smol["fp32"])
    report = torchq.quantize_(model, config)
    assert report.count("skipped") == 0 and report.count("tied") == 1
    assert isinstance(model.model.embed_tokens.weight, torchq.TorchqTensor)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    ids = smol["windows"][:COMPARE_WINDOWS]
    ppl = teval.evaluate(model, ids, batch_size=COMPARE_WINDOWS, progress=False).perplexity
    float_ppl = teval.evaluate(smol["fp32"], ids, batch_size=COMPARE_WINDOWS, progress=False).perplexity
    with prefer_kernels("reference"):
        reference = copy.deepcopy(smol["fp32"])
        torchq.quantize_(reference, config)
    ref_ppl = teval.evaluate(reference, ids, batch_size=COMPARE_WINDOWS, progress=False).perplexity
    print(f"\n{scheme} (whole model): perplexity {ppl:.3f} (reference kernels {ref_ppl:.3f}) vs float {float_ppl:.3f}")
    assert ppl <= ref_ppl * 1.03
    # a broken head or embedding gives perplexities in the thousands; bnb-FP4 with the tied head
    # quantized measured x2.4 here (its table is coarse), NF4 and e2m1 less
    assert ppl < 3 * float_ppl


def _linear_inputs(model, ids) -> dict[str, torch.Tensor]:
    """The input each linear layer of ``model`` sees on ``ids`` (first call per layer)."""
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            inputs.setdefault(name, args[0].detach().clone())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return inputs


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_kernels_match_references_layer_by_layer(scheme, smol):
    """On the real model's own activations, every layer's fast kernel equals the reference
    kernel up to float rounding (measured worst: 1.0e-6 of the output's max for W4A8/W8A8), for
    prefill (128 tokens, the GEMM paths) and decode (1 token, the GEMV paths). ``exact_fp32``
    keeps hosts with native bf16 from taking their documented bf16 path at 128 rows."""
    config = config_from_scheme(scheme)
    if hasattr(config, "exact_fp32"):
        config = dataclasses.replace(config, exact_fp32=True)
    model = copy.deepcopy(smol["fp32"])
    torchq.quantize_(model, config)
    with prefer_kernels("reference"):
        reference = copy.deepcopy(smol["fp32"])
        torchq.quantize_(reference, config)
    inputs = _linear_inputs(reference, smol["windows"][:1, :128])
    fast_layers, ref_layers = dict(model.named_modules()), dict(reference.named_modules())
    assert len(inputs) == 211
    kernels = set()
    for name, x in inputs.items():
        kernels.add(fast_layers[name].weight.kernel)
        assert ref_layers[name].weight.kernel.startswith("reference.")
        for rows in (x, x[:, -1:]):
            with torch.no_grad():
                got, want = fast_layers[name](rows), ref_layers[name](rows)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 2e-5, f"{scheme} {name} M={rows.shape[1]}: fast kernel differs from its reference by {err:.2e}"
    assert not any(k.startswith("reference.") for k in kernels), kernels
