"""Speed and memory of a causal LM: prefill and decode tokens/s, peak RSS, size on disk.

* prefill: one forward over the prompt that fills the KV cache and returns only the last
  position's logits (what ``generate`` does); best of ``repeats`` runs after a warm-up.
* decode: greedy, one token per forward with the KV cache, up to ``new_tokens`` tokens in
  all (fewer when ``max_decode_seconds`` runs out, so slow reference kernels do not stall a
  demo); tokens/s = 1 / the median time of a decode step (after one warm-up step when
  compiling): on a shared host a few steps stall when another process takes a core, and the
  median keeps those out for every model alike. The greedy continuation is returned as a
  text sample.
* peak RSS: the process's resident-set high-water mark during the benchmark (Linux
  ``VmHWM``, reset first through ``/proc/self/clear_refs``; elsewhere the lifetime peak).
* ``compile=True`` runs the same loops through ``torch.compile(model.forward)`` with a
  transformers ``StaticCache`` (fixed shapes: a growing dynamic cache would recompile at
  every step); the first prefill and decode calls' time is reported as compile time.

On a shared host only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import inspect
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchq.interop.model_io import model_size_bytes

__all__ = ["BenchResult", "bench", "peak_rss_mb", "reset_peak_rss", "linear_dispatch_overhead"]


@dataclass
class BenchResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int  # decode steps timed
    size_mb: float
    peak_rss_mb: float
    compiled: bool
    compile_seconds: Optional[float]
    sample: str

    def __str__(self) -> str:
        comp = f", compile {self.compile_seconds:.1f} s" if self.compiled else ""
        return (
            f"prefill {self.prefill_tokens_per_s:.1f} tok/s ({self.prompt_tokens} tokens), decode "
            f"{self.decode_tokens_per_s:.2f} tok/s ({self.new_tokens} tokens), size {self.size_mb:.1f} MB, "
            f"peak RSS {self.peak_rss_mb:.0f} MB{comp}"
        )


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class _Decoder:
    """One forward per call with a KV cache: transformers' default dynamic cache in eager
    mode, a ``StaticCache`` sized for the whole run when compiled (fixed shapes)."""

    def __init__(self, model: nn.Module, compile: bool, max_tokens: int):
        self.model, self.static, self.max_tokens = model, compile, max_tokens
        # The model does not change during a benchmark, so its ~1000 module and parameter guards
        # (3.9 ms per decoded token on SmolLM2) need not be re-checked at every call.
        self.forward = (torch.compile(model.forward, options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
                        if compile else model.forward)
        self.cache, self.pos = None, 0
        self.cache_arg = cache_argument(model)

    def reset(self) -> None:
        if self.static:
            from transformers import StaticCache

            if self.cache is None:
                self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_tokens)
            self.cache.reset()
        else:
            self.cache = None
        self.pos = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (1, T); return the greedy next token (1, 1)."""
        n = ids.shape[1]
        # explicit positions: deriving them from the cache would guard on its length
        extra = {"position_ids": torch.arange(self.pos, self.pos + n).unsqueeze(0)} if self.static else {}
        # a static cache allocates its tensors on first use: do that call eagerly, so that no
        # graph is compiled for the uninitialized cache
        fresh = self.static and not self.cache.is_initialized
        forward = self.model.forward if fresh else self.forward
        extra[self.cache_arg] = self.cache
        out = forward(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
        self.cache, self.pos = _returned_cache(out), self.pos + n
        return out.logits[:, -1].argmax(-1, keepdim=True)


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there, removal announced for 5.40), else
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _FusedDecoder:
    """The same protocol through torchq's fused decoder (torchq.runtime): one native call per
    step, static KV cache."""

    def __init__(self, model: nn.Module, max_tokens: int):
        from torchq.runtime import FusedDecoder

        self.decoder = FusedDecoder.for_model(model, max_tokens)
        self.max_tokens = max_tokens
        self.k, self.v = self.decoder.new_cache(max_tokens)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        logits = None
        for start in range(0, n, 256):  # as torchq.generate prefills
            logits = self.decoder.step(ids[0, start : start + 256], self.k, self.v, self.pos + start)
        self.pos += n
        return logits.argmax().reshape(1, 1)


