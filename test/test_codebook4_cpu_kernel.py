"""The C++ NF4 / FP4 kernel (torch.ops.torchq.codebook4_linear) against the plain-PyTorch
reference, on every ISA path this CPU runs, GEMV and GEMM paths, all schemes, double
quantization, odd shapes, fp32 / bf16 / fp16 activations, fused bias; plus its layout."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq import Codebook4Tensor
from torchq.kernels import cpu_ext, prefer_kernels
from torchq.formats.affine.reference import weight_only_reference

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="C++ CPU kernels not built")

SCHEMES = ["nf4", "fp4_e2m1", "fp4_e2m1_bnb"]
ISAS = cpu_ext.supported_isas() if cpu_ext.available() else []
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


@contextlib.contextmanager
def gemm_from(m: int):
    """Run the dequantize + GEMM path from ``m`` rows (1: always; 10**6: never)."""
    old = torch.ops.torchq._tune("int4_gemm_min_m", m)
    try:
        yield
    finally:
        torch.ops.torchq._tune("int4_gemm_min_m", old)


@settings(deadline=None, max_examples=40)
@given(
    m=st.sampled_from([1, 2, 3, 4, 5, 9]),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    block=st.sampled_from([32, 64, 128, 256]),
    scheme=st.sampled_from(SCHEMES),
    dq=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    isa=st.sampled_from(ISAS or ["scalar"]),
    path=st.sampled_from(["gemv", "gemm"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(m, n, k, block, scheme, dq, bias, dtype, isa, path, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    t = Codebook4Tensor.from_float(w, scheme=scheme, block_size=block, double_quant=dq)
    assert t.kernel == f"cpu.{scheme}"
    ref = weight_only_reference(x, t, b)
    with cpu_ext.force_isa(isa), gemm_from(1 if path == "gemm" else 10**6):
        y = F.linear(x, t, b)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dq", [False, True])
def test_kernel_larger_shapes_and_batched_input(isa, dq):
    torch.manual_seed(0)
    t = Codebook4Tensor.from_float(torch.randn(300, 1000), scheme="nf4", block_size=64, double_quant=dq)
    assert t.padded_in_features == 1024
    b = torch.randn(300)
    for shape in ((1, 1000), (2, 16, 1000), (7, 1000), (40, 1000)):
        x = torch.randn(shape)
        with cpu_ext.force_isa(isa):
            y = F.linear(x, t, b)
        torch.testing.assert_close(y, weight_only_reference(x, t, b), rtol=1e-4, atol=1e-4)
    # rows of a wider buffer (row stride > K) and a transposed-copy input
    big = torch.randn(5, 1200)
    x = big[:, :1000]
    with cpu_ext.force_isa(isa):
        torch.testing.assert_close(F.linear(x, t), weight_only_reference(x, t, None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_table_on_every_path(isa, scheme):
    """Each table through each lookup (AVX2 M=1 uses byte planes: 2 for bf16-exact e2m1, 4 else)."""
    torch.manual_seed(0)
    t = Codebook4Tensor.from_float(torch.randn(50, 320), scheme=scheme, block_size=32)
    for m in (1, 2, 5, 12):
        x = torch.randn(m, 320)
        with cpu_ext.force_isa(isa):
            y = F.linear(x, t)
        torch.testing.assert_close(y, weight_only_reference(x, t, None), rtol=2e-5, atol=2e-5)


def test_gemm_path_uses_the_exact_dequantized_weight():
    """From GEMM_MIN_M rows the kernel multiplies table[q] * s exactly: with integer-valued
    activations and a one-hot x the output is the dequantized weight column itself."""
    torch.manual_seed(0)
    t = Codebook4Tensor.from_float(torch.randn(48, 128), scheme="fp4_e2m1_bnb", block_size=32, double_quant=True)
    x = torch.eye(128)[:16]
    with gemm_from(1):
        y = F.linear(x, t)
    assert torch.equal(y, t.dequantize()[:, :16].t())


def test_layout_round_trip_and_checkpoints_hold_canonical_data():
    torch.manual_seed(0)
    w = torch.randn(37, 200)
    for dq in (False, True):
        fast = Codebook4Tensor.from_float(w, scheme="nf4", double_quant=dq)
        with prefer_kernels("reference"):
            ref = Codebook4Tensor.from_float(w, scheme="nf4", double_quant=dq)
        assert fast.kernel == "cpu.nf4" and ref.kernel == "reference.nf4"
        assert fast.quant_layout == "cpu_codebook4_tile16.nf4" and ref.quant_layout == "codebook4_packed"
        assert not torch.equal(fast.qdata, ref.qdata)  # really re-arranged
        a, b = fast.canonical_tensors(), ref.canonical_tensors()
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
        state = fast.checkpoint_state()
        assert "lut" not in state and "dq_code" not in state
        assert fast.nbytes_quantized == ref.nbytes_quantized
        assert (fast.dq_code is not None) == dq and fast.lut is not None
        assert torch.equal(fast.dequantize(), ref.dequantize())
        # slicing and embedding go through the canonical data
        assert torch.equal(fast[5:20].dequantize(), ref.dequantize()[5:20])
        idx = torch.tensor([0, 36, 7])
        assert torch.equal(F.embedding(idx, fast), F.embedding(idx, ref))


def test_model_uses_the_kernel_and_compiles(tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 72), torch.nn.ReLU(), torch.nn.Linear(72, 30)).eval()
    x = torch.randn(3, 200)
    ref_model = torch.nn.Sequential(torch.nn.Linear(200, 72), torch.nn.ReLU(), torch.nn.Linear(72, 30)).eval()
    ref_model.load_state_dict(model.state_dict())
    torchq.quantize_(model, torchq.nf4_weight_only(double_quant=True))
    with prefer_kernels("reference"):
        torchq.quantize_(ref_model, torchq.nf4_weight_only(double_quant=True))
    assert "cpu.nf4" in torchq.explain(model, print_table=False)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, ref_model(x), rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), y, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    path = str(tmp_path / "m.safetensors")
    torchq.save_file(model.state_dict(), path)
    fresh = torch.nn.Sequential(torch.nn.Linear(200, 72), torch.nn.ReLU(), torch.nn.Linear(72, 30)).eval()
    fresh.load_state_dict(torchq.load_file(path), assign=True)
    assert fresh[0].weight.kernel == "cpu.nf4"
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_kernel_rejects_bad_arguments():
    t = Codebook4Tensor.from_float(torch.randn(16, 64), scheme="nf4")
    op = torch.ops.torchq.codebook4_linear.default
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="16 contiguous fp32"):
        op(x, t.qdata, t.scale, t.lut[:8], None, 64)
    with pytest.raises(RuntimeError, match="need dq_code"):
        op(x, t.qdata, t.scale.to(torch.uint8), t.lut, None, 64)
    with pytest.raises(RuntimeError, match="input has 65 features"):
        op(torch.randn(2, 65), t.qdata, t.scale, t.lut, None, 64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(x.double(), t.qdata, t.scale, t.lut, None, 64)


def _bf16_routes():
    """(ISA path, tunables) of every bf16 route this CPU can run from one row on."""
    native = torch.ops.torchq._native_bf16() if ISAS else False
    routes = []
    for isa in ISAS:
        if isa in ("scalar", "avx2") or native:
            routes.append((isa, {"bf16_min_m": 1, "bf16_emulate": 1, "onednn_route": 2}))
        routes.append((isa, {"bf16_min_m": 1, "onednn_route": 1}))
    return routes


@contextlib.contextmanager
def _tuned(tunables):
    old = {k: torch.ops.torchq._tune(k, v) for k, v in tunables.items()}
    prec = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        for k, v in old.items():
            torch.ops.torchq._tune(k, v)


@pytest.mark.parametrize("route", range(len(_bf16_routes())))
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_routes_follow_the_precision_rule(route, dq, scheme):
    """The codebook kernel follows the integer kernels' precision rule: under "highest"
    fp32 activations stay fp32 on every route; under "high" (or with bf16 activations)
    they compute bf16(x) @ bf16(W)^T (oneDNN route: result rounded to bf16 too)."""
    isa, tunables = _bf16_routes()[route]
    torch.manual_seed(1)
    t = Codebook4Tensor.from_float(torch.randn(45, 200), scheme=scheme, block_size=64, double_quant=dq)
    x, b = torch.randn(37, 200), torch.randn(45)
    w = t.dequantize(torch.float32)
    exact = F.linear(x.double(), w.double(), b.double())
    rounded = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.double())
    with cpu_ext.force_isa(isa), _tuned(tunables):
        torch.set_float32_matmul_precision("highest")
        y32 = F.linear(x, t, b)
        torch.set_float32_matmul_precision("high")
        y16 = F.linear(x, t, b)
        ybf = F.linear(x.bfloat16(), t, b.bfloat16())
    torch.testing.assert_close(y32.double(), exact, rtol=2e-5, atol=2e-5)
    assert (y16.double() - exact).abs().max() > 0  # really a different arithmetic
    torch.testing.assert_close(y16.double(), rounded, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(ybf.double(), rounded, rtol=2e-2, atol=4e-2)
