"""The fused decoder (torchq.generate, csrc/decode.cpp): logits equal to the eager model's
within fp32 rounding at every step, greedy tokens identical to transformers' generate, every
weight format and ISA path, odd sizes, threads, KV cache dtypes, torch.compile, and clear
errors for what it does not run."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import torchq
from torchq.kernels import cpu_ext
from torchq.formats.dispatch import prefer_kernels
from torchq.runtime import FusedDecoder, UnsupportedModelError, generate

from algorithms_fixtures import tiny_llama

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="needs the C++ kernels")

SCHEMES = {
    "fp32": None,
    "int4_g32": lambda: torchq.int4_weight_only(group_size=32),
    "int4_sym_g64": lambda: torchq.int4_weight_only(group_size=64, symmetric=True),
    "int8": lambda: torchq.int8_weight_only(),
    "intx3": lambda: torchq.intx_weight_only(bits=3, group_size=32),
    "w4a8": lambda: torchq.int8_dynamic_activation_int4_weight(group_size=32),
    "w8a8": lambda: torchq.int8_dynamic_activation_int8_weight(),
    "nf4": lambda: torchq.nf4_weight_only(block_size=32),
    "fp4": lambda: torchq.fp4_weight_only(block_size=32),
}


def llama(hidden=64, inter=96, layers=2, heads=4, kv=2, vocab=160, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256, **kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def quantized(model, scheme):
    m = copy.deepcopy(model)
    make = SCHEMES[scheme]
    if make is not None:
        torchq.quantize_(m, make())
    return m


def eager_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def decoder_logits(model, ids, kv_dtype=torch.float32, prefill=0):
    """Logits of positions prefill-1 .. T-1: ``prefill`` prompt rows in one call (none: start
    at position 0), then one token per step."""
    d = FusedDecoder.for_model(model, ids.shape[1])
    k, v = d.new_cache(ids.shape[1], kv_dtype)
    out = [d.step(ids[0, :prefill], k, v, 0)] if prefill else []
    for i in range(prefill, ids.shape[1]):
        out.append(d.step(ids[0, i : i + 1], k, v, i))
    return torch.stack(out)


def assert_close_logits(got, want, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * max(1.0, scale), f"{what}: max |logit error| {err:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_logits_match_eager_every_step_on_every_isa(scheme):
    model = quantized(llama(), scheme)
    ids = torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(1))
    want = eager_logits(model, ids)
    for isa in cpu_ext.supported_isas():
        with cpu_ext.force_isa(isa):
            got = decoder_logits(model, ids)  # one token per step from position 0
            assert_close_logits(got, want, f"{scheme} on {isa}, decode steps")
            got = decoder_logits(model, ids, prefill=12)  # 12-row prefill (GEMM path), then steps
            assert_close_logits(got, want[11:], f"{scheme} on {isa}, prefill + steps")


@pytest.mark.parametrize("scheme", ["fp32", "int4_g32", "w4a8", "nf4"])
def test_greedy_tokens_identical_to_transformers_generate(scheme):
    model = quantized(llama(layers=3), scheme)
    ids = torch.randint(0, 160, (1, 9), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(model, ids, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(got, want)


def test_qwen2_bias_and_mistral_and_multi_query():
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # the random init leaves biases at zero
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    mistral = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=80,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, sliding_window=None)).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    for model in (qwen, mistral):
        for scheme in ("fp32", "int4_g32"):
            m = quantized(model, scheme)
            assert_close_logits(decoder_logits(m, ids, prefill=8), eager_logits(m, ids)[7:], f"{model.config.model_type} {scheme}")


def test_activation_scale_and_act_order_weights():
    """AWQ leaves act_scale on o_proj (GQA); GPTQ act-order stores perm: both are applied in C++."""
    for algo in (torchq.AWQ, lambda base: torchq.GPTQ(base, act_order=True, static_groups=False)):
        model, calib, held = tiny_llama(layers=2)[:3]
        torchq.quantize_(model, algo(torchq.int4_weight_only(group_size=32)), calibration=calib)
        ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert any(getattr(w, "act_scale", None) is not None or getattr(w, "perm", None) is not None for w in ws)
        ids = held[:1]
        assert_close_logits(decoder_logits(model, ids, prefill=10), eager_logits(model, ids)[9:], "calibrated")


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.sampled_from([40, 48, 72]),
    inter=st.sampled_from([24, 56, 100]),
    heads_kv=st.sampled_from([(2, 1), (4, 2), (4, 4), (6, 2)]),
    scheme=st.sampled_from(sorted(SCHEMES)),
    prefill=st.integers(1, 9),
    bias=st.booleans(),
)
def test_odd_sizes_property(hidden, inter, heads_kv, scheme, prefill, bias):
    """Sizes with partial weight tiles (N % 16 != 0), padded K, head dims 6..36, any prefill length."""
    heads, kv = heads_kv
    if hidden % heads or (hidden // heads) % 2:
        return
    model = llama(hidden=hidden, inter=inter, heads=heads, kv=kv, layers=1, vocab=72, attention_bias=bias,
                  mlp_bias=bias)
    if SCHEMES[scheme] is not None:  # K of 24..100 pads to the group (32 or 64): padded weights
        torchq.quantize_(model, SCHEMES[scheme]())
    ids = torch.randint(0, 72, (1, prefill + 3), generator=torch.Generator().manual_seed(prefill))
    assert_close_logits(decoder_logits(model, ids, prefill=prefill), eager_logits(model, ids)[prefill - 1 :], scheme)


def test_results_do_not_depend_on_thread_count():
    model = quantized(llama(layers=2), "int4_g32")
    ids = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.ops.torchq._decoder_team_size() == n
            outs.append(decoder_logits(model, ids, prefill=10))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bf16_kv_cache_stays_close():
    model = quantized(llama(layers=2), "int4_g32")
    ids = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(5))
    want = eager_logits(model, ids)[9:]
    got = decoder_logits(model, ids, kv_dtype=torch.bfloat16, prefill=10)
    err = (got - want).abs().max().item()
    assert 0 < err < 0.05 * want.abs().max().item(), err  # rounded keys/values: close, not equal
    k, _ = FusedDecoder.for_model(model, 20).new_cache(20, torch.bfloat16)
    assert k.dtype == torch.bfloat16


def test_weights_are_shared_not_copied():
    model = quantized(llama(), "int4_g32")
    d = FusedDecoder.for_model(model, 32)
    assert FusedDecoder.for_model(model, 16) is d  # cached on the model
    w = model.model.layers[0].self_attn.q_proj.weight
    ids = torch.randint(0, 160, (1, 4))
    k, v = d.new_cache(4)
    before = d.step(ids[0], k, v, 0)
    with torch.no_grad():
        w.qdata.zero_()  # the decoder reads the model's own packed codes
    k, v = d.new_cache(4)
    assert not torch.equal(d.step(ids[0], k, v, 0), before)
    model.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.randn(64, 64))
    assert FusedDecoder.for_model(model, 16) is not d  # a swapped weight builds a new decoder
    import io

    torch.save(model, io.BytesIO())  # the cache lives outside the model: it still pickles and copies
    assert FusedDecoder.for_model(copy.deepcopy(model), 16) is not FusedDecoder.for_model(model, 16)


def test_compile_sees_the_op():
    model = quantized(llama(), "int4_g32")
    d = FusedDecoder.for_model(model, 16)
    ids = torch.randint(0, 160, (6,))
    k, v = d.new_cache(16)
    want = d.step(ids, k, v, 0)
    x = d.embed(ids).float()
    k2, v2 = d.new_cache(16)

    @torch.compile(fullgraph=True, backend="eager")
    def step(x, k, v):
        return torch.ops.torchq.decoder_step(d.handle, x, k, v, 0) * 1.0

    assert torch.equal(step(x, k2, v2), want)
    assert torch.equal(k2, k)  # the cache was written in place
    torch.library.opcheck(torch.ops.torchq.decoder_step.default, (d.handle, x, *d.new_cache(16), 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_sampling_and_streamer():
    model = quantized(llama(), "int4_g32")
    ids = torch.randint(0, 160, (1, 5))
    greedy = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    a = generate(model, ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=[],
                 generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=[],
                 generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (1, 17)

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    s = Streamer()
    out = generate(model, ids, max_new_tokens=6, streamer=s, eos_token_id=[])
    assert s.ended and s.puts[0] == ids[0].tolist() and sum(s.puts[1:], []) == out[0, 5:].tolist()
    stop = int(greedy[0, 7])  # the third generated token as end-of-sequence: stop after it
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=stop), greedy[:, :8])


def test_top_p_matches_transformers_warper():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from torchq.runtime.sampling import next_token

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    want = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(20)(None, logits[None].clone()))[0]
    allowed = torch.isfinite(want)
    for seed in range(40):
        tok = next_token(logits, True, 1.0, 20, 0.7, torch.Generator().manual_seed(seed))
        assert allowed[tok]


def test_unsupported_models_raise_naming_the_feature():
    base = llama()
    with pytest.raises(UnsupportedModelError, match="bfloat16"):
        generate(copy.deepcopy(base).to(torch.bfloat16), torch.tensor([[1, 2]]), max_new_tokens=2)
    window = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              sliding_window=8, max_position_embeddings=64)).eval()
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        generate(window, torch.tensor([[1, 2, 3]]), max_new_tokens=10)
    assert generate(window, torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape == (1, 7)  # within the window: fine
    dyn = llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        generate(dyn, torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="batch size 1"):
        generate(base, torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)
    nf4_dq = copy.deepcopy(base)
    torchq.quantize_(nf4_dq, torchq.nf4_weight_only(double_quant=True))
    with pytest.raises(UnsupportedModelError, match="double-quantized"):
        generate(nf4_dq, torch.tensor([[1, 2]]), max_new_tokens=2)
    ref = copy.deepcopy(base)
    with prefer_kernels("reference"):
        torchq.quantize_(ref, torchq.int4_weight_only(group_size=32))
    with pytest.raises(UnsupportedModelError, match="reference"):
        generate(ref, torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        generate(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(base, torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_embedding_rows_in_the_step_equal_the_module(scheme, tied):
    """Token ids go into the step, which looks up (and dequantizes) embedding rows itself:
    bit-identical to the model's own embedding lookup."""
    model = quantized(llama(vocab=100, tie_word_embeddings=tied), scheme)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    d = FusedDecoder.for_model(model, 16)
    ids = torch.tensor([0, 99, 17, 16, 15, 64, 3])
    k, v = d.new_cache(16)
    if scheme == "w8a8":  # its layout has no row dequantizer: the module looks rows up (step() does)
        assert not d.native_embedding or not tied
        if not d.native_embedding:
            with pytest.raises(RuntimeError, match="no embedding"):
                torch.ops.torchq.decoder_step(d.handle, ids, k, v, 0)
            return
    assert d.native_embedding
    native = torch.ops.torchq.decoder_step(d.handle, ids, k, v, 0)
    with torch.no_grad():
        x = model.model.embed_tokens(ids).float()
    k2, v2 = d.new_cache(16)
    assert torch.equal(torch.ops.torchq.decoder_step(d.handle, x, k2, v2, 0), native)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.torchq.decoder_step(d.handle, torch.tensor([100]), k, v, 0)


