"""AutoRound: the block loss goes down, the result is never worse than its starting
(round-to-nearest) point, every rounding base, decoder layers with autograd on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torchq
from torchq.algorithms.autoround import autoround_block
from torchq.algorithms.sequential import Block, capture_layer_inputs

from algorithms_fixtures import correlated_inputs, tiny_llama, toy_mlp


def _toy_block(base, iters=60, lr=None):
    calib, held = correlated_inputs()
    model = toy_mlp()
    block = Block(model, [((x,), {}) for x in calib], {"0": model[0], "2": model[2]}, sequential=False)
    cfg = torchq.AutoRound(base, iters=iters, batch_size=4, lr=lr)
    return model, block, cfg, held


@pytest.mark.parametrize(
    "base",
    [
        torchq.int4_weight_only(group_size=32),
        torchq.int4_weight_only(group_size=32, symmetric=True),
        torchq.int4_weight_only(group_size=32, zero_point_domain="float"),
        torchq.int8_dynamic_activation_int4_weight(group_size=32),
        torchq.nf4_weight_only(block_size=32),
    ],
    ids=lambda c: c.to_json(),
)
def test_block_loss_goes_down(base):
    model, block, cfg, held = _toy_block(base)
    ref = model(held).detach()
    results, losses = autoround_block(block, ["0", "2"], cfg)
    assert len(losses) == cfg.iters
    assert min(losses) < 0.9 * losses[0], (losses[0], min(losses))
    assert sum(losses[-10:]) / 10 < losses[0]
    rtn = copy.deepcopy(model)
    torchq.quantize_(rtn, base)
    for name, (t, note) in results.items():
        model.get_submodule(name).weight = nn.Parameter(t, requires_grad=False)
        assert "autoround" in note
    with torch.no_grad():
        err, err_rtn = (model(held) - ref).pow(2).mean(), (rtn(held) - ref).pow(2).mean()
    assert err < err_rtn, (err, err_rtn)


def test_exported_tensor_matches_trained_fake_quant():
    model, block, cfg, held = _toy_block(torchq.int4_weight_only(group_size=32), iters=20)
    from torchq.algorithms.autoround import RoundingParams
    from torchq.algorithms.grid import grid_for

    w = model[0].weight
    rp = RoundingParams(w, grid_for(cfg.base, w.shape))
    with torch.no_grad():
        rp.v.uniform_(-0.5, 0.5)
        rp.alpha.uniform_(0.6, 1.0)
        rp.beta.uniform_(0.6, 1.0)
    torch.testing.assert_close(rp.tensor(w.dtype).dequantize(), rp.fake().detach(), rtol=0, atol=1e-5)


def test_autoround_on_tiny_llama_with_seqlen():
    model, calib, held = tiny_llama()
    ref = copy.deepcopy(model)
    report = torchq.quantize_(
        model, torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=8, batch_size=2, seqlen=16),
        calibration=calib, filter_fn=lambda m, n: n != "lm_head",
    )
    assert all(l.config == "autoround" for l in report.layers if l.status != "skipped")
    assert all(p.requires_grad for p in model.model.norm.parameters())  # frozen only while training
    with torch.no_grad():
        r = ref(held).logits
        assert (model(held).logits - r).pow(2).mean() < 0.2 * r.pow(2).mean()


def test_float_target_is_the_float_models_layer_output():
    """target="float": layer 1 reads the rounded layer 0's outputs but is fitted to the float
    model's layer-1 output (from float inputs); target="block" fits the float layer 1 on the
    rounded inputs. Layer 0 sees the same inputs either way."""
    from torchq.algorithms import autoround as ar

    model, calib, held = tiny_llama()
    seen = {}
    real = ar.autoround_block

    def spy(block, names, config, act_scales=None, generator=None):
        i = block.meta["index"]
        if i not in seen:
            seen[i] = dict(
                float_targets=[t.clone() for t in block.meta["float_targets"]] if "float_targets" in block.meta else None,
                block=[t.clone() for t in block.run()],
            )
        return real(block, names, config, act_scales, generator)

    ar.autoround_block = spy
    try:
        for target in ("float", "block"):
            seen.clear()
            m = copy.deepcopy(model)
            cfg = torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=4, batch_size=2, target=target)
            torchq.quantize_(m, cfg, calibration=calib, filter_fn=lambda mod, n: n != "lm_head")
            if target == "block":
                assert seen[0]["float_targets"] is None and seen[1]["float_targets"] is None
                continue
            for a, b in zip(seen[0]["float_targets"], seen[0]["block"]):
                torch.testing.assert_close(a, b)
            assert any(not torch.allclose(a, b) for a, b in zip(seen[1]["float_targets"], seen[1]["block"]))
            # the float model's own layer-1 outputs
            outs = []
            h = model.model.layers[1].register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                for ids in calib:
                    model(ids)
            h.remove()
            for a, b in zip(seen[1]["float_targets"], outs):
                torch.testing.assert_close(a, b)
    finally:
        ar.autoround_block = real
    with pytest.raises(ValueError, match="target"):
        torchq.AutoRound(torchq.int4_weight_only(), target="fp32")


def test_float_target_holds_two_hidden_streams(monkeypatch):
    """target="float" carries the float model's stream beside the rounded one, but never
    more than two item-sized hidden streams at once: the float targets replace the float
    inputs as they are made, and after a layer is calibrated its outputs replace its inputs
    (before: three streams during the steps, four between layers; one is 151 MB at
    128 x 512 tokens on SmolLM2)."""
    import gc

    from torchq.algorithms import autoround as ar
    from torchq.algorithms import sequential as seq

    model, calib, _ = tiny_llama(layers=3)
    shape = (1, calib[0].shape[1], model.config.hidden_size)

    def live_streams():  # distinct storages of (1, T, hidden) tensors still alive
        gc.collect()
        return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and o.dim() == 3 and o.shape[1:] == shape[1:]
                    and o.untyped_storage().nbytes() == o[0].numel() * o.element_size()})

    counts = []
    real_run, real_block = seq.Block.run, ar.autoround_block

    def run(self, *args, **kwargs):
        outs = real_run(self, *args, **kwargs)
        counts.append(live_streams())
        return outs

    def block(*args, **kwargs):
        counts.append(live_streams())
        return real_block(*args, **kwargs)

    monkeypatch.setattr(seq.Block, "run", run)
    monkeypatch.setattr(ar, "autoround_block", block)
    cfg = torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=2, batch_size=2)
    torchq.quantize_(model, cfg, calibration=calib, filter_fn=lambda mod, n: n != "lm_head")
    assert len(counts) >= 8 and max(counts) == 2 * len(calib), counts


def test_captured_inputs_hold_what_the_items_share_once():
    """Every item's rotary tables and positions equal the first item's: the captured inputs
    hold them once (33 MB for all items at 128 x 512 tokens on SmolLM2). The hidden states stay
    each item's own, and an argument that differs stays the item's."""
    model, calib, _ = tiny_llama(layers=1)
    inputs = capture_layer_inputs(model, model.model.layers[0], calib)
    (args0, kw0), rest = inputs[0], inputs[1:]
    for args, kw in rest:
        assert kw["position_embeddings"][0] is kw0["position_embeddings"][0]
        assert kw["position_embeddings"][1] is kw0["position_embeddings"][1]
        assert kw["position_ids"] is kw0["position_ids"]
        assert args[0] is not args0[0] and not torch.equal(args[0], args0[0])
    shorter = capture_layer_inputs(model, model.model.layers[0], [calib[0], calib[1][:, :16]])
    assert shorter[1][1]["position_ids"].shape[-1] == 16


def test_bf16_streams_are_stored_in_bf16_and_read_back_in_the_models_dtype(monkeypatch):
    """stream_dtype="bfloat16": every hidden stream the driver holds (the rounded inputs, the
    float targets, each pass's outputs) is bf16, half the bytes, while every decoder layer
    still computes on fp32 inputs. The losses start near where fp32 streams start (bf16
    rounding only: +10 % on this toy, whose layer errors are near bf16's resolution) and go
    down about as far."""
    from torchq.algorithms import autoround as ar
    from torchq.algorithms import sequential as seq

    held, seen, losses = [], [], {}
    real_block = ar.autoround_block

    def block(blk, *args, **kwargs):
        held.extend(a[0].dtype for a, _ in blk.inputs)
        held.extend(t.dtype for t in blk.meta["float_targets"])
        results, run = real_block(blk, *args, **kwargs)
        losses.setdefault(blk.stream_dtype, []).append(run)
        return results, run

    monkeypatch.setattr(ar, "autoround_block", block)
    base = torchq.int4_weight_only(group_size=32)
    for streams in ("float32", "bfloat16"):
        model, calib, _ = tiny_llama(layers=3)
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a or (kw["hidden_states"],))[0].dtype),
                                            with_kwargs=True)
        cfg = torchq.AutoRound(base, iters=20, batch_size=2, stream_dtype=streams)
        outs = []
        real_run = seq.Block.run
        monkeypatch.setattr(seq.Block, "run", lambda self, *a, **k: outs.extend(real_run(self, *a, **k)) or outs[-len(self.inputs):])
        torchq.quantize_(model, cfg, calibration=calib, filter_fn=lambda mod, n: n != "lm_head")
        monkeypatch.setattr(seq.Block, "run", real_run)
        if streams == "bfloat16":
            assert held[-24:] == [torch.bfloat16] * 24 and {o.dtype for o in outs} == {torch.bfloat16}
    assert set(seen) == {torch.float32}
    fp32, bf16 = losses[None], losses[torch.bfloat16]
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert abs(b[0] - a[0]) <= 0.2 * a[0], (a[0], b[0])  # bf16 rounding of inputs and targets
        assert min(b) < 0.9 * b[0] and min(b) <= 1.2 * min(a), (b, a)


def test_one_stream_dtype_for_all_layers():
    """The driver keeps one stream for every layer: configs that ask for different stream
    dtypes raise, naming the field; AWQ around a bf16-stream AutoRound runs on bf16 streams."""
    base = torchq.int4_weight_only(group_size=32)
    model, calib, _ = tiny_llama(layers=2)
    cfg = torchq.AutoRound(base, iters=2, batch_size=2, stream_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"bfloat16 \(autoround\) and float32 \(gptq\).*same stream_dtype"):
        torchq.quantize_(model, cfg, calibration=calib, filter_fn=lambda mod, n: n != "lm_head",
                         overrides={"model.layers.0.mlp.down_proj": torchq.GPTQ(base)})
    with pytest.raises(ValueError, match="stream_dtype must be one of float32, bfloat16"):
        torchq.AutoRound(base, stream_dtype="float16")
    assert torchq.AutoRound(base).stream_dtype == "float32"
    model, calib, held = tiny_llama(layers=2)
    with torch.no_grad():
        ref = model(held).logits
    torchq.quantize_(model, torchq.AWQ(cfg), calibration=calib, filter_fn=lambda mod, n: n != "lm_head")
    with torch.no_grad():
        out = model(held).logits
    assert torch.isfinite(out).all() and (out - ref).norm() < 0.5 * ref.norm()


def test_micro_batches_hold_one_micro_batchs_activations_for_the_same_steps():
    """micro_batch_size: each step's items run forward and backward a few at a time and the
    gradients add up. The layer sees micro-batches, autograd holds a fraction of the
    activations, and the losses and the learned rounding are those of the whole batch (up to
    the order of the sums). None keeps the whole batch; a bad value raises."""
    model, calib, _ = tiny_llama(layers=1)
    layer = model.model.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    inputs = capture_layer_inputs(model, layer, calib)
    runs, batches, saved = {}, {}, {}
    for micro in (None, 1, 3):
        module = copy.deepcopy(layer)
        seen = []
        module.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0]), with_kwargs=True)
        module.register_forward_hook(lambda m, a, o: seen.append(None))
        held = {}  # activation bytes saved for backward by each forward (not the weights)

        def pack(t):
            if seen and seen[-1] is not None and not (t.is_leaf and t.requires_grad):
                held[len(seen)] = held.get(len(seen), 0) + t.numel() * t.element_size()
            return t

        block = Block(module, inputs, {n: module.get_submodule(n) for n in names})
        cfg = torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=6, batch_size=4, micro_batch_size=micro)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results, runs[micro] = autoround_block(block, names, cfg)
        batches[micro] = [b for b in seen[2 * len(inputs):] if b is not None]  # after the targets' pass
        saved[micro] = max(held.values())
        runs[micro] = (runs[micro], {n: t.dequantize() for n, (t, _) in results.items()})
    assert batches == {None: [4] * 6, 1: [1] * 24, 3: [3, 1] * 6}
    assert saved[1] < 0.4 * saved[None] and saved[3] < 0.9 * saved[None], saved
    for micro in (1, 3):  # sums in another order: SignSGD may flip a near-zero gradient's sign on some CPU
        torch.testing.assert_close(torch.tensor(runs[micro][0]), torch.tensor(runs[None][0]), rtol=1e-3, atol=0)
        for n, w in runs[micro][1].items():
            moved = ((w - runs[None][1][n]).abs() > 1e-6).float().mean().item()
            assert moved <= 0.01, (n, moved)  # 0 here (Zen 4, also with ATEN_CPU_CAPABILITY=avx2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
            torchq.AutoRound(torchq.int4_weight_only(group_size=32), micro_batch_size=bad)


def test_decoder_layer_steps_run_as_one_batch_with_the_same_losses():
    """A decoder layer's calibration items share positions and rotary tables: each step runs
    its items as one batch (one forward / backward). The losses equal the item-by-item ones."""
    from torchq.algorithms.autoround import _batchable
    from torchq.algorithms.sequential import capture_layer_inputs

    model, calib, _ = tiny_llama(layers=1)
    layer = model.model.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    inputs = capture_layer_inputs(model, layer, calib)
    cfg = torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=6, batch_size=3)
    runs = {}
    for batched in (True, False):
        module = copy.deepcopy(layer)
        block = Block(module, inputs, {n: module.get_submodule(n) for n in names})
        runs[batched] = autoround_block(block, names, cfg, batch_items=batched)[1]
    assert _batchable([(a, k, t) for (a, k), t in zip(inputs, Block(layer, inputs, {}).run())])
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-4, atol=1e-7)


def test_bf16_compute_runs_the_layer_in_bf16_and_still_learns(monkeypatch):
    """compute_dtype="bfloat16": a decoder layer's products run in bf16 (autocast), the
    losses stay close to the fp32 ones without being equal, and the loss still goes down."""
    from torchq.algorithms import autoround as ar
    from torchq.algorithms.sequential import capture_layer_inputs

    monkeypatch.setattr(ar, "_native_bf16", lambda: True)  # no warning on CPUs without it
    model, calib, _ = tiny_llama(layers=1)
    layer = model.model.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    inputs = capture_layer_inputs(model, layer, calib)
    runs, dtypes = {}, {}
    for compute in ("float32", "bfloat16"):
        module = copy.deepcopy(layer)
        seen = []
        module.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        block = Block(module, inputs, {n: module.get_submodule(n) for n in names})
        cfg = torchq.AutoRound(torchq.int4_weight_only(group_size=32), iters=30, batch_size=3, compute_dtype=compute)
        results, runs[compute] = autoround_block(block, names, cfg)
        dtypes[compute] = seen.count(torch.bfloat16)
        assert all(t.dtype == torch.float32 for t, _ in results.values())
    assert dtypes == {"float32": 0, "bfloat16": 30}  # every step's one batched forward
    fp32, bf16 = torch.tensor(runs["float32"]), torch.tensor(runs["bfloat16"])
    torch.testing.assert_close(bf16[0], fp32[0], rtol=0.05, atol=0)
    assert not torch.equal(bf16, fp32)
    assert bf16.min() < 0.9 * bf16[0], (bf16[0], bf16.min())


def test_bf16_compute_warns_where_the_cpu_has_no_bf16_dot_product(monkeypatch):
    from torchq.algorithms import autoround as ar

    model, block, cfg, _ = _toy_block(torchq.int4_weight_only(group_size=32), iters=2)
    cfg = torchq.AutoRound(cfg.base, iters=2, batch_size=4, compute_dtype="bfloat16")
    monkeypatch.setattr(ar, "_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without a bf16 dot product.*compute_dtype='float32'"):
        autoround_block(block, ["0", "2"], cfg)
    monkeypatch.setattr(ar, "_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autoround_block(block, ["0", "2"], cfg)
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, bfloat16"):
        torchq.AutoRound(cfg.base, compute_dtype="float16")
    assert torchq.AutoRound(cfg.base).compute_dtype == "float32"


def test_seed_draws_the_steps_items():
    """``seed`` picks each step's calibration items: the same seed repeats the run exactly,
    another seed takes another path; 0 is the default; a bad seed raises."""
    base = torchq.int4_weight_only(group_size=32)
    runs = {}
    for seed in (None, 0, 3, 3):
        model, block, _, _ = _toy_block(base)
        cfg = torchq.AutoRound(base, iters=12, batch_size=2) if seed is None else torchq.AutoRound(base, iters=12, batch_size=2, seed=seed)
        runs.setdefault(seed, []).append(autoround_block(block, ["0", "2"], cfg)[1])
    assert runs[None][0] == runs[0][0]
    assert runs[3][0] == runs[3][1]
    assert runs[3][0] != runs[0][0]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            torchq.AutoRound(base, seed=bad)
