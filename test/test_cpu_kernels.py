"""The C++ CPU kernels (torch.ops.torchq): built and selected, equal to the references on
every ISA path this host supports, layouts round-trip, opcheck, torch.compile, threads."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchq
from torchq.kernels import cpu_ext, cpu_kernels, get_kernel
from torchq.kernels.cpu_layouts import INT4_TILE16, INT8_K4X16, INT8_K16
from torchq.kernels.numerics import weight_only_route
from torchq.formats.affine.reference import int_accumulators
from torchq.formats.dispatch import prefer_kernels
from torchq.primitives.activation import quantize_per_token_int8
from torchq.formats import AffineQuantizedTensor

ops = torch.ops.torchq
HYP = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])


def isas() -> list[str]:
    return cpu_ext.supported_isas()


def quantized(w, scheme, bits, group, symmetric=False, domain=None, reference=False):
    kw = dict(scheme=scheme, bits=bits, group_size=group, symmetric=symmetric, zero_point_domain=domain)
    if reference:
        with prefer_kernels("reference"):
            return AffineQuantizedTensor.from_float(w, **kw)
    return AffineQuantizedTensor.from_float(w, **kw)


def gemm_paths():
    """Run both the GEMV and the dequantize+GEMM paths by moving the M threshold."""
    return [None, 1, 10**9]


class _tune:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = ops._tune(self.name, self.value)

    def __exit__(self, *exc):
        ops._tune(self.name, self.old)


def bf16_routes() -> list[tuple[str, dict]]:
    """(ISA path, tunables) for every bf16 route this CPU can run from one row on: torchq's
    bf16 GEMM (native vdpbf16ps on avx512/amx where the CPU has AVX512-BF16, emulated on
    avx2 / scalar) and the oneDNN route (weights dequantized to bf16 + at::mm; the amx
    path's default, forced on the others)."""
    routes = []
    for isa in isas():
        if isa in ("scalar", "avx2") or ops._native_bf16():
            routes.append((isa, {"bf16_min_m": 1, "bf16_emulate": 1, "onednn_route": 2}))
        routes.append((isa, {"bf16_min_m": 1, "onednn_route": 1}))
    return routes


@contextlib.contextmanager
def tuned(tunables: dict):
    old = {name: ops._tune(name, value) for name, value in tunables.items()}
    try:
        yield
    finally:
        for name, value in old.items():
            ops._tune(name, value)


@contextlib.contextmanager
def matmul_precision(precision: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class _gemm_min_m:
    def __init__(self, m):
        self.m = m

    def __enter__(self):
        if self.m is not None:
            self.old = (ops._tune("int4_gemm_min_m", self.m), ops._tune("int8_gemm_min_m", self.m))

    def __exit__(self, *exc):
        if self.m is not None:
            ops._tune("int4_gemm_min_m", self.old[0])
            ops._tune("int8_gemm_min_m", self.old[1])


# ---------------------------------------------------------------------- built and used
def test_compiled_kernels_are_built_and_selected():
    """CI runs the C++ kernels, not the references: fails (never skips) if the build broke."""
    assert cpu_ext.available(), f"C++ kernels failed to build: {cpu_ext.build_error()!r}"
    assert "scalar" in isas() and cpu_ext.current_isa() in isas()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32))
    text = torchq.explain(model, print_table=False)
    table = [line for line in text.splitlines() if " Linear " in line]
    assert len(table) == 2 and all("cpu.int4_weight_only" in line for line in table) and "reference" not in text
    assert "cpu.int4_weight_only: fp32" in text  # the numerics footer
    assert model[0].weight.quant_layout == "cpu_int4_tile16"


@pytest.mark.parametrize(
    "config, kernel",
    [
        (torchq.int4_weight_only(group_size=32), "cpu.int4_weight_only"),
        (torchq.int8_weight_only(), "cpu.int8_weight_only"),
        (torchq.int8_weight_only(group_size=32), "cpu.int8_weight_only"),
        (torchq.intx_weight_only(bits=3, group_size=32), "cpu.intx_weight_only"),
        (torchq.int8_dynamic_activation_int8_weight(), "cpu.w8a8"),
        (torchq.int8_dynamic_activation_int4_weight(group_size=32), "cpu.w4a8"),
    ],
)
def test_every_scheme_selects_its_cpu_kernel(config, kernel):
    model = nn.Sequential(nn.Linear(96, 40))
    torchq.quantize_(model, config)
    assert model[0].weight.kernel == kernel
    assert get_kernel(kernel).numerics


