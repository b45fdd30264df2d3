"""AffineQuantizedTensor: linear numerics for every scheme, tensor ops, repr, errors."""

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from hypothesis import given, settings
from hypothesis import strategies as st

from torchq import AffineQuantizedTensor
from torchq.primitives import fake_quantize_per_token_int8, quantize_per_token_int8

SETTINGS = settings(max_examples=30, deadline=None)

# scheme -> (bits, symmetric choices, grouped)
SCHEMES = {
    "int8_weight_only": (8, [True], True),
    "int4_weight_only": (4, [False, True], True),
    "intx_weight_only": (3, [False, True], True),
    "w8a8": (8, [True], False),
    "w4a8": (4, [False, True], True),
}


def make(w, scheme, group_size=32, symmetric=None, domain=None):
    bits, syms, grouped = SCHEMES[scheme]
    sym = syms[0] if symmetric is None else symmetric
    return AffineQuantizedTensor.from_float(
        w, scheme=scheme, bits=bits, group_size=group_size if grouped else None, symmetric=sym,
        zero_point_domain=domain,
    )


def expected_linear(x, qw, bias):
    """F.linear with the dequantized weight (and fake-quantized activations for dynamic schemes)."""
    xf = x.float()
    if qw.scheme in ("w8a8", "w4a8"):
        xf = fake_quantize_per_token_int8(qw.prepare_input(x)).reshape(-1, qw.padded_in_features)
        w = qw.dequantize_stored(torch.float32)
    else:
        w = qw.dequantize(torch.float32)
    y = F.linear(xf.reshape(-1, xf.shape[-1]), w, None if bias is None else bias.float())
    return y.reshape(*x.shape[:-1], qw.shape[0])


