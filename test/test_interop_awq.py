"""AutoAWQ gemm/gemv import and export against packed tensors built here from the format
description (AutoAWQ's own packing loops, re-derived independently)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq.interop.awq import awq_config, gemv_zeros_width, read_awq, write_awq
from torchq.interop.intweight import from_torchq, to_torchq

GEMM_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_last(x: np.ndarray, order) -> np.ndarray:
    """(R, C) nibbles -> (R, C/8) int32: slot i of word c holds column 8c + order[i]."""
    out = np.zeros((x.shape[0], x.shape[1] // 8), dtype=np.uint64)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= x[:, 8 * c + order[i]].astype(np.uint64) << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def _awq_case(n, k, g, version, sym, seed):
    rng = np.random.default_rng(seed)
    groups = k // g
    q = rng.integers(0, 16, size=(n, k))
    z = np.full((n, groups), 8) if sym else rng.integers(0, 16, size=(n, groups))
    s = rng.uniform(0.001, 0.1, size=(n, groups)).astype(np.float16)
    if version == "gemm":
        tensors = {
            "l.qweight": _pack_last(q.T.copy(), GEMM_ORDER),
            "l.qzeros": _pack_last(z.T.copy(), GEMM_ORDER),
            "l.scales": s.T.copy(),
        }
    else:
        m = 1 if g >= 128 else {64: 2, 32: 4}[g]
        width = math.ceil(math.ceil(groups / 8) / m) * m
        zp = np.zeros((n, width * 8), dtype=np.int64)
        zp[:, :groups] = z
        sp = np.zeros((n, width * 8), dtype=np.float16)
        sp[:, :groups] = s
        tensors = {"l.qweight": _pack_last(q, range(8)), "l.qzeros": _pack_last(zp, range(8)), "l.scales": sp}
    g_of = np.arange(k) // g
    expected = (q - z[:, g_of]).astype(np.float32) * s[:, g_of].astype(np.float32)
    return {kk: torch.from_numpy(v) for kk, v in tensors.items()}, {"bits": 4, "group_size": g, "version": version}, expected


@settings(max_examples=30, deadline=None)
@given(
    n8=st.integers(1, 4),
    g=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 10),
    version=st.sampled_from(["gemm", "gemv"]),
    sym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_awq_import_lossless_and_export_bit_exact(n8, g, groups, version, sym, seed):
    n, k = 8 * n8, g * groups
    tensors, qcfg, expected = _awq_case(n, k, g, version, sym, seed)
    t = to_torchq(read_awq(tensors.__getitem__, "l", qcfg))
    assert t.scale.dtype == torch.float16 and tuple(t.shape) == (n, k)
    assert torch.equal(t.dequantize(torch.float32), torch.from_numpy(expected))
    # AutoAWQ's dequantize_gemm rounds the same product to fp16: equal after the cast
    assert torch.equal(t.dequantize(torch.float32).half(), torch.from_numpy(expected).half())
    back = write_awq(from_torchq(t), "l", qcfg)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    assert awq_config({"l": from_torchq(t)}, version)["group_size"] == (-1 if g == k else g)


def test_gemv_zero_width_rule():
    # W = ceil(ceil(G/8) / m) * m; m = 1 (g >= 128), 2 (64), 4 (32)
    assert gemv_zeros_width(576, 64) == 2  # SmolLM2 hidden at g64: G=9 -> 2 words
    assert gemv_zeros_width(1536, 64) == 4  # G=24 -> 3 -> rounded to 4
    assert gemv_zeros_width(576, 32) == 4  # G=18 -> 3 -> 4
    assert gemv_zeros_width(1024, 128) == 1
    with pytest.raises(ValueError, match="32, 64 and >= 128"):
        gemv_zeros_width(96, 16)


def test_gemm_and_gemv_agree():
    tensors, qcfg, expected = _awq_case(16, 256, 64, "gemm", False, 3)
    w = read_awq(tensors.__getitem__, "l", qcfg)
    gemv = write_awq(w, "l", {"version": "gemv", "group_size": 64})
    assert torch.equal(to_torchq(read_awq(gemv.__getitem__, "l", {"version": "gemv", "group_size": 64})).dequantize(),
                       torch.from_numpy(expected))


def test_awq_refuses_what_it_cannot_hold():
    t8 = torchq.AffineQuantizedTensor.from_float(torch.randn(8, 64), scheme="int8_weight_only", bits=8, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="4-bit"):
        write_awq(from_torchq(t8), "l", {"version": "gemm"})
    t4 = torchq.AffineQuantizedTensor.from_float(torch.randn(8, 72), scheme="int4_weight_only", bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="multiple of group_size"):
        write_awq(from_torchq(t4), "l", {"version": "gemm"})
    with pytest.raises(ValueError, match="version"):
        read_awq({}.__getitem__, "l", {"version": "exllama"})
    tensors, qcfg, _ = _awq_case(8, 128, 64, "gemm", False, 0)
    with pytest.raises(ValueError, match="group_size=32"):
        read_awq(tensors.__getitem__, "l", dict(qcfg, group_size=32))


def test_third_party_awq_decoder_agrees():
    """compressed-tensors' own AutoAWQ-gemm converter (an independent reading of the format)
    turns torchq's AWQ export into the same weights and codes."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(0)
    t = torchq.AffineQuantizedTensor.from_float(torch.randn(24, 256), scheme="int4_weight_only", bits=4, group_size=64, symmetric=False)
    tensors = write_awq(from_torchq(t), "m.l", {"version": "gemm"})
    converted = AutoAWQConverter(group_size=64).process(dict(tensors))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=64))
    local = {k[len("m.l."):]: v for k, v in converted.items()}
    out = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert out.dtype == torch.float16
    c = t.canonical_tensors()
    exact = torchq.AffineQuantizedTensor.from_codes(
        t.codes(), c["scale"].half(), c["zero_point"], outer_shape=(24, 256), outer_dtype=torch.float32,
        scheme="int4_weight_only", bits=4, group_size=64, quant_min=0, quant_max=15, zero_point_domain="int",
    ).dequantize(torch.float32)
    assert torch.equal(out, exact.half())  # the library multiplies in fp16: equal after the same rounding
