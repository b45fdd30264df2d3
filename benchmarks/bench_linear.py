"""Linear-layer benchmark: dense, every torchq scheme and the peers, side by side, one run.

For each weight shape (N x K) and token count M it times ``y = x @ W^T`` per row of
:mod:`benchmarks.linear_rows` (cache flushed before every call, 2 threads by default) and
reports median latency, effective weight GB/s, SQNR against fp32 dense, the fraction of the
DRAM roofline (weight+scale bytes / read bandwidth measured in the same run) and the speedup
over bf16 dense eager. Writes a markdown table (stdout and ``--out``), a JSON and a PNG;
``--readme`` also rewrites, for this kind of CPU only (AVX2, AVX-512, AMX: its best torchq
kernel path), README.md's summary table, the full tables in benchmarks/RESULTS.md and the
committed plot; other CPUs' tables are kept.

    python benchmarks/bench_linear.py                 # full run (~13 min on 2 busy cores)
    python benchmarks/bench_linear.py --quick         # < 1 min smoke run
    python benchmarks/bench_linear.py --shapes 11008x4096 --m 1,32 --rows "int4" --threads 1,2

Methodology and caveats: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: import this checkout's torchq and benchmarks
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import (
    BandwidthProbe,
    CacheFlusher,
    llc_bytes,
    machine_info,
    cpu_kind,
    machine_summary,
    sqnr_db,
    upsert_marked_section,
    time_call,
    use_threads,
)
from benchmarks.linear_rows import ACT_DTYPES, BASELINE, ROWS, Row, ShapeContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (N, K): Llama-7B-class projections, then SmolLM2-135M's own (q/o, up/gate, down, LM head).
SHAPES: list[tuple[int, int]] = [
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (576, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
]
MS = (1, 8, 32, 256)
QUICK_SHAPES = [(4096, 4096), (1536, 576)]
QUICK_MS = (1, 32)
HEADLINE_SHAPE = (11008, 4096)
SECTION = "bench_linear"
#: the line before which a new CPU kind's section is inserted (README.md and RESULTS.md)
TABLES_END = "<!-- bench_linear:tables-end -->"
RESULTS = os.path.join("benchmarks", "RESULTS.md")
PLOT_COMMITTED = "benchmarks/bench_linear_{kind}.png"


# ---------------------------------------------------------------------- command line
def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxK (e.g. 11008x4096)")
    return int(m.group(1)), int(m.group(2))


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need positive integers")
    return values


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], help="NxK list (default: all 7)")
    p.add_argument("--m", type=_ints, help="token counts M (default 1,8,32,256)")
    p.add_argument("--rows", help="comma-separated substrings (case-insensitive) selecting rows, e.g. 'dense,int4'")
    p.add_argument("--quick", action="store_true", help=f"smoke run: shapes {QUICK_SHAPES}, M {QUICK_MS}, small budget")
    p.add_argument("--threads", type=_ints, default=(2,), help="thread counts, e.g. 1,2 to compare (default 2)")
    p.add_argument("--repeat", type=int, help="max timed calls per cell (default 10, quick 5)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per cell (default 0.4, quick 0.1)")
    p.add_argument("--max-call-s", type=float, help="skip a cell whose call is predicted slower (default 3 s, quick 0.5)")
    p.add_argument("--flush-mib", type=int, help="cache flush buffer (default max(128, 4 x LLC))")
    p.add_argument("--bw-mib", type=int, default=1024, help="bandwidth probe tensor size (default 1 GiB)")
    p.add_argument("--bw-threads", type=int, default=2, help="threads of the bandwidth probe (default 2)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--readme", nargs="?", const=os.path.join(REPO, "README.md"), help="rewrite this README's section")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-json", help="measure nothing: re-render table, plot and README from a saved JSON")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    args.m = args.m or (QUICK_MS if args.quick else MS)
    args.repeat = args.repeat or (5 if args.quick else 10)
    args.budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.4)
    args.max_call_s = args.max_call_s if args.max_call_s is not None else (0.5 if args.quick else 3.0)
    if args.flush_mib is None:
        args.flush_mib = max(128, 4 * (llc_bytes() or 0) // 2**20)
    return args


def select_rows(spec: Optional[str]) -> list[Row]:
    if not spec:
        return list(ROWS)
    wanted = [s.strip().lower() for s in spec.split(",") if s.strip()]
    rows = [r for r in ROWS if any(w in r.key.lower() for w in wanted)]
    if not rows:
        raise SystemExit(f"--rows {spec!r} matches no row; rows: {[r.key for r in ROWS]}")
    return rows


# ---------------------------------------------------------------------- measuring
@dataclass
class Record:
    """One (shape, M, row, threads) cell."""

    shape: str
    n: int
    k: int
    m: int
    row: str
    act: str
    family: str
    threads: int
    status: str  # ok | skipped | error
    kernel: str = ""
    weight_bytes: int = 0
    note: str = ""
    prepare_s: Optional[float] = None  # quantize / pack / compile-wrap time of this row at this shape
    ms: Optional[float] = None
    min_ms: Optional[float] = None
    samples_ms: list[float] = field(default_factory=list)
    sqnr_db: Optional[float] = None
    gbps: Optional[float] = None
    roofline_ms: Optional[float] = None
    roofline_frac: Optional[float] = None
    speedup_vs_bf16: Optional[float] = None

    @property
    def key(self) -> str:
        return f"{self.row} [{self.act}]"


def _predict(history: list[tuple[int, float]], m: int) -> Optional[float]:
    """Seconds per call at ``m`` from earlier M (line through the last two points)."""
    if not history:
        return None
    if len(history) == 1:  # one point says nothing about the slope: assume flat
        return history[0][1]
    (m0, t0), (m1, t1) = history[-2:]
    slope = max((t1 - t0) / (m1 - m0), 0.0)
    return t1 + slope * (m - m1)


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:200]


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Measure every selected row at every shape, M and thread count; return the results dict."""
    rows = select_rows(args.rows)
    info = machine_info()
    flusher = CacheFlusher(args.flush_mib)
    probe = BandwidthProbe(args.bw_mib, threads=args.bw_threads)
    gen = torch.Generator().manual_seed(args.seed)
    records: list[Record] = []
    loads: list[float] = []
    not_run: dict[str, str] = {}
    freezing_before = torch._inductor.config.freezing
    torch._inductor.config.freezing = True  # only the compiled dense row compiles anything
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for n, k in args.shapes:
                shape = f"{n}x{k}"
                weight = torch.randn(n, k, generator=gen) / math.sqrt(k)
                ctx = ShapeContext(weight)
                prepared, prepare_s = {}, {}
                for row in rows:
                    reason = row.unavailable()
                    if reason is None:
                        try:
                            t0 = time.perf_counter()
                            prepared[row.key] = row.prepare(ctx, ACT_DTYPES[row.act])
                            prepare_s[row.key] = time.perf_counter() - t0
                            continue
                        except Exception as exc:  # a peer that cannot run here: say why, keep going
                            reason = _error(exc)
                    not_run.setdefault(row.key, reason)
                    records += [
                        Record(shape, n, k, m, row.name, row.act, row.family, t, "error", note=reason)
                        for m in args.m
                        for t in args.threads
                    ]
                history: dict[tuple[str, int], list[tuple[int, float]]] = {}
                for m in args.m:
                    bw = probe.sample()
                    loads.append(os.getloadavg()[0])
                    x = torch.randn(m, k, generator=gen)
                    ref = x @ weight.t()
                    log(f"[{time.perf_counter() - started:6.1f}s] {shape} M={m}  (bandwidth sample {bw:.1f} GB/s)")
                    for row in rows:
                        p = prepared.get(row.key)
                        if p is None:
                            continue
                        for t in args.threads:
                            rec = Record(shape, n, k, m, row.name, row.act, row.family, t, "ok", p.kernel, p.weight_bytes,
                                         p.note, prepare_s[row.key])
                            records.append(rec)
                            hist = history.setdefault((row.key, t), [])
                            guess = _predict(hist, m)
                            if guess is not None and guess > args.max_call_s:
                                rec.status = "skipped"
                                rec.note = f"~{guess:.1f} s/call predicted (> --max-call-s {args.max_call_s:g})"
                                continue
                            try:
                                inp = p.make_input(x.to(ACT_DTYPES[row.act]))
                                with use_threads(t):
                                    if p.compiles:
                                        p.fn(inp)
                                    timing = time_call(p.fn, inp, flusher, repeat=args.repeat, budget_s=args.budget)
                                y = p.to_output(timing.output, inp)
                            except Exception as exc:
                                rec.status, rec.note = "error", _error(exc)
                                continue
                            rec.samples_ms = [s * 1e3 for s in timing.samples]
                            rec.ms = timing.median * 1e3
                            rec.min_ms = min(rec.samples_ms)
                            rec.sqnr_db = sqnr_db(y.reshape(ref.shape), ref)
                            rec.gbps = p.weight_bytes / timing.median / 1e9
                            hist.append((m, timing.median))
                del ctx, prepared, weight
                torch._dynamo.reset()
                gc.collect()
    finally:
        torch._inductor.config.freezing = freezing_before
    bandwidth = probe.gbps
    _finish(records, bandwidth)
    return {
        "machine": info,
        "bandwidth": {
            "gbps_median": bandwidth,
            "samples_gbps": probe.samples,
            "tensor_mib": args.bw_mib,
            "threads": args.bw_threads,
            "huge_page_fraction": probe.huge_fraction,
        },
        "settings": {
            "shapes": [f"{n}x{k}" for n, k in args.shapes],
            "m": list(args.m),
            "threads": list(args.threads),
            "repeat": args.repeat,
            "budget_s": args.budget,
            "max_call_s": args.max_call_s,
            "flush_mib": args.flush_mib,
            "seed": args.seed,
            "torchq_kernel_env": os.environ.get("TORCHQ_KERNEL"),
            "wall_s": time.perf_counter() - started,
        },
        "host_load": {"loadavg_1min_samples": loads, "cores": info["cores"]},
        "not_run": not_run,
        "records": [asdict(r) | {"key": r.key} for r in records],
    }


