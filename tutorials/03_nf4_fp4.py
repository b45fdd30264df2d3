"""NF4 and FP4: 4-bit codebook weights, bitsandbytes-compatible, on a CPU.

Runs in seconds (a tiny Llama built from a config, random weights, nothing downloaded):

1. quantize with NF4 (QLoRA), NF4 with double-quantized scales, OCP FP4 e2m1 and
   bitsandbytes' FP4 variant; compare logits with the float model and weight memory with
   int8 / int4;
2. check that torchq's NF4 and bnb-FP4 weights are bit-identical to
   ``bitsandbytes.functional.dequantize_4bit(quantize_4bit(w))`` (when bitsandbytes is
   installed), and import a bitsandbytes weight losslessly;
3. save (torch.save and safetensors) and reload bit-exactly; print ``torchq.explain``.
"""

import copy
import importlib.util
import io
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchq


def sqnr(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - other).norm()))


def weight_bytes(model) -> int:
    return sum(m.weight.nbytes_quantized for m in model.modules() if isinstance(getattr(m, "weight", None), torchq.TorchqTensor))


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
    )
    float_model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = float_model(tokens).logits

    # lm_head stays float in every row so that memory compares the decoder layers only
    keep_head = lambda module, name: name != "lm_head"  # noqa: E731
    schemes = {
        "int8": torchq.int8_weight_only(),
        "int4 g64": torchq.int4_weight_only(group_size=64),
        "nf4": torchq.nf4_weight_only(),
        "nf4 + dq": torchq.nf4_weight_only(double_quant=True),
        "fp4 e2m1": torchq.fp4_weight_only(variant="e2m1"),
        "fp4 bnb": torchq.fp4_weight_only(variant="bnb"),
    }
    tmp = tempfile.mkdtemp()
    print(f"{'scheme':<10} {'logits SQNR dB':>15} {'weight bytes':>13} {'reload':>10}")
    models = {}
    for name, cfg in schemes.items():
        model = copy.deepcopy(float_model)
        torchq.quantize_(model, cfg, filter_fn=keep_head)
        with torch.no_grad():
            out = model(tokens).logits
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh = copy.deepcopy(float_model)
        fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
        path = os.path.join(tmp, "model.safetensors")
        torchq.save_file(model.state_dict(), path)
        fresh_st = copy.deepcopy(float_model)
        fresh_st.load_state_dict(torchq.load_file(path), assign=True)
        with torch.no_grad():
            same = torch.equal(fresh(tokens).logits, out) and torch.equal(fresh_st(tokens).logits, out)
        assert same, f"{name}: reload is not bit-exact"
        models[name] = model
        print(f"{name:<10} {sqnr(ref, out):>15.1f} {weight_bytes(model):>13} {'bit-exact':>10}")

    sizes = {n: weight_bytes(m) for n, m in models.items()}
    assert sizes["nf4"] < sizes["int8"] and abs(sizes["nf4"] / sizes["int4 g64"] - 1) <= 0.05
    n_weights = sum(m.weight.numel() for m in models["nf4"].modules() if isinstance(getattr(m, "weight", None), torchq.TorchqTensor))
    print("\nbits per weight (codes + scales): " + ", ".join(f"{n} {8 * b / n_weights:.3f}" for n, b in sizes.items()))

    if importlib.util.find_spec("bitsandbytes") is None:
        print("\nbitsandbytes not installed: skipping the bit-compatibility check")
    else:
        import bitsandbytes.functional as bnbf

        w = float_model.model.layers[0].mlp.up_proj.weight.detach()
        for quant_type, scheme in (("nf4", "nf4"), ("fp4", "fp4_e2m1_bnb")):
            for dq in (False, True):
                packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
                theirs = bnbf.dequantize_4bit(packed, state)
                ours = torchq.Codebook4Tensor.from_float(w, scheme=scheme, block_size=64, double_quant=dq)
                imported = torchq.Codebook4Tensor.from_bnb(packed, state)
                assert torch.equal(ours.dequantize(), theirs) and torch.equal(imported.dequantize(), theirs)
                print(f"bitsandbytes {quant_type} (double quant {dq!s:<5}): torchq's weight is bit-identical; import lossless")

    print()
    torchq.explain(models["nf4 + dq"])


if __name__ == "__main__":
    main()
