"""4-bit codebook primitives: tables, quantize/dequantize, packing, 8-bit dynamic code,
double quantization; bit-compatibility with bitsandbytes (CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchq.primitives import codebook as C
from torchq.primitives.packing import pack_int4, unpack_int4

bnbf = pytest.importorskip("bitsandbytes.functional")

FORMATS = sorted(C.CODEBOOK_FORMATS)
PROP = settings(deadline=None, max_examples=25)


def test_tables_match_the_format_facts():
    nf4 = C.codebook_values("nf4")
    assert nf4.dtype == torch.float32 and nf4.shape == (16,)
    assert torch.equal(nf4, bnbf.get_4bit_type("nf4", device="cpu"))
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and bool((nf4[1:] > nf4[:-1]).all())
    # bnb variant: bitsandbytes' own table (its C dequantizer returns -0 for code 8: so do we)
    bnb = C.codebook_values("fp4_e2m1_bnb")
    assert torch.equal(bnb, bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.signbit(bnb[8]) and bnb[3] == 1.0 and bnb[1] == torch.tensor(0.0625 / 12)
    e2m1 = C.codebook_values("fp4_e2m1")
    assert e2m1[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(e2m1[8:], -e2m1[:8])
    assert not torch.equal(e2m1 / 6, bnb), "e2m1 and the bnb variant are different tables"


def test_dynamic_map_equals_bitsandbytes_and_is_pinned():
    dm = C.dynamic_map()
    assert torch.equal(dm, bnbf.create_dynamic_map())
    assert dm.shape == (256,) and bool((dm[1:] > dm[:-1]).all())
    # If torch ever builds these values differently, stored double-quantized scales would decode
    # differently: this digest catches it.
    assert C.dynamic_map_digest() == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


@PROP
@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 4),
    block=st.sampled_from([32, 64, 128]),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
)
def test_codes_are_the_nearest_table_entry(rows, blocks, block, fmt, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, blocks * block, generator=g) * scale
    w[0, :3] = 0.0  # exact zeros
    codes, s = C.quantize_codebook(w, block, fmt)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    cb = C.get_codebook(fmt)
    absmax = w.reshape(rows, blocks, block).abs().amax(-1)
    torch.testing.assert_close(s, absmax / cb.vmax, rtol=0, atol=0)
    table = C.codebook_values(fmt).double()
    v = (w.double().reshape(rows, blocks, block) / s.double().unsqueeze(-1)).reshape(rows, -1)
    dist = (v.unsqueeze(-1) - table).abs()
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.min(-1).values + 1e-6).all())
    # error bound per block: half the largest gap between neighbouring table entries, times the scale
    deq = C.dequantize_codebook(codes, s, block, fmt)
    gap = table.sort().values.diff().max().item() / 2
    err = (deq - w).abs().reshape(rows, blocks, block).amax(-1)
    assert bool((err <= gap * s * (1 + 1e-6) + 1e-30).all())
    # a block's absmax element is exact (e2m1: up to the rounding of absmax / 6)
    top = deq.abs().reshape(rows, blocks, block).amax(-1)
    if cb.vmax == 1.0:
        assert torch.equal(top, absmax)
    else:
        torch.testing.assert_close(top, absmax, rtol=3e-7, atol=0)


def test_e2m1_rounds_half_to_even_and_keeps_zero_positive():
    # scale = 1 (absmax 6): inputs exactly on midpoints
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0, 0.0, -1e-6, 1e-6, -6.0] * 2])
    codes, s = C.quantize_codebook(x, 32, "fp4_e2m1")
    deq = C.dequantize_codebook(codes, s, 32, "fp4_e2m1")[0, :16]
    assert deq.tolist() == [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -2, -4, 0, 0, 0, -6]
    assert int(codes[0, 12]) == 0 and int(codes[0, 13]) == 0  # +0 code, never -0


def test_e2m1_values_round_trip_exactly():
    table = C.codebook_values("fp4_e2m1")
    q = torch.randint(0, 16, (4, 64))
    q[:, 0] = 7  # 6.0: absmax of each block is 6 * scale
    q[:, 32] = 15
    w = table[q] * 0.125
    codes, s = C.quantize_codebook(w, 32, "fp4_e2m1")
    assert torch.equal(C.dequantize_codebook(codes, s, 32, "fp4_e2m1"), w)
    assert torch.equal(s, torch.full((4, 2), 0.125))


@PROP
@given(rows=st.integers(1, 4), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_packing_round_trip_and_nibble_orders(rows, k, seed):
    codes = torch.randint(0, 16, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = C.pack_codes(codes)
    assert packed.shape == (rows, (k + 1) // 2)
    assert torch.equal(C.unpack_codes(packed, k), codes)
    # canonical: element 0 in the low nibble; bitsandbytes: element 0 in the high nibble
    assert int(packed[0, 0]) & 0xF == int(codes[0, 0])
    bnb = C.swap_nibbles(packed)
    assert int(bnb[0, 0]) >> 4 == int(codes[0, 0])
    assert torch.equal(C.swap_nibbles(bnb), packed)
    assert torch.equal(pack_int4(codes), packed) and torch.equal(unpack_int4(packed, k), codes)


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(1, 1200),
    kind=st.sampled_from(["normal", "centered", "grid", "code_values", "zeros"]),
    seed=st.integers(0, 2**16),
)
def test_dynamic_blockwise_quantization_equals_bitsandbytes(n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "centered":  # what double quantization sees: absmax - mean
        x = x.abs() * 0.01
        x = x - x.mean()
    elif kind == "grid":  # many ties on the lookup grid
        x = torch.round(x * 50) / 50
    elif kind == "code_values":
        x = C.dynamic_map()[torch.randint(0, 256, (n,), generator=g)] * 3.0
    elif kind == "zeros":
        x = torch.zeros(n)
        x[-1:] = 0.5  # one non-zero block at most
        if n > 256:
            x[256:] = 0.0
    q, state = bnbf.quantize_blockwise(x, blocksize=256)
    mq, mabsmax = C.quantize_blockwise_dynamic(x)
    assert torch.equal(mq, q)
    assert torch.equal(mabsmax, state.absmax)
    ref = bnbf.dequantize_blockwise(q, state)
    assert torch.equal(C.dequantize_blockwise_dynamic(mq, mabsmax), ref)


def test_double_quantization_matches_qlora_and_is_close():
    torch.manual_seed(0)
    scale = torch.rand(37, 11) * 0.1 + 0.01
    q, absmax2, offset = C.double_quantize_scales(scale)
    assert q.dtype == torch.uint8 and q.shape == scale.shape
    assert absmax2.shape == (2,) and offset.shape == (1,)
    assert torch.equal(offset, scale.reshape(-1).mean().reshape(1))
    back = C.double_dequantize_scales(q, absmax2, offset)
    assert back.shape == scale.shape
    # each scale is off by at most half the dynamic code's largest gap times its block's absmax
    half_gap = C.dynamic_map().diff().max() / 2
    centered = (scale.reshape(-1) - offset).abs()
    err = (back - scale).abs().reshape(-1)
    for b in range(2):
        sl = slice(256 * b, 256 * (b + 1))
        assert torch.equal(absmax2[b], centered[sl].max())
        assert float(err[sl].max()) <= float(half_gap * absmax2[b]) * (1 + 1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown 4-bit codebook format 'nf3'"):
        C.quantize_codebook(torch.zeros(2, 64), 64, "nf3")
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        C.quantize_codebook(torch.zeros(2, 65), 64, "nf4")
    with pytest.raises(ValueError, match="2-D"):
        C.quantize_codebook(torch.zeros(64), 64, "nf4")
    with pytest.raises(TypeError, match="floating-point"):
        C.quantize_codebook(torch.zeros(2, 64, dtype=torch.int32), 64, "nf4")
    with pytest.raises(TypeError, match="uint8"):
        C.swap_nibbles(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="1-D fp32"):
        C.quantize_blockwise_dynamic(torch.zeros(2, 3))
