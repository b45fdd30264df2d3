"""Dev-only: SmolLM2 layer shapes at decode (M=1) and prefill (M=256), min latency per call
(hot cache, like a decode loop over 30 layers would see for small weights).
PYTHONPATH=. python benchmarks/dev/dev_small.py [threads]"""
import sys, time
import torch, torch.nn.functional as F
from torchq.formats import AffineQuantizedTensor
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
M_LIST = [int(m) for m in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1]
def best(fn, n=200):
    fn(); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); fn(); b = min(b, time.perf_counter() - s)
    return b * 1e6
for N, K in ((576, 576), (1536, 576), (576, 1536), (192, 576), (49152, 576)):
    w = torch.randn(N, K)
    ws = {"int4": AffineQuantizedTensor.from_float(w, scheme="int4_weight_only", bits=4, group_size=64, symmetric=False),
          "w4a8": AffineQuantizedTensor.from_float(w, scheme="w4a8", bits=4, group_size=64, symmetric=False),
          "w8a8": AffineQuantizedTensor.from_float(w, scheme="w8a8", bits=8, group_size=None, symmetric=True),
          "int8": AffineQuantizedTensor.from_float(w, scheme="int8_weight_only", bits=8, group_size=None, symmetric=True)}
    wb = w.bfloat16()
    for M in M_LIST:
        x = torch.randn(M, K)
        n = 200 if M == 1 and N < 10000 else 10
        r = {"fp32": best(lambda: F.linear(x, w), n), "bf16": best(lambda: F.linear(x.bfloat16(), wb), n)}
        for k, t in ws.items():
            r[k] = best(lambda: F.linear(x, t), n)
        print(f"{N}x{K} M={M}: " + "  ".join(f"{k}={v:.1f}us" for k, v in r.items()), flush=True)
