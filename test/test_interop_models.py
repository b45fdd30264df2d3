"""Whole-model round trips on a tiny Llama: torchq quantizes, ``save_pretrained`` exports each
format, ``from_pretrained`` re-imports (meta skeleton, lazy reads) with identical logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

import torchq
from torchq.interop.load import detect_source

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _tiny_llama(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _quantized(config, tie=False, head=False):
    model = _tiny_llama(tie)
    torchq.quantize_(model, config, filter_fn=(None if head else (lambda m, n: n != "lm_head")))
    return model


def _logits(model):
    ids = torch.arange(2, 34).reshape(2, 16) % 128
    with torch.no_grad():
        return model(ids).logits


def _weights_fp16(model):
    """The model's quantized weights as AWQ/GPTQ store them (fp16 scales), dequantized."""
    return {
        n: m.weight.dequantize(torch.float32)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and isinstance(m.weight, torchq.AffineQuantizedTensor)
    }


def _files(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


CASES = [
    ("gptq", torchq.int4_weight_only(group_size=32), {}),
    ("gptq", torchq.int4_weight_only(group_size=32, symmetric=True), {"checkpoint_format": "gptq_v2"}),
    ("gptq", torchq.int8_weight_only(), {}),
    ("gptq", torchq.int4_weight_only(group_size=128), {"checkpoint_format": "gptq_v2"}),  # partial last groups
    ("awq-gemm", torchq.int4_weight_only(group_size=32), {}),
    ("awq-gemv", torchq.int4_weight_only(group_size=64), {}),
    ("compressed-tensors", torchq.int4_weight_only(group_size=32), {}),
    ("compressed-tensors", torchq.int4_weight_only(group_size=32, symmetric=True), {}),
    ("compressed-tensors", torchq.int8_dynamic_activation_int8_weight(), {}),
]


@pytest.mark.parametrize("fmt,config,opts", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_export_reimport_identical(tmp_path, fmt, config, opts):
    model = _quantized(config)
    a, b = tmp_path / "a", tmp_path / "b"
    torchq.save_pretrained(model, a, fmt, **opts)
    with open(a / "config.json") as f:
        qcfg = json.load(f)["quantization_config"]
    assert detect_source(str(a)) == {"awq-gemm": "awq", "awq-gemv": "awq"}.get(fmt, fmt)
    loaded = torchq.from_pretrained(str(a))
    # every quantized linear came back quantized, on a torchq kernel, with the same scheme
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and isinstance(m.weight, torchq.AffineQuantizedTensor):
            w = loaded.get_submodule(name).weight
            assert isinstance(w, torchq.AffineQuantizedTensor), name
            k = m.weight.shape[1]  # padding columns of a partial group hold any code
            assert w.scheme == m.weight.scheme and torch.equal(w.codes()[:, :k], m.weight.codes()[:, :k]), name
            scale_dtype = m.weight.scale.dtype if fmt == "compressed-tensors" else torch.float16
            assert torch.equal(w.scale, m.weight.scale.to(scale_dtype)), name
            # the same kernel as the torchq-quantized weight: an import runs at torchq's speed
            assert w.kernel == m.weight.kernel and w.quant_layout == m.weight.quant_layout, name
    assert isinstance(loaded.lm_head.weight, torch.nn.Parameter) and loaded.lm_head.weight.dtype == torch.float32
    # export of the import is byte-identical, and so are the logits of both imports
    torchq.save_pretrained(loaded, b, fmt, **opts)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    with open(b / "config.json") as f:
        assert json.load(f)["quantization_config"] == qcfg
    assert torch.equal(_logits(loaded), _logits(torchq.from_pretrained(str(b))))
    if fmt == "compressed-tensors":  # scales kept as torchq's: the very same model
        assert torch.equal(_logits(loaded), _logits(model))
    else:
        torch.testing.assert_close(_logits(loaded), _logits(model), rtol=2e-2, atol=2e-2)


def test_config_fields_the_loaders_read(tmp_path):
    model = _quantized(torchq.int4_weight_only(group_size=32))
    torchq.save_pretrained(model, tmp_path / "g", "gptq")
    q = json.load(open(tmp_path / "g" / "config.json"))["quantization_config"]
    assert q == json.load(open(tmp_path / "g" / "quantize_config.json"))
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"], q["desc_act"], q["checkpoint_format"]) == (
        "gptq", 4, 32, False, False, "gptq")
    torchq.save_pretrained(model, tmp_path / "w", "awq-gemm")
    q = json.load(open(tmp_path / "w" / "config.json"))["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["zero_point"], q["version"]) == ("awq", 4, 32, True, "gemm")
    torchq.save_pretrained(model, tmp_path / "c", "compressed-tensors")
    q = json.load(open(tmp_path / "c" / "config.json"))["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and q["ignore"] == ["lm_head"]
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32 and not group["weights"]["symmetric"]


def test_sharding_and_tied_quantized_head(tmp_path):
    model = _quantized(torchq.int4_weight_only(group_size=32), tie=True, head=True)
    torchq.save_pretrained(model, tmp_path / "s", "gptq", max_shard_size=20_000)
    names = os.listdir(tmp_path / "s")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert "lm_head.qweight" not in _files(tmp_path / "s")
    loaded = torchq.from_pretrained(str(tmp_path / "s"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # the shared quantized embedding/head is written dequantized: exactly the same values
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.dequantize(torch.float32))


def test_errors_name_the_fix(tmp_path):
    model = _quantized(torchq.int4_weight_only(group_size=32, zero_point_domain="float"))
    with pytest.raises(ValueError, match='zero_point_domain="int"'):
        torchq.save_pretrained(model, tmp_path / "x", "awq-gemm")
    with pytest.raises(ValueError, match="unknown format"):
        torchq.save_pretrained(model, tmp_path / "x", "exl2")
    with pytest.raises(ValueError, match="quantize it first"):
        torchq.save_pretrained(_tiny_llama(), tmp_path / "y", "gptq")
    with pytest.raises(FileNotFoundError, match="config.json"):
        torchq.from_pretrained(str(tmp_path))
    d = tmp_path / "z"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "hqq"}}))
    with pytest.raises(ValueError, match="'hqq' is not supported"):
        torchq.from_pretrained(str(d))


def test_torchq_format_round_trip(tmp_path):
    model = _quantized(torchq.int4_weight_only(group_size=32))
    torchq.save_pretrained(model, tmp_path / "t", "torchq")
    assert detect_source(str(tmp_path / "t")) == "torchq"
    assert torch.equal(_logits(torchq.from_pretrained(str(tmp_path / "t"))), _logits(model))


def test_dtype_and_config_overrides(tmp_path):
    model = _quantized(torchq.int4_weight_only(group_size=32))
    torchq.save_pretrained(model, tmp_path / "g", "gptq")
    bf16 = torchq.from_pretrained(str(tmp_path / "g"), dtype=torch.bfloat16, attn_implementation="eager")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.config._attn_implementation == "eager"
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(bf16).float(), _logits(model), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="CPU only"):
        torchq.from_pretrained(str(tmp_path / "g"), device="cuda")
    with pytest.raises(TypeError, match=r"unknown config overrides \['attn_implementaton'\]"):
        torchq.from_pretrained(str(tmp_path / "g"), attn_implementaton="eager")