@SETTINGS
@given(
    scheme=st.sampled_from(sorted(SCHEMES)),
    m=st.integers(1, 9),
    k=st.integers(1, 150),
    n=st.integers(1, 40),
    group=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    symmetric=st.booleans(),
    float_zero=st.booleans(),
    lead=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 10_000),
)
def test_linear_matches_dequantized(scheme, m, k, n, group, dtype, with_bias, symmetric, float_zero, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    _, syms, _ = SCHEMES[scheme]
    sym = symmetric if symmetric in syms else syms[0]
    domain = None if sym else ("float" if float_zero else "int")
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    qw = make(w, scheme, group, sym, domain)
    y = F.linear(x, qw, bias)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    ref = expected_linear(x, qw, bias)
    tol = dict(rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.float(), ref, **tol)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_sqnr_of_linear(scheme):
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    x = torch.randn(8, 512)
    y = F.linear(x, make(w, scheme, 128))
    ref = F.linear(x, w)
    floor = {"int8_weight_only": 38, "w8a8": 33, "int4_weight_only": 18, "w4a8": 17, "intx_weight_only": 12}[scheme]
    assert float(20 * torch.log10(ref.norm() / (ref - y).norm())) > floor


def test_padding_is_exact_for_real_columns():
    torch.manual_seed(0)
    w = torch.randn(16, 576)
    qw = make(w, "int4_weight_only", 128)
    assert qw.padded_in_features == 640 and qw.shape == (16, 576)
    assert qw.dequantize().shape == (16, 576)
    # the padded tail group is quantized over the real values only: same error as unpadded
    err = (qw.dequantize() - w).abs().amax(dim=1)
    step = qw.canonical_tensors()["scale"].amax(dim=1)  # inner tensors may be in a kernel layout
    assert bool((err <= step * 0.5 + 1e-5).all())


def test_w8a8_exact_integer_accumulation():
    """The reference equals int32 GEMM of the codes times the two scales."""
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    x = torch.randn(5, 96)
    qw = make(w, "w8a8")
    xq, xs = quantize_per_token_int8(x)
    acc = xq.to(torch.int64) @ qw.codes().to(torch.int64).T
    expected = acc.double() * xs.double() * qw.scale.double().T
    torch.testing.assert_close(F.linear(x, qw).double(), expected, rtol=1e-5, atol=1e-5)


def test_act_scale_and_perm_are_honoured():
    """The reserved act_scale / perm fields: y = (x / act_scale) @ W_stored^T with permuted columns."""
    torch.manual_seed(0)
    n, k = 8, 64
    w = torch.randn(n, k)
    act_scale = torch.rand(k) + 0.5
    perm = torch.randperm(k)
    stored = (w * act_scale)[:, perm]
    base = make(stored, "int4_weight_only", 32)
    c = base.canonical_tensors()
    qw = AffineQuantizedTensor.from_codes(
        base.codes(), c["scale"], c["zero_point"], outer_shape=(n, k), outer_dtype=torch.float32,
        scheme="int4_weight_only", bits=4, group_size=32, quant_min=0, quant_max=15, zero_point_domain="int",
        act_scale=act_scale, perm=perm,
    )
    x = torch.randn(3, k)
    torch.testing.assert_close(F.linear(x, qw), F.linear(x, qw.dequantize()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qw.dequantize(), w, rtol=0, atol=float(base.scale.max() / act_scale.min()))
    dyn = AffineQuantizedTensor.from_codes(
        base.codes(), c["scale"], c["zero_point"], outer_shape=(n, k), outer_dtype=torch.float32,
        scheme="w4a8", bits=4, group_size=32, quant_min=0, quant_max=15, zero_point_domain="int",
        act_scale=act_scale, perm=perm,
    )
    torch.testing.assert_close(F.linear(x, dyn), expected_linear(x, dyn, None), rtol=1e-4, atol=1e-4)


def test_ops_detach_clone_to_copy():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    qw = make(w, "int4_weight_only", 32)
    x = torch.randn(2, 64)
    y = F.linear(x, qw)
    for t in (qw.detach(), qw.clone(), qw.to("cpu")):
        assert type(t) is AffineQuantizedTensor
        assert torch.equal(F.linear(x, t), y)
    clone = qw.clone()
    assert clone.qdata.data_ptr() != qw.qdata.data_ptr()
    bf = qw.to(torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.scale.dtype == torch.float32  # scales never silently bf16
    other = make(torch.randn(8, 64), "int4_weight_only", 32)
    other.copy_(qw)
    assert torch.equal(F.linear(x, other), y)
    with pytest.raises(ValueError, match="group_size: 32 vs 64"):
        make(torch.randn(8, 64), "int4_weight_only", 32).copy_(make(w, "int4_weight_only", 64))
    with pytest.raises(TypeError, match="float tensor"):
        qw.copy_(w)


def test_slicing_rows_and_groups():
    torch.manual_seed(0)
    w = torch.randn(12, 96)
    for scheme in ("int4_weight_only", "int8_weight_only", "w4a8"):
        qw = make(w, scheme, 32)
        full = qw.dequantize()
        assert torch.equal(qw[2:7].dequantize(), full[2:7])
        assert torch.equal(qw[:, 32:96].dequantize(), full[:, 32:96])
        assert torch.equal(qw.narrow(0, 1, 4).dequantize(), full[1:5])
        with pytest.raises(ValueError, match="whole groups"):
            qw[:, 5:40]
    padded = make(torch.randn(4, 70), "int4_weight_only", 32)
    assert torch.equal(padded[:, 64:].dequantize(), padded.dequantize()[:, 64:])


def test_embedding_lookup_matches_dequantized_rows():
    torch.manual_seed(0)
    w = torch.randn(50, 40)
    qw = make(w, "int4_weight_only", 32)
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    out = F.embedding(idx, qw)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out, qw.dequantize()[idx])
    emb = torch.nn.Embedding(50, 40)
    emb.weight = torch.nn.Parameter(qw, requires_grad=False)
    assert torch.equal(emb(idx), out)


def test_unknown_ops_raise_with_op_and_class():
    qw = make(torch.randn(4, 32), "int8_weight_only")
    with pytest.raises(NotImplementedError, match=r"AffineQuantizedTensor does not support aten\.add"):
        qw + 1
    with pytest.raises(NotImplementedError, match=r"AffineQuantizedTensor does not support aten\.mul"):
        torch.mul(qw, 2)


def test_parameter_wrapping_keeps_it_frozen():
    qw = make(torch.randn(4, 32), "int8_weight_only")
    p = torch.nn.Parameter(qw)  # requires_grad=True by default: ignored for quantized weights
    assert isinstance(p, AffineQuantizedTensor) and not p.requires_grad


def test_repr():
    qw = make(torch.randn(16, 100), "int4_weight_only", 64)
    assert_expected_inline(
        repr(qw),
        """AffineQuantizedTensor(shape=(16, 100), dtype=torch.float32, scheme=int4_weight_only, bits=4, group_size=64, range=[0, 15], zero_point=int, padded_in_features=128, layout=cpu_int4_tile16, kernel=cpu.int4_weight_only)""",
    )
    qw8 = make(torch.randn(8, 64), "w8a8")
    assert_expected_inline(
        repr(qw8),
        """AffineQuantizedTensor(shape=(8, 64), dtype=torch.float32, scheme=w8a8, bits=8, group_size=64, range=[-127, 127], zero_point=none, layout=cpu_int8_k4x16, kernel=cpu.w8a8)""",
    )


def test_invalid_construction():
    with pytest.raises(TypeError, match="floating-point"):
        make(torch.ones(4, 32, dtype=torch.int64), "int8_weight_only")
    with pytest.raises(ValueError, match="empty weight"):
        make(torch.randn(0, 32), "int8_weight_only")
    with pytest.raises(ValueError, match="NaN/Inf"):
        make(torch.full((2, 32), float("nan")), "int4_weight_only")
    with pytest.raises(ValueError, match="unknown scheme"):
        AffineQuantizedTensor.from_float(torch.randn(2, 32), scheme="int3", bits=3, group_size=32, symmetric=True)
    with pytest.raises(RuntimeError, match="expects 32"):
        F.linear(torch.randn(2, 31), make(torch.randn(4, 32), "int8_weight_only"))


def test_zero_rows_quantize_to_exact_zeros():
    w = torch.randn(6, 64)
    w[2] = 0
    for scheme in SCHEMES:
        qw = make(w, scheme)
        assert torch.equal(qw.dequantize()[2], torch.zeros(64))


def test_aten_mm_addmm_paths_run_the_same_kernel():
    """x @ w.t(), x @ w.T and addmm(bias, x, w.t()) equal F.linear (the aten path under compile)."""
    torch.manual_seed(0)
    qw = make(torch.randn(16, 64), "w4a8", 32)
    x = torch.randn(2, 3, 64)
    b = torch.randn(16)
    y = F.linear(x, qw, b)
    assert torch.equal(x @ qw.t() + b, y)
    assert torch.equal(torch.matmul(x, qw.T) + b, y)
    assert torch.equal(torch.addmm(b, x[0], qw.t()), F.linear(x[0], qw, b))
    assert type(qw.t().t()) is AffineQuantizedTensor
    with pytest.raises(NotImplementedError, match="right operand of mm"):
        qw.t() @ torch.randn(16, 2)
    with pytest.raises(NotImplementedError, match="alpha = beta = 1"):
        torch.addmm(b, x[0], qw.t(), beta=2)


def test_kernel_is_reselected_after_a_device_change():
    """A weight built on meta (skeleton models) must not keep a kernel picked for meta."""
    from torchq.formats import dispatch as registry
    from torchq.formats.affine.reference import weight_only_reference

    name = "test_meta_only.int8_weight_only"
    registry.register_kernel(
        registry.LinearKernel(name, "int8_weight_only", "plain_int8", weight_only_reference, priority=10**6,
                              accepts=lambda t: t.qdata.device.type == "meta")
    )
    try:
        q = AffineQuantizedTensor.from_float(torch.randn(8, 64, device="meta"), scheme="int8_weight_only", bits=8,
                                             group_size=None, symmetric=True)
        assert q.kernel == name
        moved = torch.empty_like(q, device="cpu")
        assert moved.device.type == "cpu" and moved.kernel != name
        assert torch.empty_like(moved).kernel == moved.kernel  # same device: no reselection needed
    finally:
        del registry._KERNELS["int8_weight_only"][name]
        del registry._BY_NAME[name]
