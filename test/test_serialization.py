"""Checkpoints: torch.save / weights_only load, safetensors, assign-load into float models, mismatches."""

import copy
import io
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import torchq
from torchq import AffineQuantizedTensor

CONFIGS = {
    "int8": torchq.int8_weight_only(),
    "int8_g32": torchq.int8_weight_only(group_size=32),
    "int4": torchq.int4_weight_only(group_size=32),
    "int4_sym_float": torchq.int4_weight_only(group_size=64, symmetric=True),
    "int4_floatzp": torchq.int4_weight_only(group_size=128, zero_point_domain="float"),
    "int3": torchq.intx_weight_only(bits=3, group_size=32),
    "w8a8": torchq.int8_dynamic_activation_int8_weight(),
    "w4a8": torchq.int8_dynamic_activation_int4_weight(group_size=32),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 96)
        self.proj = nn.Linear(96, 80, bias=True)
        self.out = nn.Linear(80, 50, bias=False)
        self.out.weight = nn.Parameter(torch.randn(50, 80))

    def forward(self, idx):
        return self.out(torch.relu(self.proj(self.embed(idx))))


def float_model():
    torch.manual_seed(0)
    return Net().eval()


IDX = torch.tensor([[1, 4, 9, 16, 25]])


def quantized(cfg):
    m = float_model()
    torchq.quantize_(m, cfg)
    return m


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_save_weights_only_round_trip(name):
    m = quantized(CONFIGS[name])
    y = m(IDX)
    sd = save_load(m.state_dict())
    assert isinstance(sd["proj.weight"], AffineQuantizedTensor)
    # (a) into a model quantized the same way (copy_ path)
    same = quantized(CONFIGS[name])
    same.proj.weight.qdata.zero_()
    same.load_state_dict(sd)
    assert torch.equal(same(IDX), y)
    # (b) into a fresh float model with assign=True
    fresh = float_model()
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(IDX), y)
    assert not fresh.proj.weight.requires_grad
    # forward and compile still work after the assign-load
    torch._dynamo.reset()
    compiled = torch.compile(fresh, fullgraph=True)
    torch.testing.assert_close(compiled(IDX), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_safetensors_round_trip(name, tmp_path):
    m = quantized(CONFIGS[name])
    y = m(IDX)
    path = str(tmp_path / "m.safetensors")
    torchq.save_file(m.state_dict(), path, metadata={"note": "hello"})
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["note"] == "hello"
    header = json.loads(meta["torchq"])
    entry = header["entries"]["proj.weight"]
    assert entry["format"] == "torchq.affine" and entry["version"] == 1
    assert "proj.weight::qdata" in keys and "proj.weight::scale" in keys and "proj.bias" in keys
    fresh = float_model()
    fresh.load_state_dict(torchq.load_file(path), assign=True)
    assert torch.equal(fresh(IDX), y)


def test_checkpoint_holds_canonical_packing():
    m = quantized(torchq.int4_weight_only(group_size=32))
    state = m.proj.weight.checkpoint_state()
    assert state["qdata"].dtype == torch.uint8 and state["qdata"].shape == (80, 48)
    assert "quant_layout" not in state and "kernel" not in state
    assert state["scale"].dtype == torch.float32


def test_tied_weights_saved_once_and_restored_tied(tmp_path):
    torch.manual_seed(0)

    class TiedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, idx):
            return self.head(self.embed(idx))

    m = TiedNet()
    torchq.quantize_(m, torchq.int8_weight_only(group_size=32))
    y = m(IDX)
    path = str(tmp_path / "tied.safetensors")
    torchq.save_file(m.state_dict(), path)
    with safe_open(path, "pt") as f:
        assert sum(k.startswith("head.weight::") for k in f.keys()) + sum(k.startswith("embed.weight::") for k in f.keys()) == 2
    sd = torchq.load_file(path)
    assert sd["head.weight"] is sd["embed.weight"]
    fresh = TiedNet()
    fresh.load_state_dict(sd, assign=True)
    # like plain tensors under assign=True, each module gets its own Parameter wrapper, but the
    # quantized data is shared, not duplicated
    assert fresh.head.weight.qdata.data_ptr() == fresh.embed.weight.qdata.data_ptr()
    assert torch.equal(fresh(IDX), y)