def test_bf16_prefill_route_prefills_with_the_models_own_forward():
    """Where the precision rule lets the prompt's rows take a bf16 route (here forced: the
    oneDNN route of AMX hosts, under matmul precision "high"), the prompt goes through the
    model's forward and its keys/values are copied into the fused cache's blocked layout."""
    ops = torch.ops.torchq
    model = quantized(llama(layers=2), "int4_g32")
    ids = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(8))
    d = FusedDecoder.for_model(model, 60)
    k1, v1 = d.new_cache(40)
    eager_logits_ = d.prefill_eager(model, ids[0], k1, v1)
    k2, v2 = d.new_cache(40)
    fused_logits = d.step(ids[0], k2, v2, 0)
    torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)  # same layout, same values up to rounding order
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    assert_close_logits(eager_logits_, fused_logits, "eager prefill")
    assert d.prefill_route(40) == "fused"
    old_precision = torch.get_float32_matmul_precision()
    old_route = ops._tune("onednn_route", 1)
    try:
        torch.set_float32_matmul_precision("high")
        assert d.prefill_route(40) == "eager" and d.prefill_route(8) == "fused"
        want = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = generate(model, ids, max_new_tokens=10, eos_token_id=[])
    finally:
        torch.set_float32_matmul_precision(old_precision)
        ops._tune("onednn_route", old_route)
    assert torch.equal(got, want)