def bench(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    prompt_tokens: Optional[int] = None,
    new_tokens: int = 32,
    repeats: int = 2,
    max_prefill_seconds: Optional[float] = None,
    max_decode_seconds: Optional[float] = None,
    compile: bool = False,
    fused: bool = False,
) -> BenchResult:
    """Benchmark ``model`` on ``prompt`` (truncated or repeated to ``prompt_tokens`` tokens).

    ``max_prefill_seconds`` / ``max_decode_seconds`` stop the prefill repeats / decode steps
    once that much time is spent (at least one timed run / step each), so that a slow model
    costs seconds, not minutes; a fast one runs them all. ``fused=True`` runs prefill and
    decode through torchq's fused decoder step (the path of ``torchq.generate``).
    """
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if prompt_tokens is not None:
        reps = -(-prompt_tokens // ids.shape[1])
        ids = ids.repeat(1, reps)[:, :prompt_tokens]
    if fused and compile:
        raise ValueError("fused=True runs torchq's native decoder step; it is not compiled (compile=False)")
    length = ids.shape[1] + new_tokens + 1
    decoder = _FusedDecoder(model, length) if fused else _Decoder(model, compile, length)
    reset_peak_rss()
    compile_seconds = None
    with torch.inference_mode():
        ids = ids.clone()  # an inference tensor, like every later input (no recompile on the dispatch keys)
        t0 = time.perf_counter()
        decoder.reset()
        nxt = decoder.step(ids)  # warm-up of prefill (a static cache is allocated by an eager call)
        if compile:  # and the compile of prefill
            decoder.reset()
            nxt = decoder.step(ids)
        first = time.perf_counter() - t0
        times: list[float] = []
        while len(times) < max(1, repeats):
            t0 = time.perf_counter()
            decoder.reset()
            nxt = decoder.step(ids)
            times.append(time.perf_counter() - t0)
            if max_prefill_seconds is not None and sum(times) > max_prefill_seconds:
                break
        generated = [int(nxt)]
        first_decode = 0.0
        if compile:  # eager decoding has no one-time cost worth a warm-up step
            t0 = time.perf_counter()
            nxt = decoder.step(nxt)
            first_decode = time.perf_counter() - t0
            generated.append(int(nxt))
        step_times: list[float] = []
        start = time.perf_counter()
        while len(generated) < new_tokens:
            t0 = time.perf_counter()
            nxt = decoder.step(nxt)
            generated.append(int(nxt))
            step_times.append(time.perf_counter() - t0)
            if max_decode_seconds is not None and time.perf_counter() - start > max_decode_seconds:
                break
    if compile:
        compile_seconds = first + first_decode
    return BenchResult(
        prefill_tokens_per_s=ids.shape[1] / min(times),
        decode_tokens_per_s=1.0 / statistics.median(step_times) if step_times else float("nan"),
        prompt_tokens=ids.shape[1],
        new_tokens=len(step_times),
        size_mb=model_size_bytes(model) / 2**20,
        peak_rss_mb=peak_rss_mb(),
        compiled=compile,
        compile_seconds=compile_seconds,
        sample=tokenizer.decode(generated, skip_special_tokens=True),
    )


def linear_dispatch_overhead(weight: torch.Tensor, iters: int = 2000) -> dict[str, float]:
    """Microseconds per call of the layers around a quantized linear, at M=1.

    * ``dispatch``: ``F.linear`` on the quantized weight with a kernel that does nothing
      (``__torch_function__``, op-table lookup, checks, ``get_kernel``): pure overhead;
    * ``kernel``: the weight's own kernel called directly;
    * ``total``: ``F.linear`` on the weight (dispatch + kernel);
    * ``dense``: ``F.linear`` on the dequantized float weight, for scale.
    """
    from torchq.formats.dispatch import LinearKernel, register_kernel, get_kernel

    n, k = weight.shape
    x = torch.randn(1, k, dtype=weight.dtype)
    out = torch.empty(1, n, dtype=weight.dtype)
    register_kernel(LinearKernel("bench.noop", "__dispatch_probe__", weight.quant_layout, lambda x_, w_, b_: out))
    probe = weight._rebuild(kernel="bench.noop")
    dense = weight.dequantize()
    kernel = get_kernel(weight.kernel).linear

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        n = max(3, min(iters, int(0.5 / max(once, 1e-7))))  # about half a second per measurement
        for _ in range(min(20, n)):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    with torch.inference_mode():
        return {
            "dispatch": timed(lambda: F.linear(x, probe)),
            "kernel": timed(lambda: kernel(x, weight, None)),
            "total": timed(lambda: F.linear(x, weight)),
            "dense": timed(lambda: F.linear(x, dense)),
        }