def test_reference_can_still_be_forced():
    with prefer_kernels("reference"):
        t = quantized(torch.randn(16, 64), "int4_weight_only", 4, 32)
    assert t.kernel == "reference.int4_weight_only"


def test_unsupported_weights_are_refused_not_mishandled():
    codes = torch.randint(0, 16, (8, 16), dtype=torch.int8)
    t = AffineQuantizedTensor.from_codes(
        codes, torch.rand(8, 4) + 0.1, torch.full((8, 4), 8, dtype=torch.int8), outer_shape=(8, 16),
        outer_dtype=torch.float32, scheme="int4_weight_only", bits=4, group_size=4, quant_min=0, quant_max=15,
        zero_point_domain="int",
    )
    assert t.kernel == "reference.int4_weight_only"  # group 4 is not a multiple of 8


# ---------------------------------------------------------------------- numerics vs references
def _fp32_bound(x, w_deq, bias, scale=8.0):
    """A loose fp32 error bound: scale * K * eps * (|x| @ |W|^T + |b|)."""
    mag = x.double().abs() @ w_deq.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return scale * x.shape[-1] * 2.0**-24 * mag + 1e-30


def _check_float_output(y, exact, x, w_deq, bias):
    bound = _fp32_bound(x.float(), w_deq, bias)
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * exact.abs()
    elif y.dtype == torch.float16:
        bound = bound + 2.0**-11 * exact.abs()
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3e}"


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@HYP
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    group=st.sampled_from([32, 64, 128]),
    cut=st.integers(0, 31),
    kind=st.sampled_from(["asym_int", "asym_float", "sym"]),
    dtype=dtypes,
    bias=st.booleans(),
    path=st.sampled_from(gemm_paths()),
    data=st.data(),
)
def test_int4_weight_only_matches_reference(m, n, groups, group, cut, kind, dtype, bias, path, data):
    k = max(1, groups * group - cut)  # K padded up to the group size when cut > 0
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    w = torch.randn(n, k)
    sym, dom = kind == "sym", {"asym_int": "int", "asym_float": "float", "sym": None}[kind]
    t = quantized(w, "int4_weight_only", 4, group, sym, dom)
    assert t.kernel == "cpu.int4_weight_only"
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    w_deq = t.dequantize(torch.float32)
    exact = x.double() @ w_deq.double().T + (b.double() if bias else 0)
    for isa in isas():
        with cpu_ext.force_isa(isa), _gemm_min_m(path):
            y = F.linear(x, t, b)
        assert y.dtype == dtype and y.shape == (m, n)
        _check_float_output(y, exact, x, w_deq, b)


def _weight_pair(scheme, w):
    """The same weight with numerics "auto" and "exact" (config exact_fp32=True)."""
    if scheme == "int4":
        kw = dict(scheme="int4_weight_only", bits=4, group_size=32, symmetric=False)
    else:
        kw = dict(scheme="int8_weight_only", bits=8, group_size=None, symmetric=True)
    auto = AffineQuantizedTensor.from_float(w, **kw)
    exact_w = AffineQuantizedTensor.from_float(w, numerics="exact", **kw)
    assert auto.numerics == "auto" and exact_w.numerics == "exact"
    return auto, exact_w


@HYP
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    cut=st.integers(0, 31),
    scheme=st.sampled_from(["int4", "int8"]),
    precision=st.sampled_from(["high", "medium"]),
    dtype=dtypes,
    data=st.data(),
)
def test_bf16_routes_match_a_reference_that_rounds_the_same_way(m, n, groups, cut, scheme, precision, dtype, data):
    """Where the precision rule allows bf16 (bf16/fp16 activations, or fp32 under matmul
    precision "high"/"medium"), every bf16 route computes bf16(x) @ bf16(W)^T with fp32
    accumulation; the oneDNN route's result is rounded to bf16 once more. Weights with
    numerics "exact" (config exact_fp32=True) stay fp32 whatever the setting."""
    k = max(1, groups * 32 - cut)
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    auto, exact_w = _weight_pair(scheme, torch.randn(n, k))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    w_deq = auto.dequantize(torch.float32)
    rounded = x.bfloat16().double() @ w_deq.bfloat16().double().T + b.double()
    exact = x.double() @ w_deq.double().T + b.double()
    for isa, tunables in bf16_routes():
        with cpu_ext.force_isa(isa), tuned(tunables), matmul_precision(precision):
            assert weight_only_route(x.dtype, m) in ("bf16_gemm", "onednn_bf16")
            y = F.linear(x, auto, b)
            y_exact = F.linear(x, exact_w, b)
        bound_x, bound_w = x.bfloat16().float(), w_deq.bfloat16().float()
        if tunables.get("onednn_route") == 1:
            # oneDNN's product is rounded to bf16, the bias added after, then y's dtype rounds
            product = (rounded - b.double()).abs()
            bound = _fp32_bound(bound_x, bound_w, b) + 2.0**-8 * (product + rounded.abs())
            assert bool(((y.double() - rounded).abs() <= bound).all())
        else:
            _check_float_output(y, rounded, bound_x, bound_w, b)
        _check_float_output(y_exact, exact, x, w_deq, b)