def test_int8_activations_option_runs_int4_layers_as_w4a8():
    """activations="int8" is the explicit faster option: int4 weight-only layers run exactly
    as W4A8 layers with the same codes do (identical logits to a W4A8-quantized copy)."""
    base = llama(layers=2)
    int4 = quantized(base, "int4_g32")
    w4a8 = quantized(base, "w4a8")
    assert torch.equal(int4.model.layers[0].mlp.up_proj.weight.qdata, w4a8.model.layers[0].mlp.up_proj.weight.qdata)
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(9))
    d = FusedDecoder.for_model(int4, 12, activations="int8")
    assert d.kinds["model.layers.0.q_proj"] == "int4 weight-only, int8 activations"
    assert FusedDecoder.for_model(int4, 12) is not d  # the default keeps fp32 activations
    k, v = d.new_cache(12)
    got = torch.stack([d.step(ids[0, :8], k, v, 0)] + [d.step(ids[0, i : i + 1], k, v, i) for i in range(8, 12)])
    assert torch.equal(got, decoder_logits(w4a8, ids, prefill=8))
    assert torch.equal(generate(int4, ids, max_new_tokens=8, activations="int8", eos_token_id=[]),
                       generate(w4a8, ids, max_new_tokens=8, eos_token_id=[]))
    with pytest.raises(ValueError, match="activations"):
        generate(int4, ids, max_new_tokens=2, activations="int4")
