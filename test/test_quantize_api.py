"""quantize_: report, overrides, filter_fn, tied weights, padding policies, bad input, explain."""

import logging
import re

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import torchq
from torchq import AffineQuantizedTensor


class Tiny(nn.Module):
    """Embedding tied to the head, biased projections, a K that needs padding at group 128."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.up = nn.Linear(64, 96, bias=True)
        self.down = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        return self.head(h + self.down(torch.relu(self.up(h))))


def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


def test_report_and_statuses():
    model = tiny()
    report = torchq.quantize_(model, torchq.int4_weight_only(group_size=64))
    assert_expected_inline(
        str(report),
        """\
torchq.quantize_: 3 linear layers: 1 quantized, 1 padded, 1 tied, 0 skipped
  quantized up  [int4_weight_only]
  padded    down  [int4_weight_only]  (padded K 96->128)
  tied      head  [int4_weight_only]  (shared with embedding 'embed')""",
    )
    assert model.embed.weight is model.head.weight
    assert isinstance(model.embed.weight, AffineQuantizedTensor)
    idx = torch.tensor([[1, 2, 3]])
    logits = model(idx)
    assert logits.shape == (1, 3, 100)


def test_report_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="torchq"):
        torchq.quantize_(tiny(), torchq.int8_weight_only())
    assert "3 linear layers: 2 quantized, 0 padded, 1 tied, 0 skipped" in caplog.text


def test_largest_group_policy():
    model = tiny()
    report = torchq.quantize_(model, torchq.int4_weight_only(group_size=64, pad_policy="largest_group"))
    down = next(r for r in report.layers if r.name == "down")
    assert down.status == "quantized" and down.note == "group 64->32 (K=96)"
    assert model.down.weight.group_size == 32 and model.down.weight.padded_in_features == 96


def test_overrides_and_filter():
    model = tiny()
    report = torchq.quantize_(
        model,
        torchq.int4_weight_only(group_size=32),
        overrides={"head": None, r"u.": torchq.int8_dynamic_activation_int8_weight()},
        filter_fn=lambda mod, name: name != "down",
    )
    status = {r.name: (r.status, r.config, r.note) for r in report.layers}
    assert status == {
        "up": ("quantized", "w8a8", ""),
        "down": ("skipped", "int4_weight_only", "filter_fn"),
        "head": ("skipped", "-", "override None"),
    }
    assert model.up.weight.scheme == "w8a8"
    assert type(model.down.weight) is nn.Parameter and type(model.head.weight) is nn.Parameter


def test_second_call_quantizes_remaining_layers_but_never_twice():
    model = tiny()
    torchq.quantize_(model, torchq.int8_weight_only(), filter_fn=lambda m, n: n == "up")
    with pytest.raises(ValueError, match="layer 'up' is already quantized"):
        torchq.quantize_(model, torchq.int4_weight_only(group_size=32))
    report = torchq.quantize_(model, torchq.int4_weight_only(group_size=32), filter_fn=lambda m, n: n != "up")
    assert [r.name for r in report.layers if r.status != "skipped"] == ["down", "head"]
    assert model.up.weight.scheme == "int8_weight_only" and model.down.weight.scheme == "int4_weight_only"


def test_bias_kept_on_module_and_applied():
    model = tiny()
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model.up(x)
    torchq.quantize_(model, torchq.int8_dynamic_activation_int4_weight(group_size=32))
    assert "up.bias" in model.state_dict() and type(model.up.bias) is nn.Parameter
    y = model.up(x)
    without_bias = torch.nn.functional.linear(x, model.up.weight)
    torch.testing.assert_close(y - without_bias, model.up.bias.expand_as(y), rtol=1e-5, atol=1e-5)
    assert float(20 * torch.log10(ref.norm() / (ref - y).norm())) > 15


def test_shared_weight_between_two_linears_quantized_once():
    a, b = nn.Linear(32, 16), nn.Linear(32, 16)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    report = torchq.quantize_(model, torchq.int8_weight_only())
    assert model[0].weight is model[1].weight
    assert [r.status for r in report.layers] == ["quantized", "tied"]


def test_bad_input():
    with pytest.raises(ValueError, match="group_size must be one of"):
        torchq.int4_weight_only(group_size=48)
    with pytest.raises(ValueError, match="pad_policy"):
        torchq.int4_weight_only(pad_policy="skip")
    model = nn.Sequential(nn.Linear(32, 8))
    model[0].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0': weight has 1 NaN/Inf"):
        torchq.quantize_(model, torchq.int8_weight_only())
    model = nn.Sequential(nn.Linear(32, 8))
    model[0].weight = nn.Parameter(torch.ones(8, 32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="not floating point"):
        torchq.quantize_(model, torchq.int8_weight_only())
    with pytest.raises(TypeError, match="no quantization handler"):
        torchq.quantize_(nn.Sequential(nn.Linear(4, 4)), torchq.QuantConfig())


def test_empty_layer_is_reported_as_skipped(caplog):
    model = nn.Sequential(nn.Linear(32, 0), nn.Linear(32, 8))
    with caplog.at_level(logging.WARNING, logger="torchq"):
        report = torchq.quantize_(model, torchq.int8_weight_only())
    assert [(r.status, r.note) for r in report.layers] == [("skipped", "empty weight (0, 32)"), ("quantized", "")]
    assert "skipping 0: empty weight" in caplog.text


def test_explain_table():
    model = tiny()
    torchq.quantize_(model, torchq.int4_weight_only(group_size=64), overrides={"up": torchq.int8_weight_only()})
    text, host = torchq.explain(model, print_table=False).rsplit("\n", 1)
    # the last line names this CPU's kernel path: the one host-dependent line
    assert re.fullmatch(r"kernel path: (scalar|avx2|avx512|amx); float32 matmul precision: highest", host), host
    assert_expected_inline(
        text,
        """\
layer  kind       scheme            layout           kernel                shape   bytes  arithmetic
-----  ---------  ----------------  ---------------  --------------------  ------  -----  ----------
embed  Embedding  int4_weight_only  cpu_int4_tile16  cpu.int4_weight_only  100x64  3700   fp32      
up     Linear     int8_weight_only  cpu_int8_k16     cpu.int8_weight_only  96x64   6528   fp32      
down   Linear     int4_weight_only  cpu_int4_tile16  cpu.int4_weight_only  64x96   4736   fp32      
head   Linear     int4_weight_only  cpu_int4_tile16  cpu.int4_weight_only  100x64  3700   fp32      
4 quantized modules, 14964 bytes of quantized weights
cpu.int4_weight_only: fp32: activations widened exactly to fp32, fp32 accumulate (M<8 per-group GEMV, else exact dequantize + fp32 GEMM); where the precision rule allows bf16 (bf16/fp16 activations, or fp32 matmul precision 'high'/'medium') and the CPU has bf16 dot products, from M>=32: bf16 products, fp32 accumulate (amx path: oneDNN GEMM on bf16-dequantized weights, bf16 result; avx512-bf16: torchq's bf16 GEMM); never for weights with numerics 'exact' (config exact_fp32=True)
cpu.int8_weight_only: fp32: activations widened exactly to fp32, fp32 accumulate (M<8 per-group GEMV, else exact dequantize + fp32 GEMM); where the precision rule allows bf16 (bf16/fp16 activations, or fp32 matmul precision 'high'/'medium') and the CPU has bf16 dot products, from M>=32: bf16 products, fp32 accumulate (amx path: oneDNN GEMM on bf16-dequantized weights, bf16 result; avx512-bf16: torchq's bf16 GEMM); never for weights with numerics 'exact' (config exact_fp32=True)""",
    )
