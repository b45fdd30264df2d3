"""The ``torchq`` command line: quantize, evaluate and benchmark a causal LM.

Entry point ``torchq = "torchq.apps.cli:main"``; ``python -m torchq.apps.cli`` works too. Every
subcommand takes a *model source*: a GGUF file, a transformers model directory, or a
directory written by ``torchq quantize`` (see :mod:`torchq.interop.model_io`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from torchq.quantize.schemes import config_from_scheme, scheme_names

SCHEME_NAMES = tuple(scheme_names())
#: torchq convert --format (kept in step with torchq.interop.save.FORMAT_NAMES, plus gguf)
CONVERT_FORMATS = ("torchq", "gptq", "awq-gemm", "awq-gemv", "compressed-tensors", "gguf")

EPILOG = """\
examples:
  # quantize a transformers model to int4 (group 64) and save it
  torchq quantize ./SmolLM2-135M-Instruct ./smollm2-int4 --scheme int4 --group-size 64

  # calibrate: GPTQ rounding on 128 windows of 512 tokens of the built-in calibration text
  torchq quantize SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-gptq --scheme int4 --group-size 64 --algo gptq --calib-samples 128

  # import a GGUF file losslessly (its Q4_0/Q4_1/Q8_0 blocks become torchq tensors) and save it
  torchq quantize SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-q4_1

  # perplexity of a saved model, and perplexity + KL divergence of a scheme vs the float model
  torchq eval ./smollm2-int4
  torchq eval SmolLM2-135M-Instruct.Q4_1.gguf --scheme w8a8

  # prefill / decode speed, peak memory and size, eager and torch.compile
  torchq bench ./smollm2-int4 --compile

  # convert between checkpoint formats (GPTQ, AutoAWQ, compressed-tensors, torchq, GGUF)
  torchq convert ./smollm2-int4 ./smollm2-gptq --format gptq

