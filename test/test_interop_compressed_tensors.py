"""compressed-tensors import/export, checked by the compressed-tensors library itself
(its own compressor decompresses torchq's exports, and torchq reads what it compresses)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq.interop.compressed_tensors import read_ct, scheme_for, weight_args, write_ct
from torchq.interop.intweight import from_torchq, to_torchq

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402


def _local(tensors: dict, prefix: str = "l") -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items()}


def _scheme(w, act=None) -> QuantizationScheme:
    args = {k: v for k, v in weight_args(w).items() if v is not None}
    return QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**args), input_activations=QuantizationArgs(**act) if act else None
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(9, 40),  # the library cannot unpack a zero point tensor of one word row (N <= 8)
    groups=st.integers(1, 4),
    g=st.sampled_from([32, 64, 128]),
    bits=st.sampled_from([4, 8]),
    sym=st.booleans(),
    per_channel=st.booleans(),
    fp16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_library_decompresses_torchq_pack_quantized_export(n, groups, g, bits, sym, per_channel, fp16, seed):
    torch.manual_seed(seed)
    k = g * groups
    t = torchq.AffineQuantizedTensor.from_float(
        torch.randn(n, k), scheme="int4_weight_only" if bits == 4 else "int8_weight_only", bits=bits,
        group_size=None if per_channel else g, symmetric=sym,
    )
    w = from_torchq(t, scale_dtype=torch.float16 if fp16 else None)
    tensors = write_ct(w, "l", "pack-quantized")
    out = PackedQuantizationCompressor.decompress(_local(tensors), _scheme(w))
    expected = w.dequantize()  # exact fp32 (q - z) * s
    # the library multiplies in the scale's dtype: equal after the same rounding
    assert torch.equal(out["weight"], expected.to(w.scale.dtype))
    if not fp16:
        assert torch.equal(out["weight"], t.dequantize(torch.float32))
    back = to_torchq(read_ct(tensors.__getitem__, "l", {"weights": weight_args(w)}, "pack-quantized"))
    assert torch.equal(back.codes(), t.codes()) and torch.equal(back.dequantize(torch.float32), expected)
    assert back.scale.dtype == w.scale.dtype


@settings(max_examples=15, deadline=None)
@given(n=st.integers(9, 24), k=st.sampled_from([64, 96, 576]), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_torchq_reads_what_the_library_compresses(n, k, sym, seed):
    """The library packs codes from its own quantize(); torchq's import dequantizes to the
    library's decompression exactly (fp32 scales)."""
    torch.manual_seed(seed)
    g = 32
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=g)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = torch.randn(n, k)
    scale = torch.rand(n, k // g) * 0.2 + 0.01
    state = {"weight": weight, "weight_scale": scale}
    if not sym:
        state["weight_zero_point"] = torch.randint(-8, 8, (n, k // g), dtype=torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    ref = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    get = {f"l.{key}": v for key, v in packed.items()}.__getitem__
    t = to_torchq(read_ct(get, "l", {"weights": args.model_dump()}, "pack-quantized"))
    assert torch.equal(t.dequantize(torch.float32), ref)


def test_int8_w8a8_round_trip_through_the_library():
    lin = torch.nn.Linear(64, 24)
    t = torchq.AffineQuantizedTensor.from_float(lin.weight, scheme="w8a8", bits=8, group_size=None, symmetric=True)
    w = from_torchq(t, schemes=("w8a8",), scale_dtype=None)
    tensors = write_ct(w, "l", "int-quantized")
    assert tensors["l.weight"].dtype == torch.int8 and tensors["l.weight_scale"].shape == (24, 1)
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    out = IntQuantizationCompressor.decompress(_local(tensors), _scheme(w, act))
    assert torch.equal(out["weight"], t.dequantize(torch.float32))
    group = {"weights": weight_args(w), "input_activations": act}
    back = to_torchq(read_ct(tensors.__getitem__, "l", group, "int-quantized"), scheme="w8a8")
    assert back.scheme == "w8a8" and torch.equal(back.codes(), t.codes())


def test_partial_group_and_act_order_refused_with_the_fix():
    t = torchq.AffineQuantizedTensor.from_float(torch.randn(8, 80), scheme="int4_weight_only", bits=4, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="format='gptq'"):
        write_ct(from_torchq(t), "l", "pack-quantized")


def test_targets_and_ignore_follow_the_library_rules():
    qcfg = {
        "ignore": ["lm_head", "re:.*\\.mlp\\.down_proj$"],
        "config_groups": {"g0": {"targets": ["re:.*self_attn.*"]}, "g1": {"targets": ["Linear"]}},
    }
    assert scheme_for("model.layers.0.self_attn.q_proj", ("Linear", "Module"), qcfg) is qcfg["config_groups"]["g0"]
    assert scheme_for("model.layers.0.mlp.up_proj", ("Linear", "Module"), qcfg) is qcfg["config_groups"]["g1"]
    assert scheme_for("model.layers.0.mlp.down_proj", ("Linear", "Module"), qcfg) is None
    assert scheme_for("lm_head", ("Linear", "Module"), qcfg) is None
    assert scheme_for("model.norm", ("LlamaRMSNorm", "Module"), {"config_groups": {"g": {"targets": ["Linear"]}}}) is None


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq-gemm"])
def test_export_config_names_the_architecture(tmp_path, fmt):
    """config.json names the model class, as transformers' save_pretrained writes it: a model built
    from a config (or a GGUF file) has ``architectures=None``, and vLLM then guesses the class from
    ``model_type`` (SmolLM2 resolved to ``LlamaModel``, its embedding-model entry)."""
    import json

    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.architectures is None
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32), filter_fn=lambda m, n: n != "lm_head")
    torchq.save_pretrained(model, str(tmp_path), format=fmt)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    assert type(torchq.from_pretrained(str(tmp_path))).__name__ == "LlamaForCausalLM"
