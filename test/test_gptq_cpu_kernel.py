"""The C++ GPTQ column kernel (torch.ops.torchq.gptq_block_) against its plain-PyTorch
reference, bit for bit, over block shapes, odd sizes, column ranges and every rounding
rule; its rounding against the grids' own; its argument checks; and GPTQ end to end on
either route.

The kernel is one portable C++ loop (no per-ISA units: it does not consult the ISA
table), so one run covers every path this CPU has."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq.algorithms.gptq import gptq_quantize
from torchq.algorithms.grid import grid_for
from torchq.kernels import cpu_ext, cpu_gptq
from torchq.kernels.cpu_gptq import gptq_block

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="C++ CPU kernels not built")

RULES = {  # name -> (mode, qmin, qmax, levels)
    "int4_asym": ("int", 0.0, 15.0, None),
    "int3_asym": ("int", 0.0, 7.0, None),
    "int8_sym": ("none", -128.0, 127.0, None),
    "int4_sym": ("none", -8.0, 7.0, None),
    "int4_float_zero": ("float", 0.0, 15.0, None),  # (torchao's float zero-point domain)
}
for _name, _config in [("nf4", torchq.nf4_weight_only(32)), ("fp4_e2m1", torchq.fp4_weight_only("e2m1", 32)),
                      ("fp4_bnb", torchq.fp4_weight_only("bnb", 32))]:
    _rule = grid_for(_config, (1, 32)).column_rule()
    RULES[_name] = (_rule.mode, _rule.qmin, _rule.qmax, _rule.levels)


def _problem(rows, b, rule, seed):
    g = torch.Generator().manual_seed(seed)
    mode, qmin, qmax, levels = RULES[rule]
    w = torch.randn(rows, b, generator=g) * 3
    a = torch.randn(b + 3, b, generator=g)
    hinv = torch.linalg.inv(a.T @ a / (b + 3) + 0.1 * torch.eye(b))
    u = torch.linalg.cholesky(hinv, upper=True).contiguous()
    scale = torch.rand(rows, b, generator=g) * 0.5 + 1e-3
    zero = None
    if mode == "int":
        zero = torch.randint(-3, int(qmax) + 4, (rows, b), generator=g).float()  # may lie outside qmin..qmax
    elif mode == "float":
        zero = torch.randn(rows, b, generator=g)
    return w, u, scale, zero, levels, mode, qmin, qmax


@settings(deadline=None, max_examples=60)
@given(
    rows=st.integers(1, 40),
    b=st.integers(1, 130),
    rule=st.sampled_from(sorted(RULES)),
    span=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_bit_for_bit(rows, b, rule, span, seed):
    w, u, scale, zero, levels, mode, qmin, qmax = _problem(rows, b, rule, seed)
    start, stop = sorted(int(f * b) for f in span)
    outs = {}
    for impl in ("cpp", "reference"):
        wi, codes, err = w.clone(), torch.full_like(w, -7.0), torch.full_like(w, -7.0)
        gptq_block(wi, u, scale, zero, levels, codes, err, start, stop, mode, qmin, qmax, impl=impl)
        outs[impl] = (wi, codes, err)
    for a, r in zip(outs["cpp"], outs["reference"]):
        assert torch.equal(a, r)
    wi, codes, _ = outs["cpp"]
    assert torch.equal(wi[:, :start], w[:, :start])  # columns before start untouched
    assert torch.equal(codes[:, stop:], torch.full_like(codes[:, stop:], -7.0))


@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 24), groups=st.integers(1, 3), group=st.sampled_from([32, 64]),
       cfg=st.sampled_from(["int4", "int4_sym", "int8", "nf4", "fp4_e2m1"]), seed=st.integers(0, 2**16))
def test_identity_hessian_is_the_grids_round_to_nearest(rows, groups, group, cfg, seed):
    """With ``u = I`` no error propagates: the kernel's codes are the grid's own rounding."""
    config = {
        "int4": torchq.int4_weight_only(group_size=group),
        "int4_sym": torchq.IntxWeightOnlyConfig(bits=4, group_size=group, symmetric=True),
        "int8": torchq.Int8WeightOnlyConfig(group_size=group),
        "nf4": torchq.nf4_weight_only(group),
        "fp4_e2m1": torchq.fp4_weight_only("e2m1", group),
    }[cfg]
    k = groups * group
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    grid = grid_for(config, (rows, k))
    wb = grid.blocked(w)
    s, z = grid.fit(wb)
    rule = grid.column_rule()
    per_col = lambda p: None if p is None else p.repeat_interleave(group, dim=1).contiguous()  # noqa: E731
    codes, err = torch.zeros_like(w), torch.zeros_like(w)
    gptq_block(w.clone(), torch.eye(k), per_col(s), per_col(z), rule.levels, codes, err, 0, k, rule.mode, rule.qmin, rule.qmax)
    assert torch.equal(rule.codes(codes), grid.quantize(wb, s, z).reshape(rows, k))
    assert torch.equal(err, w - grid.fake(wb, s, z).reshape(rows, k))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(w=torch.zeros(4, 8, dtype=torch.float64)), "w must be a contiguous float32"),
        (dict(u=torch.zeros(7, 7)), r"u must be .*\(8, 8\)"),
        (dict(scale=torch.zeros(8, 4).t()), "not contiguous"),
        (dict(stop=9), "start <= stop <= 8"),
        (dict(zero=None), "needs zero"),
        (dict(mode="nearest"), "unknown GPTQ rounding mode"),
    ],
)
def test_bad_arguments_raise_clearly(change, message):
    args = dict(w=torch.zeros(4, 8), u=torch.eye(8), scale=torch.ones(4, 8), zero=torch.zeros(4, 8), levels=None,
                codes=torch.zeros(4, 8), err=torch.zeros(4, 8), start=0, stop=8, mode="int", qmin=0.0, qmax=15.0)
    args.update(change)
    with pytest.raises((RuntimeError, ValueError), match=message):
        gptq_block(**args)


def test_route_is_explicit():
    assert cpu_gptq.gptq_block_route() == "cpp"
    with pytest.raises(ValueError, match="choose 'cpp' or 'reference'"):
        gptq_block(torch.zeros(1, 1), torch.eye(1), torch.ones(1, 1), None, None, torch.zeros(1, 1),
                   torch.zeros(1, 1), 0, 1, "none", -8.0, 7.0, impl="fast")


_CONFIGS = [torchq.int4_weight_only(group_size=32), torchq.nf4_weight_only(32), torchq.Int8WeightOnlyConfig()]
_OPTIONS = [dict(), dict(act_order=True, static_groups=True, mse_clip=True), dict(act_order=True),
            dict(block_size=24, mse_clip=True)]


@pytest.mark.parametrize(
    "config, options",
    [(c, o) for c in _CONFIGS for o in _OPTIONS
     if not (o == dict(act_order=True) and c.type_name == "nf4_weight_only")],  # (a stored perm needs an affine grid)
)
def test_gptq_is_the_same_on_either_route(monkeypatch, config, options):
    """Whole GPTQ roundings (groups split across blocks, act-order, MSE fits) agree bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    h = x.T @ x / 512
    grid = grid_for(config, w.shape)
    fast = gptq_quantize(w, h, grid, **options)
    monkeypatch.setattr(cpu_gptq, "gptq_block_route", lambda: "reference")
    ref = gptq_quantize(w, h, grid, **options)
    for a, r in zip(fast, ref):
        assert (a is None and r is None) or torch.equal(a, r)
