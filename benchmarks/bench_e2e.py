"""End-to-end generation speed on SmolLM2-135M: torchq's fused decoder against transformers
and llama.cpp, side by side in one run, at 1 and 2 threads.

::

    python benchmarks/bench_e2e.py                    # every engine, 1 and 2 threads (a few minutes)
    python benchmarks/bench_e2e.py --threads 2 --background-load
    python benchmarks/bench_e2e.py --readme           # also rewrite this CPU kind's README / RESULTS section

Engines (each row runs in its own child process, so its peak RSS is its own):

* ``hf fp32`` / ``hf int4 g32``: transformers eager with a dynamic cache (float weights;
  torchq int4 g32 weights), one forward per token.
* ``fused <scheme>``: ``torchq.generate``'s path (torchq.runtime): one native call and one
  parallel region per token, static fp32 KV cache. Models are torchq checkpoints written
  once by the parent, loaded with ``torchq.from_pretrained``.
* ``fused int4 g32 bf16-KV``: the same with a bf16 KV cache (llama.cpp's default cache is f16).
* ``fused int4 g32 int8-act``: ``torchq.generate(..., activations="int8")``, the
  explicit option that runs int4 weight-only layers as W4A8 (llama.cpp's Q4_0 path also
  quantizes activations to 8 bits).
* ``fused gguf q4_0``: torchq running the very Q4_0 GGUF file that llama.cpp runs.
* ``llama.cpp q4_0`` / ``llama.cpp (package file)``: ``llama-cpp-python`` (optional extra
  ``bench-llamacpp``; it compiles llama.cpp on install, about 10 min on 2 cores, so it is
  never a CI dependency). Without it those rows are skipped and only the
  transformers-relative ratios are printed.

Every engine runs once per round and the rounds interleave (``--rounds``, default 3); each
figure is the best of its rounds, so slow drift of a shared host hits every engine alike.
Metrics: prefill of a 512-token prompt (best of 3), decode tok/s at depth 0 (1-token prompt)
and at depth 512 (after the prompt): the median of 32 greedy steps; peak RSS of the child
process (model load included) and, in parentheses, its RSS before the model loads (Python and
the engine's libraries: torch + transformers for torchq and transformers rows). ``--background-load`` adds rows measured while another
process spins on one core (the spin-then-yield barrier must not collapse).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))



def _common():
    """benchmarks.common (imports torch: parent process only, never a llama.cpp child)."""
    from benchmarks import common

    return common

PROMPT = 512
STEPS = 32
CACHE_DIR = Path(os.environ.get("TORCHQ_BENCH_CACHE", Path.home() / ".cache" / "torchq" / "bench_e2e"))
#: scheme name -> torchq config expression (the fused rows)
SCHEMES = {
    "int4 g32": "torchq.int4_weight_only(group_size=32)",
    "w4a8 g32": "torchq.int8_dynamic_activation_int4_weight(group_size=32)",
    "int8": "torchq.int8_weight_only()",
}
ANCHOR = "<!-- bench_e2e:tables-end -->"


# ---------------------------------------------------------------------- preparation (parent)
def _source_gguf() -> str:
    from torchq.apps.demo import smollm2_gguf_path

    return smollm2_gguf_path()


def prepare(log=print) -> dict[str, str]:
    """Torchq checkpoints of every scheme and the Q4_0 GGUF, written once into CACHE_DIR."""
    import torch  # noqa: F401
    import torchq
    from torchq.interop.gguf import GGUFFile

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    src = _source_gguf()
    key = f"{os.path.getsize(src)}-{torchq.__version__}"
    paths = {name: str(CACHE_DIR / f"smollm2-{name.replace(' ', '_')}-{key}") for name in SCHEMES}
    paths["gguf q4_0"] = str(CACHE_DIR / f"smollm2-q4_0-{key}.gguf")
    paths["source"] = src
    missing = [n for n, p in paths.items() if n != "source" and not os.path.exists(p)]
    if missing:
        f = GGUFFile(src)
        tok = f.tokenizer()
        fp32, _ = f.model(keep_quantized=False)
        import copy

        for name in missing:
            t0 = time.perf_counter()
            m = copy.deepcopy(fp32)
            if name == "gguf q4_0":
                torchq.quantize_(m, torchq.int4_weight_only(group_size=32, symmetric=True))
                torchq.save_gguf(m, paths[name], tokenizer=tok)
            else:
                torchq.quantize_(m, eval(SCHEMES[name], {"torchq": torchq}))
                torchq.save_pretrained(m, paths[name], tokenizer=tok)
            log(f"prepared {name}: {paths[name]} ({time.perf_counter() - t0:.0f} s)")
    return paths


# ---------------------------------------------------------------------- workers (children)
def _peak_rss_mb() -> float:
    """This process's peak resident size: VmHWM, the high-water mark of its own memory map.
    (``ru_maxrss`` survives ``execve`` on Linux, so a worker would report the parent's peak
    when the parent was larger at fork time.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids() -> list[int]:
    """The 512 prompt tokens (held-out text, SmolLM2's tokenizer), computed by the parent."""
    from torchq.apps.eval import default_text
    from torchq.interop.gguf import GGUFFile

    tokenizer = GGUFFile(_source_gguf()).tokenizer()
    ids = tokenizer(default_text(20000), add_special_tokens=False).input_ids
    return [int(t) for t in ids[:PROMPT]]


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(prefill, step, ids: list[int]) -> dict[str, float]:
    """prefill(ids) -> next token (fresh cache); step(tok, pos) -> next token."""
    times = []
    nxt = None
    for _ in range(3):
        t0 = time.perf_counter()
        nxt = prefill(ids)
        times.append(time.perf_counter() - t0)
    out = {"prefill_tok_s": len(ids) / min(times)}
    steps = []
    pos = len(ids)
    for i in range(STEPS):
        t0 = time.perf_counter()
        nxt = step(nxt, pos + i)
        steps.append(time.perf_counter() - t0)
    out["decode_d512"] = 1 / statistics.median(steps)
    nxt = prefill(ids[:1])
    steps = []
    for i in range(STEPS):
        t0 = time.perf_counter()
        nxt = step(nxt, 1 + i)
        steps.append(time.perf_counter() - t0)
    out["decode_d0"] = 1 / statistics.median(steps)
    return out


def _run_hf(model, ids: list[int]) -> dict[str, float]:
    import torch

    from torchq.apps.bench import cache_argument

    arg = cache_argument(model)
    state: dict[str, Any] = {}

    def forward(ids):
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{arg: state.get("cache")})
        state["cache"] = getattr(out, "cache", None) or out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(ids):
        state["cache"] = None
        return forward(ids)

    with torch.inference_mode():
        return _measure(prefill, lambda tok, pos: forward([tok]), ids)


