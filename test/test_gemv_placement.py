"""M=1 GEMV memory-stream helpers: huge-page placement of the packed kernel-layout weights
(torchq/kernels/hugepages.py) and the software prefetch distance of the C++ GEMV loops.
Both are performance-only: the tests prove they take effect and change no result."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from torchq import Codebook4Tensor
from torchq.kernels import cpu_ext, hugepages
from torchq.formats import AffineQuantizedTensor

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="C++ CPU kernels not built")
ops = torch.ops.torchq
LINUX = sys.platform.startswith("linux")
THP = hugepages.thp_mode() in ("always", "madvise")
HUGE = 2 << 20


def int4(n, k, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.02
    return AffineQuantizedTensor.from_float(w, scheme="int4_weight_only", bits=4, group_size=64, symmetric=False)


def plain_copy(t):
    """The same weight with every inner tensor copied into ordinary memory."""
    names, ctx = t.__tensor_flatten__()
    inner = {n: getattr(t, n).clone() for n in names}
    return type(t).__tensor_unflatten__(inner, ctx, t.shape, t.stride())


@pytest.mark.skipif(not LINUX, reason="huge-page placement is Linux only")
def test_empty_huge_is_aligned_and_backed_by_huge_pages():
    t = hugepages.empty_huge((3 * HUGE + 100,), torch.uint8)
    assert t.shape == (3 * HUGE + 100,) and t.dtype == torch.uint8 and t.is_contiguous()
    assert t.data_ptr() % HUGE == 0
    t.fill_(7)  # first touch
    assert int(t.sum()) == 7 * t.numel()
    if THP:
        assert hugepages.huge_bytes(t) >= HUGE, "MADV_HUGEPAGE memory got no transparent huge page"
    f = hugepages.empty_huge((HUGE // 4, 2), torch.float32)
    assert f.shape == (HUGE // 4, 2) and f.dtype == torch.float32 and f.data_ptr() % HUGE == 0


@pytest.mark.skipif(not LINUX, reason="huge-page placement is Linux only")
def test_small_tensors_share_huge_page_arena_chunks():
    ts = [hugepages.empty_huge((100_000,), torch.uint8) for _ in range(400)]  # 40 MB: several chunks
    for i, t in enumerate(ts):
        t.fill_(i % 251)
    assert all(int(t[0]) == i % 251 and int(t[-1]) == i % 251 for i, t in enumerate(ts))
    assert ts[1].data_ptr() - ts[0].data_ptr() == 100_032  # carved one after the other, 64-byte aligned
    if THP:
        assert hugepages.huge_bytes(ts[0]) >= HUGE
    del ts  # chunks are unmapped with their last tensor (not observable here beyond not crashing)
    again = hugepages.empty_huge((50_000,), torch.float32)
    again.fill_(1.0)
    assert float(again.sum()) == 50_000


def test_empty_huge_falls_back_to_torch_empty():
    small = hugepages.empty_huge((1000,), torch.float32)  # under HUGE_MIN_BYTES
    assert small.shape == (1000,) and small.dtype == torch.float32
    meta = hugepages.empty_huge((4 * HUGE,), torch.uint8, device="meta")
    assert meta.device.type == "meta"
    code = (
        "import torch; from torchq.kernels import hugepages as h; assert not h.enabled(); "
        "t = h.empty_huge((8 << 20,), torch.uint8); t.fill_(1); assert t.numel() == 8 << 20; print('ok')"
    )
    env = {**__import__("os").environ, "TORCHQ_HUGEPAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(not (LINUX and THP), reason="needs transparent huge pages (always/madvise)")
def test_packed_weights_live_in_huge_pages_and_results_are_unchanged():
    w = int4(4096, 1024)  # qdata 2 MiB
    assert w.kernel == "cpu.int4_weight_only"
    assert w.qdata.data_ptr() % HUGE == 0 and hugepages.huge_bytes(w.qdata) >= HUGE
    plain = plain_copy(w)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 1024, dtype=dt)
        for m in (1, 3):
            assert torch.equal(F.linear(x[:m], w), F.linear(x[:m], plain))
    # copies and serialization round trips keep the values (copies are ordinary allocations)
    assert torch.equal(w.qdata.clone(), w.qdata)
    d = copy.deepcopy(w)
    x = torch.randn(1, 1024)
    assert torch.equal(F.linear(x, d), F.linear(x, w))
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)["w"]
    assert torch.equal(F.linear(x, back), F.linear(x, w))


@pytest.mark.skipif(not (LINUX and THP), reason="needs transparent huge pages (always/madvise)")
def test_codebook4_packed_weights_live_in_huge_pages():
    torch.manual_seed(0)
    w = Codebook4Tensor.from_float(torch.randn(4096, 1024) * 0.02, scheme="nf4")
    assert hugepages.huge_bytes(w.qdata) >= HUGE
    x = torch.randn(1, 1024)
    assert torch.equal(F.linear(x, w), F.linear(x, plain_copy(w)))


@pytest.mark.skipif(not (LINUX and THP), reason="needs transparent huge pages (always/madvise)")
def test_small_packed_weights_share_huge_pages():
    w = int4(576, 576)  # qdata 162 KiB: carved from an arena chunk
    assert hugepages.huge_bytes(w.qdata) >= HUGE
    x = torch.randn(2, 576)
    plain = plain_copy(w)
    for m in (1, 2):
        assert torch.equal(F.linear(x[:m], w), F.linear(x[:m], plain))


def test_prefetch_distance_is_tunable_and_changes_no_result():
    torch.manual_seed(1)
    wf = torch.randn(70, 256) * 0.02
    weights = [
        AffineQuantizedTensor.from_float(wf, scheme="int4_weight_only", bits=4, group_size=40, symmetric=False),
        AffineQuantizedTensor.from_float(wf, scheme="int8_weight_only", bits=8, group_size=None, symmetric=True),
        AffineQuantizedTensor.from_float(wf, scheme="w4a8", bits=4, group_size=40, symmetric=False),
        AffineQuantizedTensor.from_float(wf, scheme="w8a8", bits=8, group_size=None, symmetric=True),
        Codebook4Tensor.from_float(wf, scheme="nf4", block_size=64),
        Codebook4Tensor.from_float(wf, scheme="nf4", block_size=64, double_quant=True),
        Codebook4Tensor.from_float(wf, scheme="fp4_e2m1", block_size=64),
    ]
    x = torch.randn(2, 256)
    old = ops._tune("prefetch_distance", 0)
    try:
        base = [[F.linear(x[:m], w) for m in (1, 2)] for w in weights]
        for dist in (64, 4096, 1 << 20):
            ops._tune("prefetch_distance", dist)
            for w, b in zip(weights, base):
                for m, y in zip((1, 2), b):
                    assert torch.equal(F.linear(x[:m], w), y)
    finally:
        ops._tune("prefetch_distance", old)
    assert ops._tune("prefetch_distance", -1) == old  # -1 restores the default
    with pytest.raises(RuntimeError, match="prefetch_distance"):
        ops._tune("prefetch_dist", 1)
