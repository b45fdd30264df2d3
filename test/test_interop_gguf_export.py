"""GGUF export: read back by the gguf package's own reader and dequantizer, GGUF -> torchq ->
GGUF keeps every quantized block byte for byte, and formats without a GGUF type are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import torchq  # noqa: E402
from torchq.interop.gguf import GGUFFile, load_gguf  # noqa: E402
from torchq.interop.gguf_export import encode_blocks, save_gguf  # noqa: E402

from gguf_fixtures import write_tiny_llama  # noqa: E402


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_torchq_gguf_keeps_blocks_and_tokenizer(tmp_path, tied):
    src = tmp_path / "src.gguf"
    types = write_tiny_llama(str(src), tied=tied)
    f = GGUFFile(str(src))
    model, _ = f.model()
    out = tmp_path / "out.gguf"
    save_gguf(model, out, tokenizer=f.tokenizer())
    a, b = _tensors(src), _tensors(out)
    assert set(b) == set(a)
    for name, t in a.items():
        if t.tensor_type.name in ("Q4_0", "Q4_1", "Q8_0"):  # kept quantized: the very same bytes
            assert b[name].tensor_type == t.tensor_type, name
            assert np.array_equal(np.asarray(b[name].data), np.asarray(t.data)), name
        else:  # dequantized on import (Q5_0) or float: the same values as F32
            assert b[name].tensor_type.name == "F32", name
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.array_equal(gguf.quants.dequantize(b[name].data, b[name].tensor_type), ref), name
    again = load_gguf(str(out))
    ids = torch.arange(1, 21).reshape(2, 10)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    tok_a, tok_b = f.tokenizer(), GGUFFile(str(out)).tokenizer()
    text = "t tt hello t"
    assert tok_b(text)["input_ids"] == tok_a(text)["input_ids"]
    assert tok_b.eos_token_id == tok_a.eos_token_id


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "config,qtype",
    [
        (torchq.int4_weight_only(group_size=32, zero_point_domain="float"), "Q4_1"),
        (torchq.int4_weight_only(group_size=32, symmetric=True), "Q4_0"),
        (torchq.intx_weight_only(bits=8, group_size=32, symmetric=True), "Q8_0"),
    ],
)
def test_gguf_dequantizer_reads_torchq_export(tmp_path, config, qtype):
    """gguf's dequantizer gives torchq's weights (fp16 scales: the rounding GGUF stores),
    q/k rows in llama.cpp's rotary order."""
    model = _tiny()
    torchq.quantize_(model, config)
    path = tmp_path / "m.gguf"
    save_gguf(model, path)
    tensors = _tensors(path)
    q = model.model.layers[0].self_attn.q_proj.weight
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type.name == qtype
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(64, 64).copy())
    c = q.canonical_tensors()
    fp16 = torchq.AffineQuantizedTensor.from_codes(
        q.codes(), c["scale"].half(), None if c["zero_point"] is None else c["zero_point"].half(),
        outer_shape=(64, 64), outer_dtype=torch.float32, scheme=q.scheme, bits=q.bits, group_size=32,
        quant_min=q.quant_min, quant_max=q.quant_max, zero_point_domain=q.zero_point_domain,
    ).dequantize(torch.float32)
    from torchq.interop.gguf import rotary_row_permutation

    assert torch.equal(got[rotary_row_permutation(64, 4)], fp16)
    # and torchq's own GGUF import rebuilds the same weights
    again = load_gguf(str(path))
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight.dequantize(torch.float32), fp16)


def test_no_lossless_type_names_the_config(tmp_path):
    model = _tiny()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=64))
    with pytest.raises(ValueError, match=r'int4_weight_only\(group_size=32, zero_point_domain="float"\)'):
        save_gguf(model, tmp_path / "x.gguf")
    model = _tiny()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32))  # integer zero point
    with pytest.raises(ValueError, match="'int' zero point"):
        save_gguf(model, tmp_path / "x.gguf")
    w = torchq.AffineQuantizedTensor.from_float(torch.randn(8, 64), scheme="w8a8", bits=8, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="activations"):
        encode_blocks(w)
