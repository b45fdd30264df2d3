"""Dev-only: single-thread hot-cache throughput (GMAC/s) of each kernel path vs MKL sgemm,
to tune compute efficiency on a noisy shared host. PYTHONPATH=. python benchmarks/dev/dev_hot.py [M ...]"""
import sys, time
import torch, torch.nn.functional as F
from torchq.formats import AffineQuantizedTensor
torch.set_num_threads(1)
N, K = 1024, 2048
w = torch.randn(N, K)
def mk(s, b, g, sym): return AffineQuantizedTensor.from_float(w, scheme=s, bits=b, group_size=g, symmetric=sym)
Ws = {"int4": mk("int4_weight_only", 4, 128, False), "w4a8": mk("w4a8", 4, 128, False),
      "w8a8": mk("w8a8", 8, None, True), "int8": mk("int8_weight_only", 8, None, True)}
for k, v in Ws.items():
    assert v.kernel.startswith("cpu."), (k, v.kernel)
def rate(fn, macs, t_min=0.2):
    fn(); n = 1
    while True:
        s = time.perf_counter()
        for _ in range(n): fn()
        d = time.perf_counter() - s
        if d > t_min: break
        n *= 2
    best = d / n
    for _ in range(4):
        s = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - s) / n)
    return macs / best / 1e9
a = torch.randn(256, 256); b = torch.randn(256, 256)
for M in [int(m) for m in sys.argv[1:]] or [1, 4, 32]:
    x = torch.randn(M, K); xb = x.bfloat16()
    r = {"mkl_sgemm256": rate(lambda: a @ b, 256**3)}
    for k, W in Ws.items():
        r[k] = rate(lambda: F.linear(x, W), M * N * K)
    r["int4_bf16"] = rate(lambda: F.linear(xb, Ws["int4"]), M * N * K)
    print(f"M={M}: " + "  ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
