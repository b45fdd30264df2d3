"""GPTQ v1/v2 import and export: packed tensors built here from the format description
(independent bit twiddling), imported losslessly, exported back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq.interop.gptq import gptq_config, read_gptq, write_gptq
from torchq.interop.intweight import IntWeight, from_torchq, to_torchq


def _pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """(R, C) unsigned codes -> (R * bits / 32, C) int32: word r holds rows r*p .. r*p+p-1, lowest bits first."""
    p = 32 // bits
    out = np.zeros((q.shape[0] // p, q.shape[1]), dtype=np.uint64)
    for r in range(out.shape[0]):
        for i in range(p):
            out[r] |= q[r * p + i].astype(np.uint64) << np.uint64(i * bits)
    return out.astype(np.uint32).view(np.int32)


def _pack_cols(q: np.ndarray, bits: int) -> np.ndarray:
    return _pack_rows(q.T, bits).T.copy()


def _gptq_case(n, k, g, bits, sym, act_order, version, seed):
    rng = np.random.default_rng(seed)
    groups = -(-k // g)
    top = 2**bits - 1
    q = rng.integers(0, top + 1, size=(n, k))
    if sym:
        z = np.full((n, groups), 2 ** (bits - 1))
    else:
        z = rng.integers(1 if version == "gptq" else 0, top + 1, size=(n, groups))
    s = (rng.uniform(0.001, 0.1, size=(n, groups)) * rng.choice([1, -1], size=(n, groups))).astype(np.float16)
    if act_order:
        order = rng.permutation(k)  # original column order[j] sits at sorted position j
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[order] = np.arange(k) // g
    else:
        g_idx = (np.arange(k) // g).astype(np.int32)
    stored_z = z - 1 if version == "gptq" else z
    tensors = {
        "l.qweight": torch.from_numpy(_pack_rows(q.T.copy(), bits)),
        "l.qzeros": torch.from_numpy(_pack_cols(stored_z.T.copy(), bits)),
        "l.scales": torch.from_numpy(s.T.copy()),
        "l.g_idx": torch.from_numpy(g_idx),
    }
    # the format's own formula, in fp32 from the stored ints and fp16 scales
    expected = (q - z[:, g_idx]).astype(np.float32) * s[:, g_idx].astype(np.float32)
    qcfg = {"bits": bits, "group_size": g if g != k else -1, "sym": sym, "desc_act": act_order, "checkpoint_format": version}
    return tensors, qcfg, torch.from_numpy(expected)


@settings(max_examples=40, deadline=None)
@given(
    n8=st.integers(1, 4),
    bits=st.sampled_from([4, 8]),
    g=st.sampled_from([16, 32, 64]),
    groups=st.integers(1, 3),
    partial=st.booleans(),
    sym=st.booleans(),
    act_order=st.booleans(),
    version=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**16),
)
def test_gptq_import_lossless_and_export_bit_exact(n8, bits, g, groups, partial, sym, act_order, version, seed):
    n = 8 * n8
    k = g * groups - (8 if partial else 0)
    act_order = act_order and not partial
    tensors, qcfg, expected = _gptq_case(n, k, g, bits, sym, act_order, version, seed)
    w = read_gptq(tensors.__getitem__, "l", qcfg)
    t = to_torchq(w)
    assert isinstance(t, torchq.AffineQuantizedTensor) and tuple(t.shape) == (n, k)
    assert t.scale.dtype == torch.float16
    assert torch.equal(t.dequantize(torch.float32), expected)
    assert (t.perm is not None) == (act_order and not torch.equal(tensors["l.g_idx"].long(), torch.arange(k) // g))
    if sym:
        assert t.zero_point is None
    x = torch.randn(3, k)
    torch.testing.assert_close(torch.nn.functional.linear(x, t), x @ expected.t(), rtol=1e-4, atol=1e-4)
    back = write_gptq(from_torchq(t), "l", qcfg)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype, name
        assert torch.equal(back[name], value), name
    cfg = gptq_config({"l": from_torchq(t)}, version)
    assert cfg["bits"] == bits and cfg["sym"] == sym and cfg["checkpoint_format"] == version
    assert cfg["group_size"] == (-1 if g == k else g)


def test_partial_last_group_576_at_128():
    tensors, qcfg, expected = _gptq_case(16, 576, 128, 4, False, False, "gptq_v2", 1)
    t = to_torchq(read_gptq(tensors.__getitem__, "l", qcfg))
    assert t.padded_in_features == 640 and t.scale.shape == (16, 5)
    assert torch.equal(t.dequantize(torch.float32), expected)
    assert torch.equal(write_gptq(from_torchq(t), "l", qcfg)["l.qweight"], tensors["l.qweight"])


def test_torchq_quantized_weight_exports_and_reimports():
    """A weight quantized by torchq (fp32 scales) exports with fp16 scales; the re-import
    equals torchq's codes with those fp16 scales exactly."""
    lin = torch.nn.Linear(96, 32)
    for sym in (True, False):
        t = torchq.AffineQuantizedTensor.from_float(
            lin.weight, scheme="int4_weight_only", bits=4, group_size=32, symmetric=sym
        )
        back = to_torchq(read_gptq(write_gptq(from_torchq(t), "l", {"bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}).__getitem__, "l", {"bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}))
        assert torch.equal(back.codes(), t.codes())
        assert torch.equal(back.scale, t.scale.half())


def test_v1_cannot_store_zero_point_zero():
    w = IntWeight(torch.zeros(8, 8, dtype=torch.int32), torch.ones(8, 1, dtype=torch.float16),
                  torch.zeros(8, 1, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="gptq_v2"):
        write_gptq(w, "l", {"checkpoint_format": "gptq"})
    write_gptq(w, "l", {"checkpoint_format": "gptq_v2"})


def test_v1_overflowed_zero_is_refused():
    tensors, qcfg, _ = _gptq_case(8, 16, 16, 4, False, False, "gptq", 0)
    tensors["l.qzeros"] = torch.full_like(tensors["l.qzeros"], -1)  # every stored z - 1 = 15
    with pytest.raises(ValueError, match="overflowed"):
        read_gptq(tensors.__getitem__, "l", qcfg)


def test_three_bits_refused_and_float_zero_point_names_config():
    tensors, qcfg, _ = _gptq_case(8, 32, 32, 4, True, False, "gptq", 0)
    with pytest.raises(ValueError, match="2, 4 or 8"):
        read_gptq(tensors.__getitem__, "l", dict(qcfg, bits=3))
    t = torchq.AffineQuantizedTensor.from_float(
        torch.randn(8, 64), scheme="int4_weight_only", bits=4, group_size=32, symmetric=False, zero_point_domain="float"
    )
    with pytest.raises(ValueError, match='zero_point_domain="int"'):
        from_torchq(t)


def test_mismatched_shapes_name_the_problem():
    tensors, qcfg, _ = _gptq_case(8, 64, 32, 4, False, False, "gptq_v2", 0)
    with pytest.raises(ValueError, match="group_size=16"):
        read_gptq(tensors.__getitem__, "l", dict(qcfg, group_size=16))


def test_uneven_act_order_groups_refused():
    tensors, qcfg, _ = _gptq_case(8, 64, 32, 4, False, False, "gptq_v2", 0)
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[:8] = 1  # group 1 has 8 members, group 0 has 56
    tensors["l.g_idx"] = g_idx
    with pytest.raises(ValueError, match="g_idx groups have sizes"):
        to_torchq(read_gptq(tensors.__getitem__, "l", qcfg))


@pytest.mark.parametrize("sym", [True, False])
def test_two_bit_gptq_becomes_intx(sym):
    tensors, qcfg, expected = _gptq_case(16, 64, 32, 2, sym, True, "gptq_v2", 5)
    t = to_torchq(read_gptq(tensors.__getitem__, "l", qcfg))
    assert t.scheme == "intx_weight_only" and t.bits == 2 and t.perm is not None
    assert torch.equal(t.dequantize(torch.float32), expected)
    back = write_gptq(from_torchq(t), "l", qcfg)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
