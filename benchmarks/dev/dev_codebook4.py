"""Dev-only timing of the NF4 / FP4 CPU kernel vs torchq int4 (g64) and bitsandbytes' CPU
4-bit path (not the benchmark harness). Kernels are timed interleaved, rep by rep, so a
shared machine's load hits them alike; min and 10th percentile are reported.

    PYTHONPATH=. python benchmarks/dev/dev_codebook4.py [--shapes 4096x4096,11008x4096] [--m 1,32]
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dev_timing import dram_gbps, flush  # noqa: E402

from torchq import Codebook4Tensor  # noqa: E402
from torchq.formats import AffineQuantizedTensor  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="4096x4096,11008x4096")
p.add_argument("--m", default="1,32")
p.add_argument("--reps", type=int, default=15)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--no-bnb", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)

bnb = None
if not a.no_bnb:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        pass

print(f"threads={a.threads} DRAM {dram_gbps():.1f} GB/s  (min/10th-percentile ms over {a.reps} interleaved cold-cache reps; ratio to int4_g64)")
for shape in a.shapes.split(","):
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    int4 = AffineQuantizedTensor.from_float(w, scheme="int4_weight_only", bits=4, group_size=64, symmetric=False)
    weights = {
        "int4_g64": int4,
        "nf4": Codebook4Tensor.from_float(w, scheme="nf4"),
        "nf4_dq": Codebook4Tensor.from_float(w, scheme="nf4", double_quant=True),
        "fp4_e2m1": Codebook4Tensor.from_float(w, scheme="fp4_e2m1"),
    }
    if bnb is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    for m in (int(v) for v in a.m.split(",")):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dt)
            cases = {name: (lambda t=t: F.linear(x, t)) for name, t in weights.items()}
            times = {name: [] for name in cases}
            for fn in cases.values():
                fn()
            for _ in range(a.reps):
                for name, fn in cases.items():
                    flush()
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            if bnb is not None:  # ~100x slower: a few reps are enough
                times["bnb_nf4"] = []
                for _ in range(3):
                    flush()
                    t0 = time.perf_counter()
                    bnb.matmul_4bit(x, packed.t(), quant_state=state)
                    times["bnb_nf4"].append(time.perf_counter() - t0)
            # min and 10th percentile: robust to the preemption of a shared machine
            best = {name: min(v) * 1e3 for name, v in times.items()}
            q10 = {name: sorted(v)[len(v) // 10] * 1e3 for name, v in times.items()}
            row = "  ".join(
                f"{name} {best[name]:.2f}/{q10[name]:.2f} ({best[name] / best['int4_g64']:.2f}x/{q10[name] / q10['int4_g64']:.2f}x)"
                for name in times
            )
            print(f"{n}x{k} M={m} {str(dt).removeprefix('torch.'):<8} {row}")
    print("kernels:", {name: t.kernel for name, t in weights.items()})