def _finish(records: list[Record], bandwidth_gbps: float) -> None:
    """Roofline fractions (against the run's median bandwidth) and speedups over bf16 dense."""
    base = {
        (r.shape, r.m, r.threads): r.ms
        for r in records
        if (r.row, r.act) == BASELINE and r.ms is not None
    }
    for r in records:
        if r.ms is None:
            continue
        r.roofline_ms = r.weight_bytes / (bandwidth_gbps * 1e9) * 1e3
        r.roofline_frac = r.roofline_ms / r.ms
        b = base.get((r.shape, r.m, r.threads))
        r.speedup_vs_bf16 = b / r.ms if b else None


# ---------------------------------------------------------------------- rendering
def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    s = _fmt_ms(r["ms"])
    if r["speedup_vs_bf16"] is not None and (r["row"], r["act"]) != BASELINE:
        s += f" ({r['speedup_vs_bf16']:.2g}x)"
    return s


def _sqnr(values: list[float]) -> str:
    if not values:
        return ""
    v = statistics.median(values)
    return "exact" if math.isinf(v) else f"{v:.1f}"


def _row_order(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["key"], None)
    return list(seen)


def shape_table(records: list[dict], shape: str, threads: int, ms: list[int]) -> str:
    """Markdown table of one shape: a row per benchmark row, a latency column per M."""
    recs = [r for r in records if r["shape"] == shape and r["threads"] == threads]
    by = {(r["key"], r["m"]): r for r in recs}
    m0 = ms[0]
    head = ["row", "act", "kernel", "MB", "SQNR dB"]
    head += [f"M={m} ms" for m in ms[:1]] + [f"M={m0} GB/s", f"M={m0} % roof"] + [f"M={m} ms" for m in ms[1:]]
    head += ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in _row_order(recs):
        cells = [by.get((key, m)) for m in ms]
        anyr = next(c for c in cells if c is not None)
        first = cells[0]
        ok = [c for c in cells if c and c["status"] == "ok"]
        notes = list(dict.fromkeys(c["note"] for c in cells if c and c["note"] and c["status"] != "skipped"))
        skipped = [c for c in cells if c and c["status"] == "skipped"]
        if skipped:  # the first skip says why; later ones follow from it
            notes.append(f"M={skipped[0]['m']}: {skipped[0]['note']}")
        gbps = f"{first['gbps']:.1f}" if first and first["gbps"] else ""
        roof = f"{100 * first['roofline_frac']:.0f}%" if first and first["roofline_frac"] else ""
        line = [anyr["row"], anyr["act"], anyr["kernel"], f"{anyr['weight_bytes'] / 1e6:.1f}" if anyr["weight_bytes"] else ""]
        line += [_sqnr([c["sqnr_db"] for c in ok if c["sqnr_db"] is not None])]
        line += [_cell(cells[0]), gbps, roof] + [_cell(c) for c in cells[1:]] + ["; ".join(notes)]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def scaling_table(records: list[dict], shape: str, ms: list[int], t_lo: int, t_hi: int) -> str:
    """Time at ``t_lo`` threads / time at ``t_hi`` threads, per row and M."""
    by = {(r["key"], r["m"], r["threads"]): r for r in records if r["shape"] == shape}
    head = ["row", "act"] + [f"M={m}" for m in ms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in _row_order([r for r in records if r["shape"] == shape]):
        cells = []
        for m in ms:
            lo, hi = by.get((key, m, t_lo)), by.get((key, m, t_hi))
            ok = lo and hi and lo["ms"] and hi["ms"]
            cells.append(f"{lo['ms'] / hi['ms']:.2f}x" if ok else "")
        row = next(r for r in records if r["key"] == key)
        lines.append("| " + " | ".join([row["row"], row["act"]] + cells) + " |")
    return "\n".join(lines)


def _load_line(res: dict[str, Any]) -> str:
    loads, cores = res["host_load"]["loadavg_1min_samples"], res["host_load"]["cores"]
    if not loads:
        return ""
    med = statistics.median(loads)
    line = f"Host load average during the run: median {med:.1f}, max {max(loads):.1f} on {cores} cores."
    if cores and med > cores:
        line += (" **The host was busy (other processes competed for the cores): absolute times are inflated "
                 "and noisy, multi-threaded calls suffer most; compare rows only within this run.**")
    return line + "\n\n"


def _header(res: dict[str, Any]) -> str:
    bw, st = res["bandwidth"], res["settings"]
    samples = bw["samples_gbps"]
    kernel_env = f" TORCHQ_KERNEL={st['torchq_kernel_env']}." if st["torchq_kernel_env"] else ""
    return (
        f"Machine: {machine_summary(res['machine'])}.\n\n"
        + _load_line(res)
        + f"DRAM read bandwidth (sum over {bw['tensor_mib']} MiB, {bw['threads']} threads, "
        f"{bw.get('huge_page_fraction', 0):.0%} of it in transparent huge pages like torchq's packed weights), "
        f"{len(samples)} samples "
        f"interleaved with the kernels: **median {bw['gbps_median']:.1f} GB/s** (min {min(samples):.1f}, "
        f"max {max(samples):.1f}). Cache flushed ({st['flush_mib']} MiB buffer) before every timed call; "
        f"median of up to {st['repeat']} calls, about {st['budget_s']:g} s of calls per cell.{kernel_env}\n\n"
        "Cells: median ms (speedup over bf16 dense eager at the same M; >1 is faster). MB: weight + scale "
        "bytes read per call. % roof: time at the DRAM roofline (MB / median bandwidth) / measured time. "
        "SQNR: output vs fp32 dense (median over M)."
    )


def render_markdown(res: dict[str, Any], shapes: Optional[list[str]] = None, fold: bool = False) -> str:
    """The full report: header, then a table per shape (and thread count)."""
    st, recs = res["settings"], res["records"]
    shapes = shapes or st["shapes"]
    parts = [_header(res)]
    headline = f"{HEADLINE_SHAPE[0]}x{HEADLINE_SHAPE[1]}"
    if fold and headline in shapes:  # the headline shape open and first, the others folded
        shapes = [headline] + [s for s in shapes if s != headline]
    # folded (README): the most threads first, only its headline shape open
    threads = sorted(st["threads"], reverse=True) if fold else st["threads"]
    for t in threads:
        for shape in shapes:
            title = f"{shape} (N x K), {t} thread{'s' if t > 1 else ''}"
            table = shape_table(recs, shape, t, st["m"])
            if fold and (shape != headline or t != threads[0]) and len(shapes) * len(threads) > 1:
                parts.append(f"<details><summary>{title}</summary>\n\n{table}\n\n</details>")
            else:
                parts.append(f"#### {title}\n\n{table}")
    if len(st["threads"]) > 1:
        lo, hi = min(st["threads"]), max(st["threads"])
        for shape in shapes:
            title = f"Thread scaling {shape}: time at {lo} / time at {hi} threads"
            table = scaling_table(recs, shape, st["m"], lo, hi)
            if fold and shape != headline:
                parts.append(f"<details><summary>{title}</summary>\n\n{table}\n\n</details>")
            else:
                parts.append(f"#### {title}\n\n{table}")
    if res["not_run"]:
        parts.append("Rows that did not run:\n\n" + "\n".join(f"- {k}: {v}" for k, v in res["not_run"].items()))
    return "\n\n".join(parts) + "\n"


def full_markdown(res: dict[str, Any]) -> str:
    """Every cell as one line (all M): latency, GB/s, roofline, SQNR, speedup."""
    head = ["shape", "M", "threads", "row", "act", "kernel", "status", "ms", "min ms", "GB/s", "% roof", "SQNR dB", "x bf16", "calls", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["records"]:
        ok = r["status"] == "ok"
        lines.append("| " + " | ".join([
            r["shape"], str(r["m"]), str(r["threads"]), r["row"], r["act"], r["kernel"], r["status"],
            _fmt_ms(r["ms"]) if ok else "", _fmt_ms(r["min_ms"]) if ok else "", f"{r['gbps']:.1f}" if ok else "",
            f"{100 * r['roofline_frac']:.0f}%" if ok else "",
            _sqnr([r["sqnr_db"]]) if ok else "",
            f"{r['speedup_vs_bf16']:.2f}" if ok and r["speedup_vs_bf16"] else "",
            str(len(r["samples_ms"])), r["note"],
        ]) + " |")
    return _header(res) + "\n\n" + "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> None:
    """Latency relative to bf16 dense eager, per shape, against M (one line per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, recs = res["settings"], res["records"]
    t = max(st["threads"])
    shapes = st["shapes"]
    keys = _row_order(recs)
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.6 * nrows), squeeze=False)
    colors = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("tab20b").colors)
    styles = {"dense": "-", "torchq": "-", "peer": "--"}
    handles = {}
    for ax, shape in zip(axes.flat, shapes):
        for i, key in enumerate(keys):
            pts = sorted(
                (r["m"], 1 / r["speedup_vs_bf16"])
                for r in recs
                if r["key"] == key and r["shape"] == shape and r["threads"] == t and r["speedup_vs_bf16"]
            )
            if not pts:
                continue
            fam = next(r["family"] for r in recs if r["key"] == key)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(fam, "-"), marker="o", ms=3,
                              color=colors[i % len(colors)], lw=2.2 if fam == "torchq" else 1.2, label=key)
            handles.setdefault(key, line)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(st["m"], [str(m) for m in st["m"]])
        ax.set_title(f"{shape} (N x K)", fontsize=10)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time / bf16 dense eager")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    bw = res["bandwidth"]["gbps_median"]
    fig.suptitle(f"Linear latency relative to bf16 dense eager (lower is better), {t} threads, "
                 f"{res['machine']['cpu']}, DRAM {bw:.0f} GB/s, {res['machine']['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=70, bbox_inches="tight")
    plt.close(fig)


def plot_name(res: dict[str, Any]) -> str:
    """The committed plot of this run's kind of CPU (repository-relative)."""
    return PLOT_COMMITTED.format(kind=cpu_kind(res["machine"])[0])


def readme_section(res: dict[str, Any]) -> str:
    """README.md: the headline shape at the most threads, for this run's kind of CPU."""
    kind, title = cpu_kind(res["machine"])
    st = res["settings"]
    headline = f"{HEADLINE_SHAPE[0]}x{HEADLINE_SHAPE[1]}"
    shape = headline if headline in st["shapes"] else st["shapes"][0]
    t = max(st["threads"])
    return (
        f"#### {title}: {res['machine']['cpu']}, {shape} (N x K), {t} thread{'s' if t > 1 else ''}\n\n"
        + _header(res)
        + "\n\n"
        + shape_table(res["records"], shape, t, st["m"])
        + f"\n\nEvery shape and thread count: [benchmarks/RESULTS.md](benchmarks/RESULTS.md#{kind}).\n"
    )


def results_section(res: dict[str, Any]) -> str:
    """benchmarks/RESULTS.md: every table of the run, for this run's kind of CPU."""
    kind, title = cpu_kind(res["machine"])
    return (
        f'<a id="{kind}"></a>\n\n## {title}: {res["machine"]["cpu"]}\n\n'
        "Generated by `python benchmarks/bench_linear.py --readme`; methodology in "
        "[README.md](README.md). Only ratios within one run mean anything: "
        "the host is shared and its bandwidth drifts.\n\n"
        + render_markdown(res, fold=True)
        + f"\n![linear latency relative to bf16 dense]({os.path.basename(plot_name(res))})\n"
    )


def _json_safe(v: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_outputs(res: dict[str, Any], out_dir: str, with_plot: bool = True) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "markdown": os.path.join(out_dir, "bench_linear.md"),
        "full": os.path.join(out_dir, "bench_linear_full.md"),
        "json": os.path.join(out_dir, "bench_linear.json"),
    }
    with open(paths["markdown"], "w") as f:
        f.write(render_markdown(res))
    with open(paths["full"], "w") as f:
        f.write(full_markdown(res))
    with open(paths["json"], "w") as f:
        json.dump(_json_safe(res), f, indent=1)
    if with_plot:
        paths["plot"] = os.path.join(out_dir, "bench_linear.png")
        plot(res, paths["plot"])
    return paths


def update_readme(res: dict[str, Any], readme: str, plot_path: Optional[str]) -> None:
    """Rewrite this kind of CPU's sections of ``readme`` and of benchmarks/RESULTS.md beside it
    (created if missing), and its committed plot; other kinds' sections stay as they are."""
    root = os.path.dirname(os.path.abspath(readme))
    section = f"{SECTION}:{cpu_kind(res['machine'])[0]}"
    results = os.path.join(root, RESULTS)
    for path, body in ((readme, readme_section(res)), (results, results_section(res))):
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            text = "# Linear-layer benchmark results, one section per kind of CPU\n\n" + TABLES_END + "\n"
        text = upsert_marked_section(text, section, body, TABLES_END)
        with open(path, "w") as f:
            f.write(text)
    if plot_path:
        shutil.copyfile(plot_path, os.path.join(root, plot_name(res)))


def load_json(path: str) -> dict[str, Any]:
    """Results written by :func:`write_outputs` (non-finite floats restored)."""
    with open(path) as f:
        res = json.load(f)
    for r in res["records"]:
        for name, v in r.items():
            if isinstance(v, str) and v in ("inf", "-inf", "nan"):
                r[name] = float(v)
    return res


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        res = load_json(args.from_json)
    else:
        res = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(render_markdown(res))
    paths = write_outputs(res, args.out, with_plot=not args.no_plot)
    if args.readme:
        update_readme(res, args.readme, paths.get("plot"))
        paths["readme"] = args.readme
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