@HYP
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    k=st.integers(1, 100),
    scheme=st.sampled_from(["int4", "int8"]),
    data=st.data(),
)
def test_fp32_activations_get_fp32_arithmetic_under_highest_precision_on_every_route(m, n, k, scheme, data):
    """PyTorch's default matmul precision ("highest"): fp32 activations get fp32 arithmetic
    at every M on every ISA path, even with every bf16 route switched on from one row:
    the result equals F.linear(x, w.dequantize(), bias) to fp32 summation-order tolerance."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    auto, _ = _weight_pair(scheme, torch.randn(n, k))
    x, b = torch.randn(m, k), torch.randn(n)
    w_deq = auto.dequantize(torch.float32)
    exact = x.double() @ w_deq.double().T + b.double()
    for isa, tunables in bf16_routes():
        with cpu_ext.force_isa(isa), tuned(tunables), matmul_precision("highest"):
            assert weight_only_route(torch.float32, m) == "fp32"
            y = F.linear(x, auto, b)
        _check_float_output(y, exact, x, w_deq, b)
        torch.testing.assert_close(y, F.linear(x, w_deq, b), rtol=1e-5, atol=1e-5)


def test_onednn_route_chunk_size_does_not_change_results():
    """The oneDNN route's chunking (weight bytes per at::mm call) is a speed knob only."""
    torch.manual_seed(0)
    t = quantized(torch.randn(75, 96), "int4_weight_only", 4, 32)
    x = torch.randn(40, 96).bfloat16()
    with tuned({"bf16_min_m": 1, "onednn_route": 1}):
        outs = []
        for chunk in (4096, 96 * 2 * 16 * 2, 1 << 20):
            with tuned({"onednn_chunk_bytes": chunk}):
                outs.append(F.linear(x, t))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    with pytest.raises(RuntimeError, match="at least 4096"):
        ops._tune("onednn_chunk_bytes", 100)


def test_route_follows_the_precision_setting_at_call_time():
    """The same weight, called again after torch.set_float32_matmul_precision, switches route."""
    with tuned({"bf16_min_m": 1, "onednn_route": 1}):
        with matmul_precision("highest"):
            assert weight_only_route(torch.float32, 64) == "fp32"
            assert weight_only_route(torch.bfloat16, 64) == "onednn_bf16"
            assert weight_only_route(torch.float32, 64, "exact") == "fp32"
        with matmul_precision("high"):
            assert weight_only_route(torch.float32, 64) == "onednn_bf16"
            assert weight_only_route(torch.bfloat16, 64, "exact") == "fp32"
    if cpu_ext.current_isa() in ("avx2", "scalar"):  # no bf16 dot product on these paths: fp32 by default
        with matmul_precision("high"), tuned({"onednn_route": 0, "bf16_emulate": 0, "bf16_min_m": -1}):
            assert weight_only_route(torch.float32, 4096) == "fp32"
            assert weight_only_route(torch.bfloat16, 4096) == "fp32"


def test_bf16_path_is_off_by_default_without_native_bf16():
    """Without a native bf16 dot product the bf16 GEMM would only cost accuracy: fp32 stays,
    even where the precision setting allows bf16."""
    if cpu_ext.current_isa() in ("avx512", "amx") and ops._native_bf16():
        pytest.skip("this CPU runs a bf16 route natively by default")
    torch.manual_seed(0)
    t = quantized(torch.randn(24, 64), "int4_weight_only", 4, 32)
    x = torch.randn(40, 64)
    exact = x.double() @ t.dequantize(torch.float32).double().T
    with matmul_precision("medium"), tuned({"onednn_route": 0, "bf16_emulate": 0, "bf16_min_m": -1}):
        _check_float_output(F.linear(x, t), exact, x, t.dequantize(torch.float32), None)