def _run_fused(model, ids: list[int], kv_dtype=None, activations: str = "auto") -> dict[str, float]:
    import torch

    from torchq.runtime import FusedDecoder

    decoder = FusedDecoder.for_model(model, PROMPT + STEPS + 8, activations)
    k, v = decoder.new_cache(PROMPT + STEPS + 8, kv_dtype or torch.float32)

    def prefill(ids):
        t = torch.tensor(ids)
        logits = None
        for s in range(0, len(ids), 256):  # as torchq.generate does
            logits = decoder.step(t[s : s + 256], k, v, s)
        return int(logits.argmax())

    def step(tok, pos):
        return int(decoder.step(torch.tensor([tok]), k, v, pos).argmax())

    with torch.inference_mode():
        return _measure(prefill, step, ids)


def _run_llamacpp(path: str, threads: int, ids: list[int]) -> dict[str, float]:
    import llama_cpp

    n_ctx = PROMPT + STEPS + 16  # n_batch = n_ctx: llama-cpp-python keeps the last logits at row n_tokens - 1
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return int(llm.scores[llm.n_tokens - 1].argmax())

    def step(tok, pos):
        llm.eval([tok])
        return int(llm.scores[llm.n_tokens - 1].argmax())

    return _measure(prefill, step, ids)