def test_mismatched_checkpoints_fail_with_key_and_shapes():
    sd = save_load(quantized(torchq.int4_weight_only(group_size=32)).state_dict())
    other = quantized(torchq.int4_weight_only(group_size=64))
    with pytest.raises(RuntimeError, match=r"proj\.weight.*group_size: 64 vs 32"):
        other.load_state_dict(sd)
    w8 = quantized(torchq.int8_weight_only())
    with pytest.raises(RuntimeError, match=r"proj\.weight.*torch\.Size\(\[80, 96\]\).*scheme: int8_weight_only vs int4_weight_only"):
        w8.load_state_dict(sd)
    bigger = nn.Linear(96, 81)
    torchq.quantize_(bigger, torchq.int4_weight_only(group_size=32))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape torch\.Size\(\[80, 96\]\).*torch\.Size\(\[81, 96\]\)"):
        bigger.load_state_dict({"weight": sd["proj.weight"], "bias": torch.zeros(81)})
    # a float checkpoint into a quantized model, and a quantized one into a float model without assign
    with pytest.raises(RuntimeError, match="proj.weight.*float tensor .* into a AffineQuantizedTensor"):
        quantized(torchq.int4_weight_only(group_size=32)).load_state_dict(float_model().state_dict())
    with pytest.raises(RuntimeError, match="proj.weight.*assign=True"):
        float_model().load_state_dict(sd)


def test_bad_safetensors_files(tmp_path):
    m = quantized(torchq.int4_weight_only(group_size=32))
    flat, header = torchq.formats.serialization.flatten_state_dict(m.state_dict())
    meta = json.loads(header["torchq"])
    meta["entries"]["proj.weight"]["version"] = 99
    with pytest.raises(ValueError, match=r"proj\.weight: torchq affine tensor format version 99 is not supported"):
        torchq.formats.serialization.unflatten_state_dict(flat, {"torchq": json.dumps(meta)})
    flat2 = dict(flat)
    flat2["proj.weight::scale"] = flat2["proj.weight::scale"][:, :1]
    with pytest.raises(torchq.CheckpointError, match=r"proj\.weight::scale: data does not match its checksum"):
        torchq.formats.serialization.unflatten_state_dict(flat2, header)
    old_style = json.loads(header["torchq"])
    del old_style["crc32"], old_style["crc32_complete"]  # a file written before checksums: shapes still validated
    old_header = {"torchq": json.dumps(old_style)}
    with pytest.raises(torchq.CheckpointError, match=r"proj\.weight: invalid AffineQuantizedTensor: scale shape \(80, 1\) != \(80, 3\)"):
        torchq.formats.serialization.unflatten_state_dict(flat2, old_header)
    del flat2["proj.weight::scale"]
    with pytest.raises(torchq.CheckpointError, match="missing inner tensor 'proj.weight::scale'"):
        torchq.formats.serialization.unflatten_state_dict(flat2, old_header)


def test_deepcopy_and_pickle_of_module():
    m = quantized(torchq.int8_dynamic_activation_int4_weight(group_size=32))
    y = m(IDX)
    assert torch.equal(copy.deepcopy(m)(IDX), y)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(IDX), y)


@pytest.mark.parametrize("config", [torchq.int4_weight_only(group_size=32), torchq.nf4_weight_only()], ids=["affine", "codebook4"])
def test_pickled_names_are_the_checkpoint_formats_not_the_code_layout(tmp_path, config):
    """.pt files name the rebuild function by its v1 path (torchq.tensors.*), whatever
    folder the code lives in now, and load with and without weights_only."""
    import zipfile

    lin = torch.nn.Linear(64, 8)
    torchq.quantize_(lin, config)
    path = tmp_path / "w.pt"
    torch.save({"w": lin.weight}, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"torchq.tensors." in pkl and b"torchq.formats" not in pkl
    for weights_only in (True, False):
        back = torch.load(path, weights_only=weights_only)["w"]
        assert torch.equal(back.dequantize(), lin.weight.dequantize())
