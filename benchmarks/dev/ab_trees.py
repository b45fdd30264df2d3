"""Dev-only A/B timing of the C++ kernels of two source trees (e.g. before and after a
kernel refactor), hot cache, one thread. Each round runs one child process per tree, the
trees alternating, so the host's load hits both alike; the best time per case over the
rounds is kept. Children import torchq from the tree given (PYTHONPATH).

    python benchmarks/dev/ab_trees.py TREE_A TREE_B [--rounds 5] [--n 2048] [--k 2048] [--only bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [  # (name, config factory source, M, activation dtype, TORCHQ_TUNE or isa=TORCHQ_ISA)
    *[(f"int4 g32 M={m}", "torchq.int4_weight_only(group_size=32)", m, "float32", "") for m in (1, 2, 3, 4)],
    *[(f"int4 g128 M={m}", "torchq.int4_weight_only(group_size=128)", m, "float32", "") for m in (1, 4)],
    *[(f"nf4 M={m}", "torchq.nf4_weight_only()", m, "float32", "") for m in (1, 2, 3, 4)],
    ("int4 g32 M=64 (fp32 GEMM)", "torchq.int4_weight_only(group_size=32)", 64, "float32", ""),
    ("nf4 M=64 (fp32 GEMM)", "torchq.nf4_weight_only()", 64, "float32", ""),
    ("int4 g32 M=64 bf16 (bf16 GEMM)", "torchq.int4_weight_only(group_size=32)", 64, "bfloat16", "bf16_emulate=1"),
    *[(f"scalar {s} M={m}", f"torchq.{s}", m, "float32", "isa=scalar") for s in ("int4_weight_only(group_size=32)",
      "nf4_weight_only()") for m in (1, 4, 64)],
]

CHILD = r"""
import json, sys, time, torch, torchq
torch.set_num_threads(1)
torch.set_float32_matmul_precision("highest")
n, k, cases = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for name, cfg, m, dt in cases:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    torchq.quantize_(lin, eval(cfg))
    x = torch.randn(m, k).to(getattr(torch, dt))
    lin = lin.to(x.dtype) if dt != "float32" else lin
    f = lambda: torch.nn.functional.linear(x, lin.weight)
    for _ in range(5):
        f()
    best = 1e9
    reps = max(20, int(2e8 / (n * k * m)))
    for _ in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    out[name] = best
print(json.dumps(out))
"""


def run(tree: str, n: int, k: int, cases: list, tune: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    if tune.startswith("isa="):
        env["TORCHQ_ISA"] = tune[4:]
    elif tune:
        env["TORCHQ_TUNE"] = tune
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), json.dumps(cases)], env=env, cwd=tree,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{tree}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = p.parse_args()
    cases = [c for c in CASES if args.only in c[0]]
    groups: dict[str, list] = {}
    for name, cfg, m, dt, tune in cases:
        groups.setdefault(tune, []).append([name, cfg, m, dt])
    best = {t: {} for t in (args.a, args.b)}
    for r in range(args.rounds):
        for tree in ((args.a, args.b) if r % 2 == 0 else (args.b, args.a)):
            for tune, batch in groups.items():
                for name, t in run(tree, args.n, args.k, batch, tune).items():
                    best[tree][name] = min(best[tree].get(name, 1e9), t)
    print(f"{'case':34s} {'A us':>9s} {'B us':>9s} {'B/A':>6s}   ({args.n}x{args.k}, 1 thread, best of {args.rounds})")
    for name, *_ in cases:
        a, b = best[args.a][name] * 1e6, best[args.b][name] * 1e6
        print(f"{name:34s} {a:9.1f} {b:9.1f} {b / a:6.3f}")


if __name__ == "__main__":
    main()
