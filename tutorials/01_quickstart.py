"""Quick start: quantize a small transformer, compare outputs, save and reload.

Runs in seconds on a CPU: the model is a tiny Llama built from a config (random weights,
nothing downloaded). Every scheme is quantized, compared with the float model, saved with
torch.save and with safetensors, and reloaded into a fresh float model bit-exactly.
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
        vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
    )
    float_model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = float_model(tokens).logits

    schemes = {
        "int8": torchq.int8_weight_only(),
        "int4 g64": torchq.int4_weight_only(group_size=64),
        "w8a8": torchq.int8_dynamic_activation_int8_weight(),
        "w4a8 g64": torchq.int8_dynamic_activation_int4_weight(group_size=64),
    }
    tmp = tempfile.mkdtemp()
    print(f"{'scheme':<10} {'logits SQNR dB':>15} {'torch.save':>11} {'safetensors':>12}")
    for name, cfg in schemes.items():
        model = copy.deepcopy(float_model)
        report = torchq.quantize_(model, cfg)
        with torch.no_grad():
            out = model(tokens).logits

        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        fresh = copy.deepcopy(float_model)
        fresh.load_state_dict(torch.load(path, weights_only=True), assign=True)
        with torch.no_grad():
            same_pt = torch.equal(fresh(tokens).logits, out)

        st_path = os.path.join(tmp, "model.safetensors")
        torchq.save_file(model.state_dict(), st_path)
        fresh = copy.deepcopy(float_model)
        fresh.load_state_dict(torchq.load_file(st_path), assign=True)
        with torch.no_grad():
            same_st = torch.equal(fresh(tokens).logits, out)
        assert same_pt and same_st, f"{name}: reload is not bit-exact"
        print(f"{name:<10} {sqnr(ref, out):>15.1f} {'bit-exact':>11} {'bit-exact':>12}")
    print()
    print(report)
    print()
    torchq.explain(model)


if __name__ == "__main__":
    main()
