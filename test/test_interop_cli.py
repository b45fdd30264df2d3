"""`torchq convert`: chains of format conversions keep the weights; refusals are clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import torchq  # noqa: E402
from torchq.apps import cli  # noqa: E402

from gguf_fixtures import write_tiny_llama  # noqa: E402


def _logits(model):
    ids = torch.arange(3, 27).reshape(2, 12)
    with torch.no_grad():
        return model(ids).logits


def test_convert_chain_torchq_awq_ct_gptq(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32), filter_fn=lambda m, n: n != "lm_head")
    torchq.save_pretrained(model, tmp_path / "tq", "torchq")
    steps = [("tq", "awq", "awq-gemm"), ("awq", "ct", "compressed-tensors"), ("ct", "gptq", "gptq"), ("gptq", "gemv", "awq-gemv")]
    for src, dst, fmt in steps:
        assert cli.main(["convert", str(tmp_path / src), str(tmp_path / dst), "--format", fmt]) == 0
        assert f"({fmt})" in capsys.readouterr().out
    first = torchq.from_pretrained(str(tmp_path / "awq"))
    last = torchq.from_pretrained(str(tmp_path / "gemv"))
    assert torch.equal(_logits(first), _logits(last))  # fp16 scales from the first step on: nothing changes


def test_convert_gguf_round_trip_and_refusal(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama(str(src))
    assert cli.main(["convert", str(src), str(tmp_path / "out.gguf"), "--format", "gguf"]) == 0
    a, b = torchq.load_gguf(str(src)), torchq.from_pretrained(str(tmp_path / "out.gguf"))
    assert torch.equal(_logits(a), _logits(b))
    # its Q4_1 tensors have a float zero point, which GPTQ cannot hold
    assert cli.main(["convert", str(src), str(tmp_path / "g"), "--format", "gptq"]) == 2
    assert 'zero_point_domain="int"' in capsys.readouterr().err


def test_convert_help():
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])


def test_convert_with_scheme(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama(str(src))
    out = tmp_path / "ct"
    assert cli.main(["convert", str(src), str(out), "--format", "compressed-tensors", "--scheme", "int4", "--group-size", "32"]) == 0
    model = torchq.from_pretrained(str(out))
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, torchq.AffineQuantizedTensor)
    assert cli.main(["convert", str(out), str(tmp_path / "x"), "--format", "gptq", "--scheme", "int4"]) == 2
    assert "already quantized" in capsys.readouterr().err
