"""Dev-only quick timing of the C++ kernels vs dense / aten baselines (not the harness).

    PYTHONPATH=. python benchmarks/dev/dev_kernels.py [N K] [--m 1,32,256] [--only int4_fp32,...]
"""
import argparse, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dev_timing import bench, dram_gbps, flush
import torchq
from torchq.formats import AffineQuantizedTensor

p = argparse.ArgumentParser()
p.add_argument("shape", nargs="*", type=int, default=[11008, 4096])
p.add_argument("--m", default="1,32,256")
p.add_argument("--only", default="")
p.add_argument("--reps", type=int, default=9)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--g", type=int, default=128)
a = p.parse_args()
torch.set_num_threads(a.threads)
N, K = a.shape
torch.manual_seed(0)
w = torch.randn(N, K)
def q(scheme, bits, g, sym=False):
    return AffineQuantizedTensor.from_float(w, scheme=scheme, bits=bits, group_size=g, symmetric=sym)
W = {
  "int4": q("int4_weight_only", 4, a.g), "w4a8": q("w4a8", 4, a.g), "w8a8": q("w8a8", 8, None),
  "int8": q("int8_weight_only", 8, None),
}
W["w8a8"] = AffineQuantizedTensor.from_float(w, scheme="w8a8", bits=8, group_size=None, symmetric=True)
W["int8"] = AffineQuantizedTensor.from_float(w, scheme="int8_weight_only", bits=8, group_size=None, symmetric=True)
for k, v in W.items():
    assert v.kernel.startswith("cpu."), (k, v.kernel)
_unused = {
}
wb = w.bfloat16()
aten = torch.ops.aten
qi = torch.randint(0, 16, (N, K), dtype=torch.int32)
packed = aten._convert_weight_to_int4pack_for_cpu(qi, 8)
sz = torch.randn(K // a.g, N, 2).bfloat16()
bw = dram_gbps()
print(f"{N}x{K} threads={a.threads} DRAM {bw:.1f} GB/s")
for M in [int(m) for m in a.m.split(",")]:
    x = torch.randn(M, K); xb = x.bfloat16()
    cases = {
        "bf16_dense": lambda: F.linear(xb, wb),
        "int4_fp32": lambda: F.linear(x, W["int4"]),
        "int4_bf16": lambda: F.linear(xb, W["int4"]),
        "aten_int4_bf16": lambda: aten._weight_int4pack_mm_for_cpu(xb, packed, a.g, sz),
        "w4a8": lambda: F.linear(x, W["w4a8"]),
        "w8a8": lambda: F.linear(x, W["w8a8"]),
        "int8_fp32": lambda: F.linear(x, W["int8"]),
    }
    if M == 1: cases["fp32_dense"] = lambda: F.linear(x, w)
    res = {}
    for name, fn in cases.items():
        if a.only and name not in a.only.split(","): continue
        reps = a.reps if M <= 32 else max(3, a.reps // 3)
        res[name] = bench(fn, reps=reps)
        bw = max(bw, dram_gbps(1))
    line = []
    for name, t in res.items():
        extra = ""
        key = name.split("_")[0]
        if M == 1 and key in W:
            roof = W[key].nbytes_quantized / (bw * 1e9)
            extra = f" ({roof / t * 100:.0f}% roof)"
        line.append(f"{name}={t*1e3:.3f}ms{extra}")
    print(f"M={M} DRAM~{bw:.1f}GB/s: " + "  ".join(line), flush=True)