def worker(engine: str, threads: int, paths: dict[str, str], ids: list[int]) -> dict[str, Any]:
    """One engine in this (child) process. llama.cpp rows import neither torch nor torchq, so
    their RSS is llama.cpp's own; ``base_rss_mb`` is the RSS before the model loads (the
    interpreter and the engine's libraries)."""
    if engine.startswith("llama.cpp"):
        import llama_cpp  # noqa: F401

        base = _current_rss_mb()
        res = _run_llamacpp(paths["gguf q4_0"] if engine == "llama.cpp q4_0" else _source_gguf_path(paths), threads,
                            ids)
    else:
        import torch

        torch.set_num_threads(threads)
        import torchq
        import transformers  # noqa: F401
        from torchq.interop.gguf import GGUFFile

        base = _current_rss_mb()
        if engine == "hf fp32":
            model, _ = GGUFFile(_source_gguf_path(paths)).model(keep_quantized=False)
            res = _run_hf(model, ids)
        elif engine == "hf int4 g32":
            res = _run_hf(torchq.from_pretrained(paths["int4 g32"]), ids)
        elif engine == "fused int4 g32 int8-act":
            res = _run_fused(torchq.from_pretrained(paths["int4 g32"]), ids, activations="int8")
        elif engine == "fused int4 g32 bf16-KV":
            res = _run_fused(torchq.from_pretrained(paths["int4 g32"]), ids, torch.bfloat16)
        elif engine.startswith("fused "):
            res = _run_fused(torchq.from_pretrained(paths[engine[len("fused "):]]), ids)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
    res["peak_rss_mb"] = _peak_rss_mb()
    res["base_rss_mb"] = base
    return res


def _source_gguf_path(paths: dict[str, str]) -> str:
    return paths["source"]


def engines(have_llamacpp: bool) -> list[str]:
    out = ["hf fp32", "hf int4 g32"] + [f"fused {s}" for s in SCHEMES] + ["fused int4 g32 bf16-KV", "fused int4 g32 int8-act",
                                                                   "fused gguf q4_0"]
    if have_llamacpp:
        out += ["llama.cpp q4_0", "llama.cpp package file"]
    return out


