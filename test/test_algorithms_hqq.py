"""HQQ: data-free, lowers its proxy loss below round-to-nearest's on every grid."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import torchq
from torchq.algorithms.grid import grid_for
from torchq.algorithms.hqq import hqq_fit, proxy_loss

BASES = [
    torchq.int4_weight_only(group_size=64),
    torchq.int4_weight_only(group_size=32, zero_point_domain="float"),
    torchq.int4_weight_only(group_size=64, symmetric=True),
    torchq.intx_weight_only(bits=3, group_size=32),
    torchq.int8_dynamic_activation_int4_weight(group_size=64),
    torchq.nf4_weight_only(),
    torchq.fp4_weight_only(),
]


def _heavy_tailed(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n, k)) if seed is None else torch.randn(n, k, generator=g) ** 3


@pytest.mark.parametrize("p", [3.0, 0.7], ids=["search_p3", "half_quadratic_p0.7"])
@pytest.mark.parametrize("base", BASES, ids=lambda c: c.to_json())
def test_hqq_lowers_proxy_loss_vs_round_to_nearest(base, p):
    w = _heavy_tailed(64, 256)
    grid = grid_for(base, w.shape)
    wb = grid.blocked(grid.pad(w))
    s0, z0 = grid.fit(wb)
    s, z = hqq_fit(grid, wb, p=p)
    rtn, hqq = proxy_loss(grid, wb, s0, z0, p), proxy_loss(grid, wb, s, z, p)
    assert (hqq <= rtn).all()
    assert hqq.sum() < 0.995 * rtn.sum(), (hqq.sum(), rtn.sum())


def test_hqq_search_keeps_the_extremes_a_sparse_proxy_clips():
    """The default p = 3 search barely moves a group's largest weight (what SmolLM2's
    perplexity needs); a weight-MSE or p < 1 clipping search would cut it down."""
    w = _heavy_tailed(64, 256)
    base = torchq.int4_weight_only(group_size=64)
    grid = grid_for(base, w.shape)
    wb = grid.blocked(grid.pad(w))
    s0, z0 = grid.fit(wb)
    s, z = hqq_fit(grid, wb)
    top = wb.abs().argmax(-1, keepdim=True)
    err = lambda s_, z_: (wb - grid.fake(wb, s_, z_)).gather(-1, top).abs()  # noqa: E731
    assert err(s, z).mean() <= 1.05 * err(s0, z0).mean()
    from torchq.algorithms.gptq import fit_mse

    sm, zm = fit_mse(grid, wb, tuple(1.0 - 0.05 * i for i in range(11)))
    assert err(sm, zm).mean() > 1.1 * err(s, z).mean()


def test_hqq_lp_norm_is_validated():
    with pytest.raises(ValueError, match="lp_norm"):
        torchq.HQQ(torchq.int4_weight_only(), lp_norm=0)
    with pytest.raises(ValueError, match="lp_norm"):
        torchq.HQQ(torchq.int4_weight_only(), lp_norm=9)
    assert torchq.HQQ(torchq.int4_weight_only()).lp_norm == 3.0


@settings(deadline=None, max_examples=10)
@given(n=st.integers(1, 24), k=st.sampled_from([32, 48, 64, 200]), group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 50))
def test_hqq_model_shapes(n, k, group, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    w = lin.weight.detach().clone()
    report = torchq.quantize_(lin, torchq.HQQ(torchq.int4_weight_only(group_size=group)))
    assert report.layers[0].config == "hqq"
    q = lin.weight
    assert isinstance(q, torchq.AffineQuantizedTensor) and q.shape == (n, k)
    grid = grid_for(torchq.int4_weight_only(group_size=group), w.shape)
    wb = grid.blocked(grid.pad(w))
    deq = grid.blocked(grid.pad(q.dequantize()))
    # the stored tensor holds exactly what hqq_fit chose, whose proxy loss is <= RTN's
    s0, z0 = grid.fit(wb)
    rtn = (wb - grid.fake(wb, s0, z0)).abs().pow(3).sum()
    assert (wb - deq)[..., : k].abs().pow(3).sum() <= rtn * 1.0001 + 1e-6 or k % group
