"""AWQ and SmoothQuant: scales never raise the layer error, folding keeps the float
function, composition with GPTQ, act_scale where nothing can take the scale."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchq
from torchq.algorithms.awq import _group_out_err, group_hessians, rtn_fake, search_clip, search_scale
from torchq.algorithms.folding import fold_scales, scale_groups
from torchq.algorithms.grid import grid_for

from algorithms_fixtures import correlated_inputs, tiny_causal_lm, tiny_llama

INT4 = torchq.int4_weight_only(group_size=32)


@pytest.mark.parametrize("base", [INT4, torchq.nf4_weight_only(block_size=32), torchq.int8_dynamic_activation_int4_weight(group_size=32)], ids=lambda c: c.type_name)
def test_scaled_layer_error_not_above_unscaled(base):
    calib, _ = correlated_inputs(outliers=True)
    x = torch.cat(calib)
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    s, errs = search_scale([w], x, x.abs().mean(0), base)
    assert min(errs) <= errs[0]  # ratio 0 is s = 1: the unscaled error
    grid = grid_for(base, w.shape)
    ref = x @ w.t()
    unscaled = (x @ grid.rtn(w).t() - ref).pow(2).mean()
    scaled = (x @ (grid.rtn(w * s) / s).t() - ref).pow(2).mean()
    assert scaled <= unscaled and scaled < 0.8 * unscaled, (scaled, unscaled)


def test_clip_search_not_above_plain_min_max():
    calib, _ = correlated_inputs()
    x = torch.cat(calib)[:256]
    torch.manual_seed(1)
    w = torch.randn(32, 64) ** 3
    grid = grid_for(INT4, w.shape)
    ref = x @ w.t()
    plain = (x @ grid.rtn(w).t() - ref).pow(2).sum()
    clipped = (x @ grid.rtn(search_clip(w, x, INT4)).t() - ref).pow(2).sum()
    assert clipped <= plain * 1.0001


@pytest.mark.parametrize("k", [64, 80])  # 80: K padded to the group
def test_search_errors_are_the_output_errors(k):
    """The searches score through ``x^T x`` (whole, or per group): the same numbers as the
    output errors they stand for, computed directly."""
    torch.manual_seed(3)
    x, w = torch.randn(300, k) * torch.rand(k) * 3, torch.randn(24, k)
    _, errs = search_scale([w[:10], w[10:]], x, x.abs().mean(0), INT4, n_grid=4)
    for r, err in enumerate(errs):
        s = x.abs().mean(0).clamp(min=1e-4).pow(r / 4)
        s = s / (s.max() * s.min()).sqrt()
        direct = (x @ (rtn_fake(INT4, w * s) / s).t() - x @ w.t()).pow(2).mean()
        assert err == pytest.approx(float(direct), rel=1e-4)
    grid = grid_for(INT4, w.shape)
    xb = F.pad(x, (0, grid.padded - k)).reshape(300, grid.groups, grid.group)
    d = torch.randn(24, grid.groups, grid.group)
    direct = torch.einsum("tGg,nGg->tnG", xb, d).pow(2).sum(0)
    torch.testing.assert_close(_group_out_err(group_hessians(xb), d), direct, rtol=1e-4, atol=1e-3)


_NORM_FOLDS = {"input_layernorm", "post_attention_layernorm"}


@pytest.mark.parametrize(
    "kind,kv_heads,folded",
    [
        # GQA (4 heads, 2 KV heads): v -> o cannot fold; the norms and up -> down can
        ("llama", 2, _NORM_FOLDS | {"mlp.up_proj"}),
        ("llama", 4, _NORM_FOLDS | {"mlp.up_proj", "self_attn.v_proj"}),
        ("qwen2", 4, _NORM_FOLDS | {"mlp.up_proj", "self_attn.v_proj"}),  # v's bias divided too
        ("mistral", 2, _NORM_FOLDS | {"mlp.up_proj"}),
        # fused projections: into the up half of gate_up_proj, and the v third of qkv_proj
        ("phi3", 2, _NORM_FOLDS | {"mlp.gate_up_proj"}),
        ("phi3", 4, _NORM_FOLDS | {"mlp.gate_up_proj", "self_attn.qkv_proj"}),
    ],
)
def test_folding_keeps_the_float_function(kind, kv_heads, folded):
    model, calib, held = tiny_causal_lm(kind, kv_heads)
    ref = model(held).logits.detach()
    for layer in model.model.layers:
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        groups = scale_groups(layer, names)
        assert {g.prev_name for g in groups if g.prev is not None} == folded
        assert sorted(m for g in groups for m in g.members) == sorted(names)  # every linear once
        for g in groups:
            if g.prev is not None:
                k = layer.get_submodule(g.members[0]).in_features
                fold_scales(layer, g, torch.rand(k) * 3 + 0.2)
    torch.testing.assert_close(model(held).logits.detach(), ref, rtol=1e-4, atol=1e-4)


def test_fused_folds_only_in_the_layer_classes_that_order_their_parts_so():
    """A fused ``gate_up_proj`` in another model may order its halves otherwise: no fold there."""
    model, _, _ = tiny_causal_lm("phi3", 4)

    class OtherDecoderLayer(type(model.model.layers[0])):
        pass

    layer = model.model.layers[0]
    layer.__class__ = OtherDecoderLayer
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    assert {g.prev_name for g in scale_groups(layer, names) if g.prev is not None} == _NORM_FOLDS


def test_awq_model_keys_error_and_act_scale():
    model, calib, held = tiny_llama()
    ref_model = copy.deepcopy(model)
    rtn_model = copy.deepcopy(model)
    keys = set(model.state_dict())
    report = torchq.quantize_(model, torchq.AWQ(INT4), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    torchq.quantize_(rtn_model, INT4, filter_fn=lambda m, n: n != "lm_head")
    assert set(model.state_dict()) == keys
    notes = {l.name: l.note for l in report.layers}
    assert "folded into input_layernorm" in notes["model.layers.0.self_attn.q_proj"]
    assert "act_scale" in notes["model.layers.0.self_attn.o_proj"]
    assert model.model.layers[0].self_attn.o_proj.weight.act_scale is not None
    assert model.model.layers[0].self_attn.q_proj.weight.act_scale is None
    with torch.no_grad():
        ref = ref_model(held).logits
        err = (model(held).logits - ref).pow(2).mean()
        err_rtn = (rtn_model(held).logits - ref).pow(2).mean()
    assert torch.isfinite(err) and err < 0.2 * ref.pow(2).mean()
    assert err < 1.5 * err_rtn  # a random tiny model: no outliers for AWQ to find, but no harm


@pytest.mark.parametrize(
    "make,fmt",
    [(lambda u: torchq.AWQ(INT4, unfoldable=u), "awq-gemm"),
     (lambda u: torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight(), unfoldable=u), "compressed-tensors")],
    ids=["awq", "smoothquant"],
)
def test_unfoldable_skip_leaves_o_proj_unscaled_so_the_model_exports(make, fmt, tmp_path):
    """Under grouped-query attention no op can take o_proj's scale: by default it is kept as
    act_scale, which the foreign formats cannot hold (the export error names the fix);
    ``unfoldable="skip"`` leaves o_proj unscaled, as AutoAWQ does, folds the rest the same
    way, and the model exports and reloads."""
    model, calib, held = tiny_llama()
    with torch.no_grad():
        ref = model(held).logits
    kept = copy.deepcopy(model)
    report = torchq.quantize_(model, make("skip"), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    torchq.quantize_(kept, make("act_scale"), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    notes = {l.name: l.note for l in report.layers}
    assert "no scale (nothing to fold into; unfoldable='skip')" in notes["model.layers.0.self_attn.o_proj"]
    assert "folded into input_layernorm" in notes["model.layers.0.self_attn.q_proj"]
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert all(m.weight.act_scale is None for m in linears)
    assert kept.model.layers[0].self_attn.o_proj.weight.act_scale is not None
    with pytest.raises(ValueError, match=r"act_scale.*unfoldable='skip'"):
        torchq.save_pretrained(kept, str(tmp_path / "kept"), format=fmt)
    out = torchq.save_pretrained(model, str(tmp_path / "skip"), format=fmt)
    with torch.no_grad():
        got, want = torchq.from_pretrained(out)(held).logits, model(held).logits
    assert (got - want).pow(2).mean() < 1e-6 * want.pow(2).mean()  # fp16 scales on export
    assert (want - ref).pow(2).mean() < 0.2 * ref.pow(2).mean()


@pytest.mark.parametrize("next_inputs", ["float", "rounded"])
def test_awq_next_inputs_feed_float_or_rounded_outputs(monkeypatch, next_inputs):
    """``next_inputs="float"``: every layer is calibrated on the float model's own inputs of
    that layer (its statistics pass's outputs, one pass per layer); ``"rounded"``: on the
    rounded earlier layers' outputs (layer 0 reads the model's own inputs either way)."""
    import torchq.algorithms.awq as awq_mod

    model, calib, held = tiny_llama(layers=3)
    float_model = copy.deepcopy(model)
    float_inputs: list = []
    handles = [l.register_forward_pre_hook(lambda m, a: float_inputs.append(a[0].clone())) for l in float_model.model.layers]
    with torch.no_grad():
        for ids in calib:
            float_model(ids)
    for h in handles:
        h.remove()
    per_layer = [float_inputs[i::3] for i in range(3)]  # items run layer 0, 1, 2 in turn
    seen: list = []
    real = awq_mod.input_stats

    def spy(block, names, *args, **kwargs):
        seen.append([a[0].clone() for a, _ in block.inputs])
        return real(block, names, *args, **kwargs)

    monkeypatch.setattr(awq_mod, "input_stats", spy)
    torchq.quantize_(model, torchq.AWQ(INT4, next_inputs=next_inputs), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    assert len(seen) == 3
    for layer, (got, want) in enumerate(zip(seen, per_layer)):
        same = all(torch.equal(g, w) for g, w in zip(got, want))
        assert same == (layer == 0 or next_inputs == "float"), layer


def test_last_pass_releases_each_input_as_it_runs():
    """``Block.run(release_inputs=True)`` (AWQ's float-fed statistics pass when it is the
    layer's last): the same outputs, each item's hidden states dropped once it has run (its
    positions and masks kept for the next layer), refused while the inputs are still needed."""
    from torchq.algorithms.sequential import Block, capture_layer_inputs

    model, calib, _ = tiny_llama()
    layer = model.model.layers[0]
    inputs = capture_layer_inputs(model, layer, calib)
    want = Block(layer, list(inputs), {}).run()
    block = Block(layer, list(inputs), {})
    with pytest.raises(RuntimeError, match="still needed"):
        block.run(release_inputs=True)
    block.inputs_needed = False
    got = block.run(release_inputs=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and len(got) == len(want)
    assert all(args[0] is None and len(args) == len(a0) and kw is k0 for (args, kw), (a0, k0) in zip(block.inputs, inputs))


def test_freed_memory_goes_back_to_the_os_after_every_layer(monkeypatch):
    """The sequential driver hands the C allocator's free memory back after each decoder
    layer (a layer's float weights and temporaries, which otherwise added up over SmolLM2's
    30 layers: AWQ's own memory +544 MB -> +386 MB), once per layer, after its outputs exist."""
    from torchq.algorithms import sequential

    model, calib, _ = tiny_llama(layers=3)
    trims = []
    monkeypatch.setattr(sequential, "release_free_memory", lambda: trims.append(
        sum(not isinstance(m.weight, nn.Parameter) or type(m.weight.data) is not torch.Tensor
            for m in model.model.modules() if isinstance(m, nn.Linear))))
    torchq.quantize_(model, torchq.AWQ(torchq.int4_weight_only(group_size=32)), calibration=calib,
                     filter_fn=lambda m, n: n != "lm_head")
    assert trims == [7, 14, 21]  # after layer i: its 7 linears and the earlier layers' are quantized


@pytest.mark.parametrize("gptq_part", [r".*self_attn\..*", r".*mlp\..*"])
def test_awq_mixed_with_gptq_in_one_layer(gptq_part):
    """AWQ on part of each layer, GPTQ (by override) on the rest: whichever runs first, the
    float-fed AWQ pass releases the inputs only when it is the layer's last, so a GPTQ group
    after it still reads them; the result matches the float model as closely as RTN."""
    model, calib, held = tiny_llama()
    ref_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    report = torchq.quantize_(model, torchq.AWQ(INT4), calibration=calib, filter_fn=lambda m, n: n != "lm_head",
                              overrides={gptq_part: torchq.GPTQ(INT4)})
    torchq.quantize_(rtn_model, INT4, filter_fn=lambda m, n: n != "lm_head")
    configs = {l.name: l.config for l in report.layers}
    assert configs["model.layers.1.self_attn.q_proj"] == ("gptq" if "attn" in gptq_part else "awq")
    assert configs["model.layers.1.mlp.down_proj"] == ("awq" if "attn" in gptq_part else "gptq")
    with torch.no_grad():
        ref = ref_model(held).logits
        err = (model(held).logits - ref).pow(2).mean()
        err_rtn = (rtn_model(held).logits - ref).pow(2).mean()
    assert torch.isfinite(err) and err < 1.5 * err_rtn


def test_awq_then_gptq_and_codebook():
    model, calib, held = tiny_llama()
    report = torchq.quantize_(model, torchq.AWQ(torchq.GPTQ(INT4)), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    notes = {l.name: l.note for l in report.layers}
    assert "awq" in notes["model.layers.1.mlp.down_proj"] and "gptq" in notes["model.layers.1.mlp.down_proj"]
    assert report.layers[0].config == "awq"
    nf4, calib, held = tiny_llama()
    report = torchq.quantize_(nf4, torchq.AWQ(torchq.nf4_weight_only(block_size=32)), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    notes = {l.name: l.note for l in report.layers}
    assert "no scale" in notes["model.layers.0.self_attn.o_proj"]
    assert isinstance(nf4.model.layers[0].mlp.down_proj.weight, torchq.Codebook4Tensor)


def test_awq_on_a_toy_module_uses_act_scale_and_beats_unscaled():
    calib, held = correlated_inputs(outliers=True)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    ref = lin(held).detach()
    rtn, awq = copy.deepcopy(lin), copy.deepcopy(lin)
    torchq.quantize_(rtn, INT4)
    torchq.quantize_(awq, torchq.AWQ(INT4, clip=False), calibration=calib)
    assert awq.weight.act_scale is not None
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, awq.weight), F.linear(x, awq.weight.dequantize()), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (awq(held) - ref).pow(2).mean() < (rtn(held) - ref).pow(2).mean()


@pytest.mark.parametrize("base", [torchq.int8_dynamic_activation_int8_weight(), torchq.int8_dynamic_activation_int4_weight(group_size=32)], ids=lambda c: c.type_name)
def test_smoothquant_with_outliers_not_worse(base):
    calib, held = correlated_inputs(outliers=True)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    ref = lin(held).detach()
    plain, smooth = copy.deepcopy(lin), copy.deepcopy(lin)
    torchq.quantize_(plain, base)
    report = torchq.quantize_(smooth, torchq.SmoothQuant(base, alpha=0.5), calibration=calib)
    assert "smoothquant" in report.layers[0].note and smooth.weight.act_scale is not None
    with torch.no_grad():
        assert (smooth(held) - ref).pow(2).mean() < (plain(held) - ref).pow(2).mean()


@pytest.mark.parametrize("base", [torchq.int8_dynamic_activation_int8_weight(), torchq.int8_dynamic_activation_int4_weight(group_size=32)], ids=lambda c: c.type_name)
def test_smoothquant_auto_alpha_picks_the_least_error_and_never_worse_than_unsmoothed(base):
    """alpha="auto": the chosen smoothing has the smallest simulated W8A8 / W4A8 error of the
    candidates (no smoothing among them); with outlier channels it smooths, and the layer
    beats plain round-to-nearest on held-out inputs."""
    from torchq.algorithms.smoothquant import AUTO_ALPHAS, search_alpha

    calib, held = correlated_inputs(outliers=True)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.cat([c.reshape(-1, 64) for c in calib])
    s, alpha, errors = search_alpha(x, x.abs().amax(0), [lin.weight], base)
    assert set(errors) == {None, *AUTO_ALPHAS}
    assert errors[alpha] == min(errors.values()) and alpha is not None and errors[alpha] < errors[None]
    ref = lin(held).detach()
    plain, smooth = copy.deepcopy(lin), copy.deepcopy(lin)
    torchq.quantize_(plain, base)
    report = torchq.quantize_(smooth, torchq.SmoothQuant(base, alpha="auto"), calibration=calib)
    assert f"alpha={alpha:g}" in report.layers[0].note
    torch.testing.assert_close(smooth.weight.act_scale, s)
    with torch.no_grad():
        assert (smooth(held) - ref).pow(2).mean() < (plain(held) - ref).pow(2).mean()


def test_smoothquant_folds_into_norms_on_llama():
    model, calib, held = tiny_llama()
    ref = copy.deepcopy(model)
    report = torchq.quantize_(model, torchq.SmoothQuant(torchq.int8_dynamic_activation_int8_weight()), calibration=calib, filter_fn=lambda m, n: n != "lm_head")
    notes = {l.name: l.note for l in report.layers}
    assert "folded into post_attention_layernorm" in notes["model.layers.0.mlp.gate_proj"]
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        r = ref(held).logits
        assert (model(held).logits - r).pow(2).mean() < 0.05 * r.pow(2).mean()