schemes (--scheme, exact names): {schemes}
A model source is a .gguf file, a transformers model directory (config.json + weights),
or a directory written by `torchq quantize`.
"""


def _group_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size takes an integer (32, 64, 128 or 256), got {text!r}") from None


def _scheme(text: str) -> str:
    if text not in SCHEME_NAMES:
        raise argparse.ArgumentTypeError(f"unknown scheme {text!r}; valid schemes: {', '.join(SCHEME_NAMES)}")
    return text


def _add_scheme_args(p: argparse.ArgumentParser, required: bool, what: str) -> None:
    p.add_argument(
        "--scheme",
        type=_scheme,
        required=required,
        metavar="NAME",
        help=f"{what} One of: {', '.join(SCHEME_NAMES)}.",
    )
    p.add_argument(
        "--group-size",
        type=_group_size,
        default=None,
        metavar="G",
        help="weights per quantization group along the input dimension (32, 64, 128 or 256; default: the "
        "scheme's own). Layers whose input size is not a multiple are padded and reported.",
    )
    _add_algo_args(p)


def _add_algo_args(p: argparse.ArgumentParser) -> None:
    from torchq.algorithms.names import ALGORITHM_NAMES

    p.add_argument("--algo", choices=tuple(ALGORITHM_NAMES), default="rtn",
                   help="calibration algorithm wrapping --scheme (default rtn: round to nearest)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N",
                   help="calibration windows (default 128; text: the first two thirds of the pydoc topics, "
                        "minus paragraphs repeated in the eval third)")
    p.add_argument("--calib-seq-len", type=int, default=512, metavar="T", help="tokens per calibration window (default 512)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-layer quantization report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchq",
        description="Quantize, evaluate and benchmark causal language models with torchq (CPU first).",
        epilog=EPILOG.format(schemes=", ".join(SCHEME_NAMES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a model (or import a GGUF file) and save it",
        description="Quantize SOURCE with --scheme and save it to OUTPUT_DIR (safetensors + config.json + tokenizer). "
        "For a GGUF source without --scheme, its Q4_0/Q4_1/Q8_0 tensors are imported as they are (lossless); "
        "with --scheme it is dequantized first and quantized again.",
    )
    q.add_argument("source", help="model source: .gguf file or transformers model directory")
    q.add_argument("output_dir", help="directory to write (created if missing)")
    _add_scheme_args(q, required=False, what="Quantization scheme (required unless SOURCE is a GGUF file).")
    _add_common(q)

    e = sub.add_parser(
        "eval",
        help="perplexity (and KL divergence vs the float model) on held-out text",
        description="Perplexity of a model on a text; with --scheme, SOURCE is quantized in memory and also compared "
        "with its float self (KL divergence, top-1 agreement). Default text: the held-out part of Python's "
        "pydoc topics (see torchq.apps.eval).",
    )
    e.add_argument("source", help="model source")
    _add_scheme_args(e, required=False, what="Quantize SOURCE in memory with this scheme and compare with the float model.")
    e.add_argument("--reference", default=None, metavar="SOURCE", help="float model to compute KL divergence against")
    e.add_argument("--text", default=None, help="'pydoc' (default), a UTF-8 text file, or datasets:NAME[:CONFIG[:SPLIT]]")
    e.add_argument("--max-chars", type=int, default=60_000, help="use the first N characters of the text (default 60000)")
    e.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--windows", type=int, default=24, help="at most this many windows (default 24)")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    _add_common(e)

    b = sub.add_parser(
        "bench",
        help="prefill and decode tokens/s, peak memory and model size",
        description="Benchmark SOURCE (quantized in memory first with --scheme): prefill tokens/s, greedy decode "
        "tokens/s with a KV cache, peak RSS and model size; with --compile also through torch.compile.",
    )
    b.add_argument("source", help="model source")
    _add_scheme_args(b, required=False, what="Quantize SOURCE in memory with this scheme first.")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens to decode (default 32)")
    b.add_argument("--max-decode-seconds", type=float, default=None, help="stop decoding after this many seconds")
    b.add_argument("--compile", action="store_true", help="also benchmark torch.compile(model.forward)")
    _add_common(b)

    c = sub.add_parser(
        "convert",
        help="convert a checkpoint between torchq, GPTQ, AutoAWQ, compressed-tensors and GGUF",
        description="Load SOURCE with torchq.from_pretrained (GPTQ, AutoAWQ gemm/gemv, compressed-tensors or torchq "
        "directory, or a GGUF file; with --scheme a float model is quantized first) and write it to OUTPUT in "
        "--format. Codes are carried over as they are (no requantization); a weight the target cannot hold is "
        "an error naming the torchq config that it could hold.",
    )
    c.add_argument("source", help="checkpoint directory or .gguf file")
    c.add_argument("output", help="directory to write, or a .gguf path for --format gguf")
    c.add_argument("--format", required=True, choices=CONVERT_FORMATS, help="target format")
    c.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"), help="GPTQ zero-point convention (default gptq = v1)")
    _add_scheme_args(c, required=False, what="Quantize SOURCE with this scheme before writing.")
    _add_common(c)
    return parser


# ---------------------------------------------------------------------- commands
def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load(args, keep_quantized: bool):
    from torchq.interop.model_io import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.source, dtype=_dtype(args.dtype), keep_quantized=keep_quantized)
    print(f"loaded {args.source} ({loaded.kind}) in {time.perf_counter() - t0:.1f} s")
    if loaded.report is not None:
        print(loaded.report if args.verbose else loaded.report.summary())
    return loaded


def _config(args):
    from torchq.algorithms.names import with_algorithm

    return with_algorithm(getattr(args, "algo", "rtn"), config_from_scheme(args.scheme, args.group_size))


def _quantize(model, args, tokenizer=None):
    from torchq.algorithms.data import calibration_data
    from torchq.quantize.api import quantize_

    config = _config(args)
    calib = None
    if getattr(config, "needs_calibration", False):
        calib = calibration_data(tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    t0 = time.perf_counter()
    report = quantize_(model, config, calibration=calib)
    print(f"quantized with {args.scheme} ({config.to_json()}) in {time.perf_counter() - t0:.1f} s")
    print(report if args.verbose else report.summary())
    return config


def cmd_quantize(args) -> int:
    from torchq.interop.model_io import is_gguf_source, model_size_bytes, save_quantized

    if args.scheme is None and not is_gguf_source(args.source):
        raise SystemExit("torchq quantize: --scheme is required for a transformers model directory "
                         f"(valid schemes: {', '.join(SCHEME_NAMES)})")
    if args.algo != "rtn" and not args.scheme:
        raise SystemExit("torchq quantize: --algo needs --scheme (the storage format the algorithm rounds to)")
    _config(args) if args.scheme else None  # fail before loading
    loaded = _load(args, keep_quantized=args.scheme is None)
    config = _quantize(loaded.model, args, loaded.tokenizer) if args.scheme else None
    path = save_quantized(loaded.model, loaded.tokenizer, args.output_dir, quant_config=config, source=args.source)
    print(f"saved {path} ({model_size_bytes(loaded.model) / 2**20:.1f} MB of weights)")
    return 0


def cmd_eval(args) -> int:
    import copy

    from torchq.apps import eval as teval
    from torchq.interop.model_io import load_model

    if args.scheme:
        _config(args)  # fail before loading
    loaded = _load(args, keep_quantized=args.scheme is None)
    model, reference = loaded.model, None
    if args.scheme:
        reference = model
        model = copy.deepcopy(model)
        _quantize(model, args, loaded.tokenizer)
    elif args.reference:
        reference = load_model(args.reference, dtype=_dtype(args.dtype), keep_quantized=False).model
    text = teval.load_text(args.text, args.max_chars)
    windows = teval.token_windows(loaded.tokenizer, text, args.window, args.windows)
    print(f"text: {args.text or 'pydoc'} ({len(text)} characters) -> {windows.shape[0]} windows of {args.window} tokens")
    result = teval.evaluate(model, windows, reference, batch_size=args.batch_size)
    print(result)
    return 0


def cmd_bench(args) -> int:
    from torchq.apps.bench import bench

    if args.scheme:
        _config(args)
    loaded = _load(args, keep_quantized=args.scheme is None)
    if args.scheme:
        _quantize(loaded.model, args, loaded.tokenizer)
    prompt = _bench_prompt()
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        r = bench(loaded.model, loaded.tokenizer, prompt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  max_decode_seconds=args.max_decode_seconds, compile=compiled)
        print(f"{'compile' if compiled else 'eager  '}: {r}")
    print(f"sample: {r.sample!r}")
    return 0


def _bench_prompt() -> str:
    from torchq.apps.eval import default_text

    return default_text(4000)


def cmd_convert(args) -> int:
    from torchq.interop.load import from_pretrained, load_tokenizer

    if args.scheme:
        config_from_scheme(args.scheme, args.group_size)  # fail before loading
    from torchq.interop.load import detect_source

    kind = detect_source(args.source)
    if args.scheme and kind not in ("float", "gguf"):
        raise ValueError(f"{args.source} is already quantized ({kind}); --scheme needs a float model or a GGUF file")
    t0 = time.perf_counter()
    if args.scheme and kind == "gguf":  # quantize the dequantized float model, not the file's blocks
        from torchq.interop.gguf import load_gguf

        model = load_gguf(args.source, dtype=_dtype(args.dtype), keep_quantized=False)
    else:
        model = from_pretrained(args.source, dtype=_dtype(args.dtype))
    tokenizer = load_tokenizer(args.source)
    print(f"loaded {args.source} in {time.perf_counter() - t0:.1f} s")
    if args.scheme:
        _quantize(model, args)
    t0 = time.perf_counter()
    if args.format == "gguf":
        from torchq.interop.gguf_export import save_gguf

        save_gguf(model, args.output, tokenizer=tokenizer)
    else:
        from torchq.interop.save import save_pretrained

        save_pretrained(model, args.output, args.format, tokenizer=tokenizer, checkpoint_format=args.checkpoint_format)
    print(f"wrote {args.output} ({args.format}) in {time.perf_counter() - t0:.1f} s")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "bench": cmd_bench, "convert": cmd_convert}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"torchq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