def _have_llamacpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _llamacpp_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_child(engine: str, threads: int, paths: dict[str, str], load: bool) -> Optional[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(threads), "--paths", json.dumps(paths),
           "--ids", paths["ids_file"]]
    spin = _spinner() if load else None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    if out.returncode != 0:
        print(f"{engine} ({threads} threads) failed:\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- report
def table(records: list[dict[str, Any]]) -> str:
    lines = ["| engine | threads | background load | prefill 512 tok/s | decode tok/s, depth 0 | decode tok/s, depth 512 "
             "| peak RSS MB (before load) | decode d512 vs hf fp32 | decode d0 / d512 vs llama.cpp q4_0 |",
             "|" + "---|" * 9]
    base = {(r["threads"], r["load"]): r for r in records if r["engine"] == "hf fp32"}
    lcpp = {(r["threads"], r["load"]): r for r in records if r["engine"] == "llama.cpp q4_0"}
    for r in records:
        key = (r["threads"], r["load"])
        b = base.get(key) or base.get((r["threads"], False))
        lc = lcpp.get(key)
        vs_hf = f"{r['decode_d512'] / b['decode_d512']:.1f}x" if b else "-"
        vs_lc = (f"{r['decode_d0'] / lc['decode_d0']:.2f}x / {r['decode_d512'] / lc['decode_d512']:.2f}x"
                 if lc else "-")
        lines.append(
            f"| {r['engine']} | {r['threads']} | {'1 core busy' if r['load'] else '-'} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_d0']:.1f} | {r['decode_d512']:.1f} | {r['peak_rss_mb']:.0f} ({r.get('base_rss_mb', 0):.0f}) | "
            f"{vs_hf} | {vs_lc} |"
        )
    return "\n".join(lines)


def targets(records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, same run: fused int4 g32 against llama.cpp Q4_0."""
    out = []
    for r in [r for r in records if r["engine"].startswith("fused") and not r["load"]]:
        lc = next((x for x in records if x["engine"] == "llama.cpp q4_0" and x["threads"] == r["threads"]
                   and not x["load"]), None)
        if lc is None:
            continue
        checks = [("decode depth 0", r["decode_d0"] / lc["decode_d0"], 1.0),
                  ("decode depth 512", r["decode_d512"] / lc["decode_d512"], 1.0),
                  ("prefill 512", r["prefill_tok_s"] / lc["prefill_tok_s"], 1.0),
                  ("peak RSS (lower is better)", lc["peak_rss_mb"] * 1.3 / r["peak_rss_mb"], 1.0)]
        parts = [f"{n} {v:.2f}x {'MET' if v >= t else 'NOT MET'}" for n, v, t in checks]
        out.append(f"{r['engine']}, {r['threads']} threads vs llama.cpp q4_0: " + "; ".join(parts))
    return out


def _command_line(argv: list[str]) -> str:
    """The command that produced a table, without ``--json PATH`` (a local file)."""
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--json="):
            skip = False
            continue
        if a == "--json":
            skip = True
            continue
        kept.append(a)
    return " ".join(["python benchmarks/bench_e2e.py"] + kept)


def markdown(res: dict[str, Any]) -> str:
    kind, title = _common().cpu_kind(res["machine"])
    lines = [f"#### {title}", "", _common().machine_summary(res["machine"]), "",
             f"SmolLM2-135M-Instruct, prompt {PROMPT} tokens, {STEPS} greedy steps per decode figure "
             f"(median step), best of {res.get('rounds', 1)} interleaved rounds; llama-cpp-python {res.get('llama_cpp') or 'not installed'}; "
             f"`{res.get('command', 'python benchmarks/bench_e2e.py')}`.", "", table(res["records"]), ""]
    lines += [f"- {t}" for t in res["targets"]] or ["- llama.cpp not installed: no llama.cpp rows"]
    lines += ["", "Peak RSS includes what the process holds before loading the model (in parentheses): "
              "torch + transformers for torchq, the interpreter for llama-cpp-python, whose own peak includes its "
              "(n_batch x vocab) fp32 logits array. The host is shared: compare rows of one run only."]
    return "\n".join(lines) + "\n"


def update_readme(res: dict[str, Any]) -> None:
    kind, _ = _common().cpu_kind(res["machine"])
    readme = REPO / "README.md"
    text = readme.read_text()
    text = _common().upsert_marked_section(text, f"bench_e2e:{kind}", markdown(res), ANCHOR)
    readme.write_text(text)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--engines", default=None, help="comma-separated subset of the engines")
    p.add_argument("--background-load", action="store_true", help="also measure with one core kept busy")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best speed of each is kept (default 3)")
    p.add_argument("--readme", action="store_true", help="rewrite this CPU kind's README section")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        ids = json.loads(Path(args.ids).read_text())
        print(json.dumps(worker(args.worker, int(args.threads), json.loads(args.paths), ids)))
        return 0
    paths = prepare()
    ids_file = CACHE_DIR / "prompt_ids.json"
    ids_file.write_text(json.dumps(prompt_ids()))
    paths["ids_file"] = str(ids_file)
    names = engines(_have_llamacpp())
    if args.engines:
        names = [n for n in names if n in args.engines.split(",")]
    best: dict[tuple, dict[str, Any]] = {}
    for rnd in range(args.rounds):  # rounds interleave the engines: host drift hits all of them alike
        for threads in [int(t) for t in args.threads.split(",")]:
            for load in [False, True] if args.background_load and threads > 1 else [False]:  # one busy core of two
                for engine in names:
                    if load and not (engine in ("fused int4 g32", "llama.cpp q4_0", "hf fp32")):
                        continue
                    r = run_child(engine, threads, paths, load)
                    if r is None:
                        continue
                    print(f"{engine:<24} {threads}t{' +load' if load else '      '} round {rnd + 1} prefill "
                          f"{r['prefill_tok_s']:7.0f} tok/s  decode d0 {r['decode_d0']:6.1f}  d512 "
                          f"{r['decode_d512']:6.1f} tok/s  RSS {r['peak_rss_mb']:.0f} MB", flush=True)
                    key = (engine, threads, load)
                    if key not in best:
                        best[key] = dict(r, engine=engine, threads=threads, load=load)
                        continue
                    b = best[key]  # best speed of the rounds, worst RSS
                    for m in ("prefill_tok_s", "decode_d0", "decode_d512"):
                        b[m] = max(b[m], r[m])
                    b["peak_rss_mb"] = max(b["peak_rss_mb"], r["peak_rss_mb"])
    records = list(best.values())
    res = {"machine": _common().machine_info(), "records": records, "llama_cpp": _llamacpp_version(),
           "rounds": args.rounds,
           "command": _command_line(argv if argv is not None else sys.argv[1:])}
    res["targets"] = targets(records)
    print()
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.readme:
        update_readme(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
