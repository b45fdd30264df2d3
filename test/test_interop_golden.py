"""Golden files written by AutoAWQ 0.2.9 itself (test/fixtures/make_awq_fixtures.py, versions
in test/fixtures/awq/versions.json): torchq loads its gemm and gemv checkpoints to AutoAWQ's
own dequantized weights and logits, and re-exports them byte for byte."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import torchq

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "awq")
pytestmark = pytest.mark.skipif(not os.path.isdir(HERE), reason="AutoAWQ fixtures not generated")


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(HERE, "autoawq_expected.safetensors"))


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_autoawq_checkpoint_matches_autoawq(version, expected, tmp_path):
    model = torchq.from_pretrained(os.path.join(HERE, version))
    layers = [k for k in expected if k != "logits"]
    assert len(layers) == 14
    for name in layers:
        w = model.get_submodule(name).weight
        assert isinstance(w, torchq.AffineQuantizedTensor) and w.scale.dtype == torch.float16, name
        # AutoAWQ's dequantize_gemm rounds (q - z) * s to fp16; torchq's exact fp32 matches after the cast
        assert torch.equal(w.dequantize(torch.float32).half(), expected[name]), name
    ids = torch.tensor(json.load(open(os.path.join(HERE, "versions.json")))["prompt_ids"])
    with torch.no_grad():
        logits = model(ids).logits
    # AutoAWQ ran the model in fp16 on CPU; torchq runs fp32: close, and the same next tokens
    torch.testing.assert_close(logits, expected["logits"], rtol=0.02, atol=0.02)
    assert torch.equal(logits.argmax(-1), expected["logits"].argmax(-1))
    torchq.save_pretrained(model, tmp_path / "re", f"awq-{version}")
    a, b = load_file(os.path.join(HERE, version, "model.safetensors")), load_file(str(tmp_path / "re" / "model.safetensors"))
    for k, v in a.items():
        if k.endswith(("qweight", "qzeros", "scales")):
            assert torch.equal(b[k], v), k


def test_gemm_and_gemv_files_hold_the_same_weights():
    gemm = torchq.from_pretrained(os.path.join(HERE, "gemm"))
    gemv = torchq.from_pretrained(os.path.join(HERE, "gemv"))
    for (name, a), (_, b) in zip(gemm.named_parameters(), gemv.named_parameters()):
        if isinstance(a, torchq.AffineQuantizedTensor):
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), name


GPTQ = os.path.join(os.path.dirname(HERE), "gptq")


@pytest.mark.skipif(not os.path.isdir(GPTQ), reason="auto-round GPTQ fixture not generated")
def test_autoround_gptq_export_loads_with_v1_zero_points(tmp_path):
    """auto-round 0.16.1's GPTQ export (v1: qzeros hold z - 1) imports onto the weights it
    quantized: within half a scale step on average, where misreading z - 1 as z would put
    every weight a whole step off; torchq's re-export is byte-identical."""
    model = torchq.from_pretrained(GPTQ)
    floats = load_file(os.path.join(GPTQ, "float_weights.safetensors"))
    assert len(floats) == 14
    for name, w_float in floats.items():
        w = model.get_submodule(name).weight
        assert isinstance(w, torchq.AffineQuantizedTensor) and w.zero_point is not None, name
        s = w.scale.float().repeat_interleave(64, dim=1)[:, : w.shape[1]]
        err = ((w_float.float() - w.dequantize(torch.float32)) / s).abs().mean().item()
        err_without_plus_one = ((w_float.float() - (w.dequantize(torch.float32) + s)) / s).abs().mean().item()
        assert err < 0.35 < 0.6 < err_without_plus_one, (name, err, err_without_plus_one)
    torchq.save_pretrained(model, tmp_path / "re", "gptq")
    a, b = load_file(os.path.join(GPTQ, "model.safetensors")), load_file(str(tmp_path / "re" / "model.safetensors"))
    for k, v in a.items():
        if k.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(b[k], v), k


CT = os.path.join(os.path.dirname(HERE), "compressed_tensors")


@pytest.mark.skipif(not os.path.isdir(CT), reason="compressed-tensors fixture not generated")
def test_autoround_compressed_tensors_export_matches_the_library(tmp_path):
    """auto-round's llm_compressor export (pack-quantized, asymmetric g64) imports to exactly
    what the compressed-tensors library decompresses, and re-exports byte for byte."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qcfg = json.load(open(os.path.join(CT, "config.json")))["quantization_config"]
    (group,) = qcfg["config_groups"].values()
    scheme = QuantizationScheme(**group)
    files = load_file(os.path.join(CT, "model.safetensors"))
    model = torchq.from_pretrained(CT)
    names = sorted({k.rsplit(".", 1)[0] for k in files if k.endswith(".weight_packed")})
    assert len(names) == 14
    for name in names:
        local = {k[len(name) + 1 :]: v for k, v in files.items() if k.rsplit(".", 1)[0] == name}
        ref = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        w = model.get_submodule(name).weight
        assert isinstance(w, torchq.AffineQuantizedTensor) and w.zero_point is not None, name
        assert torch.equal(w.dequantize(torch.float32).to(ref.dtype), ref), name
    torchq.save_pretrained(model, tmp_path / "re", "compressed-tensors")
    back = load_file(str(tmp_path / "re" / "model.safetensors"))
    for k, v in files.items():
        if k.rsplit(".", 1)[1].startswith("weight_") and k.rsplit(".", 1)[1] != "weight":
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
