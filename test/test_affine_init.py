"""Initialization on quantized weights: meta skeletons, to_empty, in-place init ops, row writes."""

import pytest
import torch
from torch import nn

import torchq
from torchq.formats import AffineQuantizedTensor

CONFIGS = {
    "int8": torchq.int8_weight_only(),
    "int4_g32": torchq.int4_weight_only(group_size=32),
    "int4_g64_padded": torchq.int4_weight_only(group_size=64),
    "w8a8": torchq.int8_dynamic_activation_int8_weight(),
    "w4a8_sym": torchq.int8_dynamic_activation_int4_weight(group_size=32, symmetric=True),
}


def _model():
    return nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 24))


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_skeleton_to_empty_then_load_is_bit_exact(name):
    torch.manual_seed(0)
    ref = _model()
    torchq.quantize_(ref, CONFIGS[name])
    with torch.device("meta"):
        skeleton = _model()
    report = torchq.quantize_(skeleton, CONFIGS[name])
    assert report.count("skipped") == 0
    assert skeleton[0].weight.device.type == "meta"
    skeleton.to_empty(device="cpu")
    w = skeleton[0].weight
    assert isinstance(w, AffineQuantizedTensor) and w.qdata.device.type == "cpu"
    assert w.format_signature() == ref[0].weight.format_signature()
    skeleton.load_state_dict(ref.state_dict())
    x = torch.randn(5, 96)
    assert torch.equal(skeleton(x), ref(x))


def _like(w, values):
    """What writing ``values`` into ``w`` must give: ``values`` quantized in ``w``'s format."""
    return AffineQuantizedTensor.from_float(
        values, scheme=w.scheme, bits=w.bits, group_size=w.group_size,
        symmetric=w.zero_point_domain == "none", zero_point_domain=w.zero_point_domain,
    ).dequantize()


@pytest.mark.parametrize("name", CONFIGS)
def test_inplace_init_ops_requantize_in_the_same_format(name):
    torch.manual_seed(0)
    lin = nn.Linear(96, 48)
    torchq.quantize_(lin, CONFIGS[name])
    w = lin.weight
    sig = w.format_signature()
    nn.init.normal_(w, 0.0, 0.02, generator=torch.Generator().manual_seed(3))
    assert lin.weight is w and w.format_signature() == sig
    ref = torch.empty(48, 96).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w.dequantize(), _like(w, ref))
    nn.init.uniform_(w, -0.5, 0.25, generator=torch.Generator().manual_seed(4))
    ref = torch.empty(48, 96).uniform_(-0.5, 0.25, generator=torch.Generator().manual_seed(4))
    assert torch.equal(w.dequantize(), _like(w, ref))
    lin.reset_parameters()  # kaiming_uniform_ -> uniform_
    bound = 1 / 96**0.5
    d = w.dequantize()
    assert d.std() > bound / 4 and d.abs().max() < 1.2 * bound
    nn.init.zeros_(w)
    assert torch.count_nonzero(w.dequantize()) == 0
    nn.init.constant_(w, 0.25)
    assert torch.equal(w.dequantize(), _like(w, torch.full((48, 96), 0.25)))
    assert w.format_signature() == sig


def test_row_writes_touch_one_row_and_reads_are_refused():
    torch.manual_seed(0)
    w = AffineQuantizedTensor.from_float(
        torch.randn(20, 64), scheme="int4_weight_only", bits=4, group_size=32, symmetric=False
    )
    before = {k: v.clone() for k, v in w.canonical_tensors().items() if v is not None}
    nn.init.zeros_(w[3])  # what transformers does to an embedding's padding row
    w[-1].copy_(torch.full((64,), 0.5))
    d = w.dequantize()
    assert torch.count_nonzero(d[3]) == 0 and torch.equal(d[19], torch.full((64,), 0.5))
    after = w.canonical_tensors()
    keep = [i for i in range(20) if i not in (3, 19)]
    for k, v in before.items():
        assert torch.equal(after[k][keep], v[keep])
    with pytest.raises(NotImplementedError, match=r"dequantize\(\)\[i\]"):
        _ = w[2] + 1
    with pytest.raises(IndexError):
        w[20]
    with pytest.raises(NotImplementedError, match="input column"):
        w[:, 1]


def test_empty_like_keeps_format_and_moves_device():
    w = AffineQuantizedTensor.from_float(
        torch.randn(8, 64), scheme="w4a8", bits=4, group_size=32, symmetric=False
    )
    e = torch.empty_like(w)
    assert type(e) is AffineQuantizedTensor and e.format_signature() == w.format_signature()
    assert e.qdata.data_ptr() != w.qdata.data_ptr()
    m = torch.empty_like(w, device="meta")
    assert m.qdata.device.type == "meta" and m.shape == w.shape