def test_torch_compile_honours_the_precision_setting():
    """torch.compile reads the setting at trace time and guards on it: changing it recompiles,
    and the graph passes the new rule to the kernel."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    model = nn.Linear(64, 32)
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32))
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(40, 64)
    with matmul_precision("highest"):
        compiled(x)
    with matmul_precision("high"):
        compiled(x)
    with matmul_precision("highest"):
        compiled(x)
    assert len(backend.fw_graphs) == 2
    calls = [line for g in backend.fw_graphs for line in g.code.splitlines() if "torchq.int4_linear" in line]
    assert len(calls) == 2 and "True" not in calls[0] and calls[1].rstrip().split(";")[0].endswith("True)")
    torch._dynamo.reset()


def test_numerics_option_round_trips_through_configs_and_checkpoints(tmp_path):
    cfg = torchq.int4_weight_only(group_size=32, exact_fp32=True)
    assert torchq.config_from_json(cfg.to_json()) == cfg
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    torchq.quantize_(model, cfg, overrides={"1": torchq.int8_weight_only(exact_fp32=False)})
    assert model[0].weight.numerics == "exact" and model[1].weight.numerics == "auto"
    assert "numerics=exact" in repr(model[0].weight)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torchq.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    for sd in (torch.load(tmp_path / "m.pt", weights_only=True), torchq.load_file(str(tmp_path / "m.safetensors"))):
        assert sd["0.weight"].numerics == "exact" and sd["1.weight"].numerics == "auto"
    state = model[0].weight.checkpoint_state()
    del state["numerics"]  # a checkpoint written before the field existed
    assert AffineQuantizedTensor.from_checkpoint_state(state).numerics == "auto"


@HYP
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    k=st.integers(1, 150),
    group=st.sampled_from([None, 32]),
    bits=st.sampled_from([8, 3]),
    asym=st.booleans(),
    dtype=dtypes,
    path=st.sampled_from(gemm_paths()),
    data=st.data(),
)
def test_int8_and_intx_weight_only_match_reference(m, n, k, group, bits, asym, dtype, path, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    if bits == 3 and group is None:
        group = 32
    scheme = "int8_weight_only" if bits == 8 and not asym else "intx_weight_only"
    t = quantized(torch.randn(n, k), scheme, bits, group, symmetric=not asym)
    assert t.kernel.startswith("cpu.")
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    w_deq = t.dequantize(torch.float32)
    exact = x.double() @ w_deq.double().T + b.double()
    for isa in isas():
        with cpu_ext.force_isa(isa), _gemm_min_m(path):
            y = F.linear(x, t, b)
        _check_float_output(y, exact, x, w_deq, b)


@HYP
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    group=st.sampled_from([32, 64, 128]),
    cut=st.integers(0, 31),
    kind=st.sampled_from(["asym_int", "asym_float", "sym"]),
    dtype=dtypes,
    data=st.data(),
)
def test_w4a8_integer_accumulators_exact_and_output_close(m, n, groups, group, cut, kind, dtype, data):
    k = max(1, groups * group - cut)
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    sym, dom = kind == "sym", {"asym_int": "int", "asym_float": "float", "sym": None}[kind]
    t = quantized(torch.randn(n, k), "w4a8", 4, group, sym, dom)
    assert t.kernel == "cpu.w4a8"
    x = (torch.randn(m, k) * 3).to(dtype)
    b = torch.randn(n).to(dtype)
    acc_ref, xs, _ = int_accumulators(x, t)
    xq, xs_ref = quantize_per_token_int8(t.prepare_input(x))
    w_stored = t.dequantize_stored(torch.float32)
    exact = (xq.double() * xs_ref.double()) @ w_stored.double().T + b.double()
    for isa in isas():
        with cpu_ext.force_isa(isa):
            acc = ops.w4a8_int_acc(x, t.qdata, t.scale, t.zero_point, t.group_size, t.quant_min)
            y = F.linear(x, t, b)
        assert torch.equal(acc.long(), acc_ref), isa
        _check_float_output(y, exact, xq.float() * xs_ref, w_stored, b)


@HYP
@given(m=st.integers(1, 12), n=st.integers(1, 40), k=st.integers(1, 150), dtype=dtypes, data=st.data())
def test_w8a8_integer_accumulators_exact_and_output_close(m, n, k, dtype, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    t = quantized(torch.randn(n, k), "w8a8", 8, None, symmetric=True)
    assert t.kernel == "cpu.w8a8"
    x = (torch.randn(m, k) * 3).to(dtype)
    b = torch.randn(n).to(dtype)
    acc_ref, _, _ = int_accumulators(x, t)
    xq, xs = quantize_per_token_int8(x)
    w_stored = t.dequantize_stored(torch.float32)
    exact = (xq.double() * xs.double()) @ w_stored.double().T + b.double()
    for isa in isas():
        with cpu_ext.force_isa(isa):
            acc = ops.w8a8_int_acc(x, t.qdata, t.scale)
            y = F.linear(x, t, b)
        assert torch.equal(acc.long(), acc_ref), isa
        _check_float_output(y, exact, xq.float() * xs, w_stored, b)


@HYP
@given(m=st.integers(1, 6), k=st.integers(1, 100), dtype=dtypes, data=st.data())
def test_activation_quantization_bit_exact(m, k, dtype, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(m, k) * data.draw(st.sampled_from([1e-3, 1.0, 300.0]))
    if k >= 2:  # exact ties: a row with amax 127 has scale 1, so x/scale keeps its .5 fractions
        x[0, :] = torch.randint(-254, 255, (k,)).float() / 2
        x[0, 0] = 127.0
    if m >= 2:
        x[1, :] = 0.0  # an all-zero row: scale 0, codes 0
    x = x.to(dtype)
    q_ref, s_ref = quantize_per_token_int8(x)
    for isa in isas():
        with cpu_ext.force_isa(isa):
            q, s = ops.quantize_per_token_int8(x)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), isa


def test_act_scale_and_perm_go_through_prepare_input():
    torch.manual_seed(0)
    n, k = 24, 64
    for scheme in ("int4_weight_only", "w4a8"):
        base = quantized(torch.randn(n, k), scheme, 4, 32)
        c = base.canonical_tensors()
        act_scale = torch.rand(k) + 0.5
        perm = torch.randperm(k)
        meta = {f: getattr(base, f) for f in base.meta_fields if f not in ("quant_layout", "kernel")}
        c.update(act_scale=act_scale, perm=perm)
        t = AffineQuantizedTensor.from_canonical(c, outer_shape=(n, k), outer_dtype=torch.float32, **meta)
        with prefer_kernels("reference"):
            r = AffineQuantizedTensor.from_canonical(c, outer_shape=(n, k), outer_dtype=torch.float32, **meta)
        assert t.kernel.startswith("cpu.") and r.kernel.startswith("reference.")
        x = torch.randn(2, 3, k).bfloat16()
        y, yr = F.linear(x, t), F.linear(x, r)
        assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)


def test_bad_input_errors_name_the_problem():
    t = quantized(torch.randn(16, 64), "int4_weight_only", 4, 32)
    with pytest.raises(RuntimeError, match="features"):
        ops.int4_linear(torch.randn(2, 100), t.qdata, t.scale, t.zero_point, None, 32, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.int4_linear(torch.randn(2, 64).double(), t.qdata, t.scale, t.zero_point, None, 32, 0)
    with pytest.raises(RuntimeError, match="bias"):
        ops.int4_linear(torch.randn(2, 64), t.qdata, t.scale, t.zero_point, torch.randn(3), 32, 0)


# ---------------------------------------------------------------------- layouts
@HYP
@given(n=st.integers(1, 50), groups=st.integers(1, 3), group=st.sampled_from([32, 64]), data=st.data())
def test_layouts_round_trip_bit_exact(n, groups, group, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    kp = groups * group
    scale = torch.rand(n, groups)
    for layout, qdata, zero in (
        (INT4_TILE16, torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8), torch.randint(0, 16, (n, groups), dtype=torch.int8)),
        (INT8_K16, torch.randint(-127, 128, (n, kp), dtype=torch.int8), torch.randn(n, groups)),
        (INT8_K4X16, torch.randint(-127, 128, (n, kp - 3), dtype=torch.int8), None),
    ):
        sc = scale if layout is not INT8_K4X16 else torch.rand(n, 1)
        fields = dict(qdata=qdata, scale=sc, zero_point=zero, act_scale=None, perm=None)
        packed = layout.to_layout(fields)
        assert packed["qdata"].shape == qdata.shape and packed["scale"].shape == sc.shape
        back = layout.to_canonical(packed)
        for key, v in fields.items():
            assert (v is None and back[key] is None) or torch.equal(back[key], v), (layout.name, key)
        index = torch.randint(0, n, (7,))
        rows = layout.canonical_rows(packed, index)  # embedding lookups gather rows only
        for key in ("qdata", "scale", "zero_point"):
            v = fields[key]
            assert (v is None and rows[key] is None) or torch.equal(rows[key], v[index]), (layout.name, key)


def test_checkpoints_hold_the_canonical_layout(tmp_path):
    import copy

    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 24))
    ref = copy.deepcopy(model)
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32))
    with prefer_kernels("reference"):
        torchq.quantize_(ref, torchq.int4_weight_only(group_size=32))
    w = model[0].weight
    state = w.checkpoint_state()
    assert torch.equal(state["qdata"], ref[0].weight.qdata)  # canonical packed_int4 bytes
    torch.save(model.state_dict(), tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 24))
    fresh.load_state_dict(sd, assign=True)
    assert fresh[0].weight.kernel == "cpu.int4_weight_only"
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    torch.manual_seed(0)
    x = torch.randn(3, 70)
    t4 = quantized(torch.randn(20, 70), "int4_weight_only", 4, 32)
    t8 = quantized(torch.randn(20, 70), "int8_weight_only", 8, 32, symmetric=True)
    a4 = quantized(torch.randn(20, 70), "w4a8", 4, 32)
    a8 = quantized(torch.randn(20, 70), "w8a8", 8, None, symmetric=True)
    b = torch.randn(20)
    return [
        (ops.int4_linear.default, (x, t4.qdata, t4.scale, t4.zero_point, b, 32, 0)),
        (ops.int4_linear.default, (x.bfloat16(), t4.qdata, t4.scale, t4.zero_point, None, 32, 0)),
        (ops.int8_linear.default, (x, t8.qdata, t8.scale, None, b, 32)),
        (ops.w4a8_linear.default, (x, a4.qdata, a4.scale, a4.zero_point, b, 32, 0)),
        (ops.w8a8_linear.default, (x, a8.qdata, a8.scale, b)),
        (ops.w4a8_int_acc.default, (x, a4.qdata, a4.scale, a4.zero_point, 32, 0)),
        (ops.w8a8_int_acc.default, (x, a8.qdata, a8.scale)),
        (ops.quantize_per_token_int8.default, (x,)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_keeps_the_cpu_ops():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 32), nn.Linear(32, 16))
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32), overrides={"2": torchq.int8_dynamic_activation_int8_weight()})
    x = torch.randn(2, 64)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    code = "\n".join(g.code for g in backend.fw_graphs)
    assert code.count("torchq.int4_linear") == 2 and code.count("torchq.w8a8_linear") == 1


# ---------------------------------------------------------------------- threads
def test_threads_really_parallel_and_results_independent_of_thread_count():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ops._parallel_threads(8) == 1
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            assert ops._parallel_threads(8) == 2, "at::parallel_for runs serially: the extension lacks OpenMP"
        torch.manual_seed(0)
        w = torch.randn(600, 512)
        weights = [
            quantized(w, "int4_weight_only", 4, 128),
            quantized(w, "int8_weight_only", 8, None, symmetric=True),
            quantized(w, "w4a8", 4, 128),
            quantized(w, "w8a8", 8, None, symmetric=True),
        ]
        for m in (1, 40):
            x = torch.randn(m, 512)
            torch.set_num_threads(1)
            one = [F.linear(x, t) for t in weights]
            torch.set_num_threads(2)
            two = [F.linear(x, t) for t in weights]
            for a, b in zip(one, two):
                assert torch.equal(a, b)  # every output tile is computed by one thread
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------- ISA selection, build failure
def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full["PYTHONPATH"] = root + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


def test_torchq_isa_env_forces_a_path_and_refuses_what_the_cpu_lacks():
    r = _run("from torchq.kernels import cpu_ext; print(cpu_ext.current_isa())", TORCHQ_ISA="scalar")
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    missing = [i for i in cpu_ext.ISAS if i not in isas()]
    bad = missing[0] if missing else "bogus"
    r = _run(
        "import torch, torchq\nm = torch.nn.Linear(64, 16)\ntorchq.quantize_(m, torchq.int4_weight_only(group_size=32))",
        TORCHQ_ISA=bad,
    )
    assert r.returncode != 0 and "TORCHQ_ISA" in r.stderr


def test_force_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA"):
        with cpu_ext.force_isa("sse9"):
            pass


def test_failed_build_warns_once_and_falls_back_to_references(monkeypatch):
    saved = dict(cpu_ext._state)
    try:
        cpu_ext._state.clear()
        cpu_ext._state.update(loaded=False, error=None, library=False)

        def broken():
            raise RuntimeError("simulated compiler failure")

        monkeypatch.setattr(cpu_ext, "_load", broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = quantized(torch.randn(16, 64), "int4_weight_only", 4, 32)
            t2 = quantized(torch.randn(16, 64), "w8a8", 8, None, symmetric=True)
        assert t.kernel == "reference.int4_weight_only" and t2.kernel == "reference.w8a8"
        msgs = [w for w in caught if "building the C++ CPU kernels failed" in str(w.message)]
        assert len(msgs) == 1 and "simulated compiler failure" in str(msgs[0].message)
    finally:
        cpu_ext._state.clear()
        cpu_ext._state.update(saved)


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_weight_only", "w4a8", "w8a8"])
def test_gradients_flow_to_activations_and_bias(scheme):
    """Adapters train on top of quantized layers: d/dx of the C++ op equals d/dx through
    the dequantized weight (straight-through for the dynamic-int8 rounding)."""
    torch.manual_seed(0)
    bits, group, sym = {"int4_weight_only": (4, 32, False), "int8_weight_only": (8, None, True),
                        "w4a8": (4, 32, False), "w8a8": (8, None, True)}[scheme]
    t = quantized(torch.randn(20, 70), scheme, bits, group, symmetric=sym)
    assert t.kernel.startswith("cpu.")
    x = torch.randn(3, 70, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    g = torch.randn(3, 20)
    F.linear(x, t, b).backward(g)
    torch.testing.assert_close(x.grad, g @ t.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum(0))


# ---------------------------------------------------------------------- CPU report
def test_cpu_report_names_features_paths_and_routes():
    from torchq.kernels.cpu_info import cpu_features, cpu_report, cpu_summary

    feats = set(cpu_features())
    if "avx2" in isas():
        assert {"avx2", "fma", "f16c"} <= feats
    if "avx512" in isas():
        assert {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "os_zmm_state"} <= feats
    if "amx" in isas():
        assert {"amx_tile", "amx_bf16", "amx_int8", "os_tile_state"} <= feats
    assert bool(ops._native_bf16()) == ("avx512_bf16" in feats and "avx512" in isas())
    text = cpu_report()
    assert f"in use: {cpu_ext.current_isa()}" in text and "float32 matmul precision: highest" in text
    assert cpu_ext.current_isa() in cpu_summary()
    r = _run("import runpy; runpy.run_module('torchq.kernels', run_name='__main__')")
    assert r.returncode == 0 and "kernel paths:" in r.stdout, r.stderr


def test_explain_arithmetic_follows_the_precision_setting():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32), overrides={"1": torchq.int8_dynamic_activation_int8_weight()})
    rows = lambda: {r["layer"]: r["arithmetic"] for r in torchq.explain_rows(model)}  # noqa: E731
    with matmul_precision("highest"):
        assert rows() == {"0": "fp32", "1": "int8 x int8 -> int32"}
    with tuned({"onednn_route": 1}), matmul_precision("high"):
        assert rows()["0"] == "fp32 (M<32), onednn_bf16 (M>=32)"
        assert "kernel path:" in torchq.explain(model, print_table=False).splitlines()[-1]


def test_torchq_tune_env_sets_tunables_and_rejects_bad_items():
    code = "import torch, torchq\nfrom torchq.kernels import cpu_ext\ncpu_ext.load()\nprint(torch.ops.torchq._tune('bf16_min_m', -1))"
    r = _run(code, TORCHQ_TUNE="bf16_min_m=5, onednn_route=1")
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr
    r = _run(code, TORCHQ_TUNE="bf16_min_m")
    assert r.returncode != 0 and "TORCHQ_TUNE" in r.stderr
    r = _run(code, TORCHQ_TUNE="no_such_knob=1")
    assert r.returncode != 0 and "unknown tunable" in r.stderr
