"""Algorithm configs, calibration data and the sequential driver (issue 11, part 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchq
from torchq.algorithms.configs import VALID_BASES
from torchq.algorithms.sequential import capture_layer_inputs
from torchq.quantize.configs import config_from_dict, config_from_json

from algorithms_fixtures import correlated_inputs, tiny_causal_lm, tiny_llama, toy_mlp

INT4 = torchq.int4_weight_only(group_size=64)
ALGOS = [
    torchq.GPTQ(INT4),
    torchq.GPTQ(torchq.nf4_weight_only(), damp=0.05, act_order=True, mse_clip=True),
    torchq.AWQ(torchq.int4_weight_only(group_size=128)),
    torchq.AWQ(torchq.GPTQ(INT4)),
    torchq.AWQ(INT4, unfoldable="skip"),
    torchq.AutoRound(torchq.int4_weight_only(group_size=128), iters=200),
    torchq.AutoRound(INT4, preset="light"),
    torchq.AutoRound(INT4, preset="light", compute_dtype="bfloat16"),
    torchq.AutoRound(INT4, iters=50, seed=7),
    torchq.HQQ(INT4),
    torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), alpha=0.5),
    torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), alpha="auto"),
    torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), alpha=0.5, unfoldable="skip"),
    torchq.SmoothQuant(torchq.GPTQ(torchq.int8_dynamic_activation_int4_weight(group_size=64)), alpha=0.6),
]


@pytest.mark.parametrize("cfg", ALGOS, ids=lambda c: c.to_json())
def test_json_round_trip(cfg):
    assert config_from_json(cfg.to_json()) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["version"] == type(cfg).current_version and isinstance(cfg.to_dict()["base"], dict)


def test_gptq_version_1_dicts_keep_their_meaning():
    """Version 2 changed GPTQ's defaults (act-order with static groups, MSE clipping): a
    version 1 dict (a recorded recipe) is read with the version 1 defaults."""
    v1 = {"type": "gptq", "version": 1, "base": INT4.to_dict(), "damp": 0.01, "block_size": 128,
          "act_order": True, "mse_clip": False, "true_sequential": True}
    cfg = config_from_dict(v1)
    assert cfg.version == 2 and cfg.act_order and not cfg.mse_clip and not cfg.static_groups  # act-order via perm
    assert not config_from_dict({"type": "gptq", "version": 1, "base": INT4.to_dict()}).act_order
    now = torchq.GPTQ(INT4)
    assert (now.act_order, now.static_groups, now.mse_clip) == (True, True, True)
    assert config_from_dict(now.to_dict()) == now
    with pytest.raises(ValueError, match="version 3"):
        torchq.GPTQ(INT4, version=3)


def test_awq_version_1_dicts_keep_their_meaning():
    """Version 2 added ``next_inputs`` (default ``"auto"``: float outputs feed the next layer
    unless a data-driven rounding algorithm is wrapped); a version 1 dict fed rounded ones."""
    v1 = {"type": "awq", "version": 1, "base": INT4.to_dict(), "n_grid": 20, "clip": True, "max_tokens": 2048}
    cfg = config_from_dict(v1)
    assert cfg.version == 2 and cfg.next_inputs == "rounded" and not cfg.feeds_float_outputs
    assert cfg.unfoldable == "act_scale"  # added later with its default: the meaning of a dict without it
    assert torchq.AWQ(INT4).feeds_float_outputs and torchq.AWQ(torchq.HQQ(INT4)).feeds_float_outputs
    assert not torchq.AWQ(torchq.GPTQ(INT4)).feeds_float_outputs
    assert torchq.AWQ(torchq.GPTQ(INT4), next_inputs="float").feeds_float_outputs
    assert not torchq.AWQ(INT4, next_inputs="rounded").feeds_float_outputs
    with pytest.raises(ValueError, match="next_inputs must be one of 'auto', 'rounded', 'float'"):
        torchq.AWQ(INT4, next_inputs="quantized")


def test_autoround_light_preset():
    cfg = torchq.AutoRound(INT4, preset="light")
    assert (cfg.iters, cfg.learning_rate, cfg.preset) == (50, 5e-3, "light")
    assert torchq.AutoRound(INT4, iters=100).learning_rate == pytest.approx(0.01)


@pytest.mark.parametrize(
    "make,base",
    [
        (torchq.SmoothQuant, torchq.int4_weight_only()),
        (torchq.AWQ, torchq.int8_dynamic_activation_int8_weight()),
        (torchq.GPTQ, torchq.int8_dynamic_activation_int8_weight()),
        (torchq.GPTQ, torchq.HQQ(INT4)),
        (torchq.HQQ, None),
    ],
)
def test_invalid_combinations_name_the_valid_ones(make, base):
    with pytest.raises(ValueError, match="valid base configs are") as e:
        make(base)
    for valid in VALID_BASES[make(INT4 if make is not torchq.SmoothQuant else torchq.int8_dynamic_activation_int8_weight()).type_name]:
        assert valid.type_name in str(e.value)


def test_bad_fields():
    with pytest.raises(ValueError, match="damp"):
        torchq.GPTQ(INT4, damp=0)
    with pytest.raises(ValueError, match="alpha"):
        torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), alpha=1.5)
    with pytest.raises(ValueError, match="'auto'"):
        torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), alpha="best")
    with pytest.raises(ValueError, match="preset"):
        torchq.AutoRound(INT4, preset="heavy")
    with pytest.raises(ValueError, match="unfoldable must be one of 'act_scale', 'skip'"):
        torchq.AWQ(INT4, unfoldable="drop")
    with pytest.raises(ValueError, match="unfoldable"):
        torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), unfoldable=None)


class _Tok:
    """Whitespace tokenizer with an HF-like encode()."""

    def encode(self, text, add_special_tokens=False):
        return [hash(w) % 1000 for w in text.split()]


def test_calibration_data_default_text_is_disjoint_from_eval_text():
    from torchq.algorithms.data import calibration_text, pydoc_text
    from torchq.apps.eval import default_text

    calib = calibration_text()
    held = default_text(10**9)
    assert calib and held and calib[-2000:] not in held and held[:2000] not in calib
    # pydoc repeats whole sections under several topics: no passage of the held-out text may
    # be calibration text (before the paragraph filter, 76 of these 516 chunks were)
    chunks = [held[i : i + 300] for i in range(0, len(held) - 300, 300)]
    assert len(chunks) > 400 and not [c for c in chunks if c in calib]
    assert len(calib) > 0.85 * len(pydoc_text()[0])  # only the repeated paragraphs go
    data = torchq.calibration_data(_Tok(), n_samples=16, seq_len=128)
    assert len(data) == 16 and all(d.shape == (1, 128) and d.dtype == torch.long for d in data)
    assert not torch.equal(data[0], data[1])
    assert torch.equal(torch.cat(data), torch.cat(torchq.calibration_data(_Tok(), n_samples=16, seq_len=128)))


def test_calibration_data_texts_and_tensors():
    data = torchq.calibration_data(_Tok(), n_samples=3, seq_len=4, texts=["a b c d e f g h i j"])
    assert [d.shape for d in data] == [(1, 4)] * 3
    ids = [torch.arange(10), torch.arange(5).reshape(1, 5)]
    assert [d.shape for d in torchq.calibration_data(None, n_samples=2, texts=ids)] == [(1, 10), (1, 5)]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        torchq.calibration_data(_Tok(), n_samples=2, seq_len=50, texts=["a b"])
    with pytest.raises(ValueError, match="tokenizer"):
        torchq.calibration_data(None)


def test_calibration_algorithms_need_data():
    model = toy_mlp()
    with pytest.raises(ValueError, match="needs calibration data"):
        torchq.quantize_(model, torchq.GPTQ(INT4))
    with pytest.raises(ValueError, match="calibration is empty"):
        torchq.quantize_(model, torchq.GPTQ(INT4), calibration=[])
    # the plain per-weight path (e.g. quantize-while-loading) refuses too
    from torchq.quantize.handlers import get_handler

    with pytest.raises(ValueError, match="needs calibration data"):
        get_handler(torchq.AWQ(INT4))(torch.randn(8, 64), torchq.AWQ(INT4))


def test_toy_module_report_and_overrides():
    model = toy_mlp()
    calib, _ = correlated_inputs()
    report = torchq.quantize_(model, torchq.GPTQ(INT4), calibration=calib, overrides={"2": torchq.int8_weight_only()})
    assert [(l.name, l.status, l.config) for l in report.layers] == [
        ("0", "quantized", "gptq"),
        ("2", "quantized", "int8_weight_only"),
    ]
    assert isinstance(model[0].weight, torchq.AffineQuantizedTensor)
    assert model[2].weight.scheme == "int8_weight_only"


@pytest.mark.parametrize("true_sequential,paused_fraction", [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_sequential_driver_on_tiny_llama(true_sequential, paused_fraction, monkeypatch):
    from torchq.algorithms import paused_pass

    monkeypatch.setattr(paused_pass, "MEMORY_FRACTION", paused_fraction)
    model, calib, held = tiny_llama()
    layers = model.model.layers
    seen = []
    handles = [l.register_forward_pre_hook(lambda m, a, kw: seen.append(m), with_kwargs=True) for l in layers]
    before = copy.deepcopy(model)
    report = torchq.quantize_(model, torchq.GPTQ(INT4, true_sequential=true_sequential), calibration=calib)
    for h in handles:
        h.remove()
    # every decoder linear calibrated, the tied head rounded to nearest (outside the layers)
    by_name = {l.name: l for l in report.layers}
    assert sum(1 for l in report.layers if l.config == "gptq") == 14
    assert by_name["lm_head"].config == "int4_weight_only" and by_name["lm_head"].status == "tied"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # layer 0 was reached once per item by the capture, then ran for the statistics and for
    # its outputs; the last layer only for the statistics. true_sequential: one pass on the
    # first item to find the stages ([q,k,v], [o], [gate,up], [down]), then per item either
    # one paused pass that serves every stage and gives the outputs, or (no item paused, the
    # default) one pass per stage and one for the outputs
    if true_sequential:
        passes = 1 if paused_fraction else 5
        assert seen.count(layers[0]) == len(calib) + 1 + passes * len(calib)
        assert seen.count(layers[1]) == 1 + passes * len(calib)
    else:
        assert seen.count(layers[0]) == 3 * len(calib) and seen.count(layers[1]) == len(calib)
    assert set(model.state_dict()) == set(before.state_dict())
    with torch.no_grad():
        out, ref = model(held).logits, before(held).logits
    assert torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()


@pytest.mark.parametrize("kind,kv_heads", [("qwen2", 2), ("mistral", 2), ("phi3", 2), ("phi3", 4)])
def test_every_algorithm_on_the_other_decoder_families(kind, kv_heads):
    """Qwen2 (q/k/v bias), Mistral and Phi-3 (fused qkv_proj / gate_up_proj) through the
    driver: every decoder linear calibrated, the same state_dict keys, outputs near the float
    model's; AWQ and SmoothQuant fold their scales into the previous ops wherever the graph
    allows (act_scale is left only for o_proj under grouped-query attention)."""
    model0, calib, held = tiny_causal_lm(kind, kv_heads)
    keys = set(model0.state_dict())
    with torch.no_grad():
        ref = model0(held).logits
    w8a8 = torchq.int8_dynamic_activation_int8_weight()
    configs = [torchq.GPTQ(INT4), torchq.AWQ(INT4), torchq.AutoRound(INT4, iters=4), torchq.HQQ(INT4), torchq.SmoothQuant(w8a8)]
    for cfg in configs:
        model = copy.deepcopy(model0)
        report = torchq.quantize_(
            model, cfg, calibration=calib if cfg.needs_calibration else None, filter_fn=lambda m, n: n != "lm_head"
        )
        decoder = [l for l in report.layers if l.name.startswith("model.layers.")]
        assert len(decoder) == 2 * (4 if kind == "phi3" else 7)
        assert all(l.config == cfg.type_name and l.status == "quantized" for l in decoder), report.layers
        assert set(model.state_dict()) == keys
        with torch.no_grad():
            err = (model(held).logits - ref).pow(2).mean() / ref.pow(2).mean()
        assert err < (0.001 if cfg.type_name == "smoothquant" else 0.05), (cfg.type_name, float(err))
        if cfg.type_name in ("awq", "smoothquant"):
            with_act_scale = {n.split(".", 3)[-1] for n, m in model.named_modules()
                              if isinstance(m, nn.Linear) and getattr(m.weight, "act_scale", None) is not None}
            assert with_act_scale == ({"self_attn.o_proj"} if kv_heads < 4 else set()), (cfg.type_name, with_act_scale)


def test_capture_stops_at_first_layer():
    model, calib, _ = tiny_llama()
    captured = capture_layer_inputs(model, model.model.layers[0], calib[:2])
    assert len(captured) == 2
    (hidden,), kwargs = captured[0]
    assert hidden.shape == (1, 32, 64) and "position_embeddings" in kwargs


def test_unsupported_transformers_model_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.transformer.h[0].mlp.c_fc = nn.Linear(32, 128)  # so there is a Linear to target
    with pytest.raises(ValueError, match="model.model.layers"):
        torchq.quantize_(model, torchq.GPTQ(INT4), calibration=[torch.randint(0, 64, (1, 8))])


def test_hqq_needs_no_data_and_calibration_is_ignored_with_a_warning(caplog):
    model = toy_mlp()
    report = torchq.quantize_(model, torchq.HQQ(INT4))
    assert all(l.config == "hqq" and l.status == "quantized" for l in report.layers)
    with caplog.at_level("WARNING", logger="torchq"):
        torchq.quantize_(toy_mlp(), INT4, calibration=[torch.randn(4, 64)])
    assert "no layer's config uses it" in caplog.text


@pytest.mark.parametrize(
    "cfg",
    [torchq.AWQ(torchq.GPTQ(torchq.int4_weight_only(group_size=32), act_order=True)), torchq.HQQ(torchq.nf4_weight_only(block_size=32))],
    ids=lambda c: c.type_name,
)
def test_save_pretrained_records_the_algorithm_and_reloads_bit_exact(cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    model, calib, held = tiny_llama()
    torchq.quantize_(model, cfg, calibration=calib if cfg.needs_calibration else None)
    assert model.config.quantization_config.quant_config == cfg
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.quantization_config.quant_config == cfg
    with torch.no_grad():
        assert torch.equal(reloaded(held).logits, model(held).logits)
    assert type(reloaded.model.layers[0].mlp.down_proj.weight) is type(model.model.layers[0].mlp.down_proj.weight)


def test_torchq_config_quantizes_hqq_while_loading_and_refuses_gptq(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, held = tiny_llama()
    model.save_pretrained(tmp_path / "f")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=torchq.TorchqConfig(torchq.HQQ(INT4)))
    assert isinstance(q.model.layers[0].mlp.up_proj.weight, torchq.AffineQuantizedTensor)
    # transformers reports our "needs calibration data" error per weight, then raises its own
    with pytest.raises((ValueError, RuntimeError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=torchq.TorchqConfig(torchq.GPTQ(INT4)))


def test_cli_algorithm_names_build_their_configs():
    from torchq.algorithms.names import ALGORITHM_NAMES, with_algorithm

    for name in ALGORITHM_NAMES:
        cfg = with_algorithm(name, torchq.int8_dynamic_activation_int8_weight() if name == "smoothquant" else INT4)
        assert config_from_json(cfg.to_json()) == cfg
    assert with_algorithm("autoround-light-bf16", INT4) == torchq.AutoRound(INT4, preset="light", compute_dtype="bfloat16")
    assert with_algorithm("autoround-bf16", INT4).compute_dtype == "bfloat16"
    assert with_algorithm("awq+gptq-exportable", INT4) == torchq.AWQ(torchq.GPTQ(INT4), unfoldable="skip")
