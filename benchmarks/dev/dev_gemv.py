"""Dev-only M=1 (decode) GEMV timing of the C++ kernels, hot and cache-flushed, every scheme
(not the harness). Cases are timed interleaved rep by rep; min / median ms are printed, and
the % of the DRAM roofline (weight + scale bytes / read bandwidth sampled in the run).

    PYTHONPATH=. python benchmarks/dev/dev_gemv.py [--shapes 4096x4096,576x576] [--threads 1,2]
        [--only int4_fp32,nf4] [--reps 15] [--huge both|on|off]

--huge both times every weight twice: its buffers copied into plain 4 KiB-page memory
("/4k") and into transparent-huge-page memory ("/thp"), to measure the placement alone.
--ab times four variants of every weight in one run, interleaved: "/old" (4 KiB pages, no
software prefetch: the code before both), "/pf" (prefetch only), "/thp" (huge pages
only), "/new" (both: the default).
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dev_timing import dram_gbps, flush  # noqa: E402

from torchq import Codebook4Tensor  # noqa: E402
from torchq.formats import AffineQuantizedTensor  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="4096x4096,11008x4096,576x576,1536x576")
p.add_argument("--threads", default="1,2")
p.add_argument("--only", default="")
p.add_argument("--reps", type=int, default=15)
p.add_argument("--huge", default="off", choices=["off", "on", "both"])
p.add_argument("--ab", action="store_true")
a = p.parse_args()

try:
    from torchq.kernels.hugepages import empty_huge
except ImportError:
    empty_huge = None


def placed(t, huge):
    """Copy of weight tensor t whose plain-tensor buffers live in 4 KiB or huge-page memory."""
    def cp(x):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        if huge:
            y = empty_huge(x.shape, x.dtype)
        else:
            y = torch.empty(x.shape, dtype=x.dtype)
            y.view(-1)[:: max(1, 4096 // y.element_size())] = 0  # touch with 4k pages
        y.copy_(x)
        return y
    names, ctx = t.__tensor_flatten__()
    inner = {n: cp(getattr(t, n)) for n in names}
    return type(t).__tensor_unflatten__(inner, ctx, t.shape, t.stride())


def weights(w):
    aq = AffineQuantizedTensor.from_float
    cb = Codebook4Tensor.from_float
    return {
        "int4_fp32": (lambda: aq(w, scheme="int4_weight_only", bits=4, group_size=64, symmetric=False), torch.float32),
        "int4_bf16": (lambda: aq(w, scheme="int4_weight_only", bits=4, group_size=64, symmetric=False), torch.bfloat16),
        "int8_fp32": (lambda: aq(w, scheme="int8_weight_only", bits=8, group_size=None, symmetric=True), torch.float32),
        "w4a8": (lambda: aq(w, scheme="w4a8", bits=4, group_size=64, symmetric=False), torch.float32),
        "w8a8": (lambda: aq(w, scheme="w8a8", bits=8, group_size=None, symmetric=True), torch.float32),
        "nf4": (lambda: cb(w, scheme="nf4"), torch.float32),
        "nf4_dq": (lambda: cb(w, scheme="nf4", double_quant=True), torch.float32),
        "fp4_bnb": (lambda: cb(w, scheme="fp4_e2m1_bnb"), torch.float32),
        "fp4_e2m1": (lambda: cb(w, scheme="fp4_e2m1"), torch.float32),
    }


def nbytes(t):
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names
               if n not in ("lut", "dq_code", "act_scale", "perm") and getattr(t, n) is not None)


bw = dram_gbps()
print(f"DRAM {bw:.1f} GB/s; min/median ms over {a.reps} interleaved reps; roof% = bytes/bw/min_cold")
for shape in a.shapes.split(","):
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    cases = {}
    for name, (make, dt) in weights(w).items():
        if a.only and name not in a.only.split(","):
            continue
        t = make()
        variants = {"": (t, -1)} if a.huge == "off" and not a.ab else {}
        if a.huge in ("on", "both"):
            variants["/thp"] = (placed(t, True), -1)
        if a.huge == "both":
            variants["/4k"] = (placed(t, False), -1)
        if a.ab:
            t4k, thp = placed(t, False), placed(t, True)
            variants.update({"/old": (t4k, 0), "/pf": (t4k, -1), "/thp": (thp, 0), "/new": (thp, -1)})
        x = torch.randn(1, k, dtype=dt)
        for suf, (wt, pfd) in variants.items():
            cases[name + suf] = (lambda x=x, wt=wt: F.linear(x, wt), nbytes(t), pfd)
    for thr in (int(v) for v in a.threads.split(",")):
        torch.set_num_threads(thr)
        res = {c: {"hot": [], "cold": []} for c in cases}
        for fn, *_ in cases.values():
            fn(); fn()
        for _ in range(a.reps):
            for c, (fn, _, pfd) in cases.items():
                torch.ops.torchq._tune("prefetch_distance", pfd)
                for mode in ("hot", "cold"):
                    if mode == "cold":
                        flush()
                    else:
                        fn()
                    t0 = time.perf_counter(); fn(); res[c][mode].append(time.perf_counter() - t0)
        torch.ops.torchq._tune("prefetch_distance", -1)
        torch.set_num_threads(2)
        bw = max(bw * 0.9, dram_gbps(2))
        torch.set_num_threads(thr)
        print(f"## {shape} threads={thr} DRAM~{bw:.1f} GB/s")
        for c, r in res.items():
            hb, hm = min(r["hot"]) * 1e3, statistics.median(r["hot"]) * 1e3
            cbst, cm = min(r["cold"]) * 1e3, statistics.median(r["cold"]) * 1e3
            roof = cases[c][1] / (bw * 1e9) * 1e3
            print(f"{c:14s} hot {hb:7.3f} / {hm:7.3f}   cold {cbst:7.3f} / {cm:7.3f}   roof {roof / cbst * 100:4.0f}%", flush=True)
