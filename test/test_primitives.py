"""Property tests for the affine primitives, packing and per-token activation quantization."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchq.primitives import (
    ZeroPointDomain,
    block_size_for,
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    pack_int4,
    quant_range,
    quantize_affine,
    quantize_per_token_int8,
    quantize_per_token_uint8,
    unpack_int4,
)

SETTINGS = settings(max_examples=40, deadline=None)


def sqnr(ref, other):
    return float(20 * torch.log10(ref.norm() / (ref - other).norm()))


@st.composite
def weights(draw, max_rows=17, groups=(8, 16, 32)):
    g = draw(st.sampled_from(groups))
    n = draw(st.integers(1, max_rows))
    k = g * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * scale
    if draw(st.booleans()):
        w = w + draw(st.floats(-2, 2)) * scale  # shifted distribution: exercises asymmetric ranges
    return w, g


@SETTINGS
@given(
    data=weights(),
    bits=st.integers(2, 8),
    domain=st.sampled_from(list(ZeroPointDomain)),
)
def test_quant_dequant_error_within_half_step(data, bits, domain):
    w, g = data
    symmetric = domain is ZeroPointDomain.NONE
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero = choose_qparams_affine(w, (1, g), qmin, qmax, domain)
    q = quantize_affine(w, (1, g), scale, zero, qmin, qmax, domain)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], w.shape[1] // g)
    deq = dequantize_affine(q, (1, g), scale, zero, domain)
    step = scale.repeat_interleave(g, dim=1)
    # half a step of rounding error, plus fp32 slack; symmetric formats may clip the positive
    # extreme by half a step (s = amax / ((qmax - qmin) / 2)), hence 1 step there.
    bound = step * (1.0 if symmetric else 0.5) * (1 + 1e-4) + 1e-6 * w.abs().amax()
    assert bool(((deq - w).abs() <= bound).all())


@SETTINGS
@given(data=weights(), symmetric=st.booleans())
def test_int8_codes_fit_int8_storage_and_zero_is_exact(data, symmetric):
    w, g = data
    w[:, 0] = 0.0
    domain = ZeroPointDomain.NONE if symmetric else ZeroPointDomain.INT
    out = fake_quantize_affine(w, (1, g), 8, symmetric, domain)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group", "per_token"])
def test_granularities(granularity):
    w = torch.randn(6, 64)
    bs = block_size_for(w.shape, granularity, group_size=16)
    expected_grid = {"per_tensor": (1, 1), "per_channel": (6, 1), "per_group": (6, 4), "per_token": (6, 1)}
    scale, _ = choose_qparams_affine(w, bs, -8, 7, ZeroPointDomain.NONE)
    assert tuple(scale.shape) == expected_grid[granularity]
    assert sqnr(w, fake_quantize_affine(w, bs, 8, True)) > 30


def test_sqnr_floors_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    assert sqnr(w, fake_quantize_affine(w, (1, 1024), 8, True)) > 38  # int8 per-channel
    assert sqnr(w, fake_quantize_affine(w, (1, 128), 4, False)) > 18  # int4 g128
    assert sqnr(w, fake_quantize_affine(w, (1, 128), 4, True)) > 18


def test_float_domain_is_lossless_on_its_own_grid():
    """Weights built as q*s + m (a Q4_1 grid) requantize exactly in the float domain."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (8, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group spans the full code range
    s = torch.rand(8, 2) + 0.1
    m = torch.randn(8, 2)
    w = q * s.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    out = fake_quantize_affine(w, (1, 32), 4, False, ZeroPointDomain.FLOAT)
    torch.testing.assert_close(out, w, rtol=1e-6, atol=1e-6)


def test_constant_and_zero_blocks():
    w = torch.zeros(2, 32)
    w[1] = 3.25
    for domain in ZeroPointDomain:
        sym = domain is ZeroPointDomain.NONE
        out = fake_quantize_affine(w, (1, 32), 4, sym, domain)
        assert torch.equal(out[0], w[0])
        assert torch.allclose(out[1], w[1], rtol=0.07)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad):
    w = torch.randn(4, 32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        choose_qparams_affine(w, (1, 32), 0, 15, ZeroPointDomain.INT)


def test_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        choose_qparams_affine(torch.ones(2, 4, dtype=torch.int32), (1, 4), 0, 15, "int")
    with pytest.raises(ValueError, match="not a multiple of block size"):
        choose_qparams_affine(torch.ones(2, 6), (1, 4), 0, 15, "int")
    with pytest.raises(ValueError, match="bits must be"):
        quant_range(9, True)


@SETTINGS
@given(rows=st.integers(0, 5), k=st.integers(1, 41), seed=st.integers(0, 1000))
def test_pack_unpack_int4_round_trip(rows, k, seed):
    codes = torch.randint(0, 16, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)


def test_pack_int4_nibble_order_is_low_first():
    packed = pack_int4(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x43]]
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16]]))


@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_per_token_int8_spec(m, k, dtype, seed):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    x[0] = 0  # a zero row: scale 0, codes 0
    q, s = quantize_per_token_int8(x)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    assert torch.equal(s, amax / 127)
    assert torch.equal(q[0], torch.zeros(k, dtype=torch.int8))
    safe = torch.where(s == 0, torch.ones_like(s), s)
    assert torch.equal(q, torch.clamp(torch.round(xf / safe), -127, 127).to(torch.int8))
    assert bool(((q.float() * s - xf).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all())


def test_per_token_uint8_spec():
    x = torch.tensor([[-1.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 2.0, 4.0]])
    q, s, zp = quantize_per_token_uint8(x)
    assert q.dtype == torch.uint8
    recon = (q.float() - zp) * s
    assert bool(((recon - x).abs() <= s / 2 + 1e-6).all())
    assert torch.equal(q[1], torch.zeros(3, dtype=torch.uint8)) and float(s[1]) == 0.0
