"""GGUF export: a torchq Llama-family model as a llama.cpp ``.gguf`` file (``torchq.save_gguf``).

Each quantized weight is written as the GGUF block type holding its codes *as they are*
(the inverse of :mod:`torchq.interop.gguf`'s import; no requantization):

========================================================  =====
torchq weight (group 32 along K)                          GGUF
========================================================  =====
int4, symmetric, range [-8, 7]                            Q4_0
int4, float zero point (``w = q*s + m``), range [0, 15]   Q4_1
int8, symmetric                                           Q8_0
========================================================  =====

GGUF stores ``d`` and ``m`` as fp16: fp16 scales (GGUF/AWQ/GPTQ imports) are written
exactly; fp32 scales (torchq's own quantizer) are rounded to fp16, as every fp16-scale format
does. Any other quantized weight (another group size, an integer zero point, act-order)
raises a ValueError naming the torchq config that has a lossless GGUF type. Float tensors
are written F32 (``float_type="f16"`` writes 2-D ones as F16; norms stay F32).

Llama q/k projection rows are re-permuted into llama.cpp's rotary order (the inverse of
:func:`~torchq.interop.gguf.rotary_row_permutation`), and a byte-level BPE tokenizer
(``tokenizer.json`` of a fast tokenizer) is written as ``tokenizer.ggml.*`` (model ``gpt2``).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from torchq.primitives.affine import ZeroPointDomain
from torchq.formats.serialization import atomic_write
from torchq.formats.affine.tensor import AffineQuantizedTensor
from torchq.formats.base import TorchqTensor
from torchq.interop.gguf import GROUP, gguf_to_hf_names, rotary_row_permutation

__all__ = ["save_gguf", "gguf_block_type", "encode_blocks", "ENCODERS"]

ARCHITECTURES = {"llama": "llama"}  # transformers model_type -> GGUF architecture


def _fp16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def _nibble_blocks(u: np.ndarray) -> np.ndarray:
    """``(N, nb, 32)`` unsigned 4-bit codes -> ``(N, nb, 16)`` bytes: byte j holds element j
    (low nibble) and element j + 16 (high nibble)."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _encode_q4_0(codes, scale, zero):
    return [_fp16_bytes(scale), _nibble_blocks((codes + 8).astype(np.uint8))]


def _encode_q4_1(codes, scale, zero):
    return [_fp16_bytes(scale), _fp16_bytes(zero), _nibble_blocks(codes.astype(np.uint8))]


def _encode_q8_0(codes, scale, zero):
    return [_fp16_bytes(scale), codes.astype(np.int8).view(np.uint8)]


#: GGUF type name -> (scheme, bits, zero point domain, allowed code range, encoder)
ENCODERS = {
    "Q4_0": ("int4_weight_only", 4, "none", (-8, 7), _encode_q4_0),
    "Q4_1": ("int4_weight_only", 4, "float", (0, 15), _encode_q4_1),
    "Q8_0": ("int8_weight_only", 8, "none", (-128, 127), _encode_q8_0),
}

_LOSSLESS_CONFIGS = (
    'torchq.int4_weight_only(group_size=32, zero_point_domain="float") (Q4_1), '
    "torchq.int4_weight_only(group_size=32, symmetric=True) (Q4_0) or "
    "torchq.intx_weight_only / int8 symmetric at group_size=32 (Q8_0)"
)


def gguf_block_type(t: AffineQuantizedTensor, what: str = "weight") -> str:
    """The GGUF type that holds ``t`` losslessly, or a ValueError naming configs that have one."""
    domain = ZeroPointDomain(t.zero_point_domain).value
    problems = []
    if t.group_size != GROUP:
        problems.append(f"group_size {t.group_size} (GGUF blocks hold {GROUP})")
    if t.perm is not None or t.act_scale is not None:
        problems.append("act-order permutation / act_scale")
    if t.scheme.startswith("w") and "a8" in t.scheme:
        problems.append(f"scheme {t.scheme} quantizes activations (GGUF weights are weight-only)")
    if not problems:
        for name, (scheme, bits, dom, (lo, hi), _) in ENCODERS.items():
            if t.bits == bits and domain == dom and t.quant_min >= lo and t.quant_max <= hi:
                return name
        problems.append(f"{t.bits}-bit codes in [{t.quant_min}, {t.quant_max}] with a {domain!r} zero point")
    raise ValueError(
        f"{what} has no lossless GGUF type: " + "; ".join(problems) + f". Quantize it with {_LOSSLESS_CONFIGS}"
    )


def encode_blocks(t: AffineQuantizedTensor, rows: Optional[np.ndarray] = None) -> tuple[str, np.ndarray]:
    """``(type name, (N, K/32 * block bytes) uint8)`` for a quantized weight; ``rows`` reorders output rows."""
    name = gguf_block_type(t)
    n, k = t.shape
    if t.padded_in_features != k:
        raise ValueError(f"K={k} is not a multiple of {GROUP}: GGUF has no partial blocks")
    c = t.canonical_tensors()
    codes = t.codes().numpy().astype(np.int16)
    scale = c["scale"].float().numpy()
    zero = c["zero_point"].float().numpy() if c["zero_point"] is not None else None
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        zero = zero[rows] if zero is not None else None
    nb = k // GROUP
    parts = ENCODERS[name][4](codes.reshape(n, nb, GROUP), scale, zero)
    return name, np.concatenate(parts, axis=-1).reshape(n, -1)


def _rows_for(gguf_name: str, n_rows: int, config) -> Optional[np.ndarray]:
    """Stored-row order for llama.cpp: the inverse of the import's rotary un-permutation."""
    if ".attn_q." in gguf_name:
        return np.argsort(rotary_row_permutation(n_rows, config.num_attention_heads))
    if ".attn_k." in gguf_name:
        return np.argsort(rotary_row_permutation(n_rows, config.num_key_value_heads))
    return None


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0) or 10000.0))


def _metadata(w, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)


def _add_tokenizer(w, tokenizer, pre: str) -> None:
    """A fast byte-level BPE tokenizer as ``tokenizer.ggml.*`` (gpt2 model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("save_gguf writes fast (tokenizers-backed) byte-level BPE tokenizers; got a slow tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"save_gguf writes byte-level BPE tokenizers (GGUF 'gpt2'); this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for tok, i in vocab.items():
        tokens[i] = tok
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    types = [(3 if added[i].get("special") else 4) if i in added else 1 for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def save_gguf(
    model: nn.Module,
    path: str,
    *,
    tokenizer: Any = None,
    float_type: str = "f32",
    tokenizer_pre: str = "default",
) -> str:
    """Write ``model`` (a transformers Llama-family causal LM, torchq-quantized or imported) to
    ``path`` as GGUF; see the module docstring. Returns ``path``."""
    import gguf

    config = model.config
    arch = ARCHITECTURES.get(getattr(config, "model_type", ""))
    if arch is None:
        raise ValueError(
            f"save_gguf writes Llama-architecture models (model_type 'llama'); got {getattr(config, 'model_type', None)!r}"
        )
    if float_type not in ("f32", "f16"):
        raise ValueError(f"float_type must be 'f32' or 'f16', got {float_type!r}")
    hf_to_gguf = {hf: g for g, hf in gguf_to_hf_names(model, arch, config.num_hidden_layers).items()}

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(getattr(config, "name_or_path", "") or "torchq-export")
        _metadata(w, config)
        if tokenizer is not None:
            _add_tokenizer(w, tokenizer, tokenizer_pre)
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        written = set()
        for hf_name, value in model.state_dict(keep_vars=True).items():
            gname = hf_to_gguf.get(hf_name)
            if gname is None:
                continue  # buffers such as rotary inv_freq
            if tied and gname == "output.weight":
                continue  # llama.cpp uses token_embd for a missing output
            if gname in written:
                continue
            rows = _rows_for(gname, value.shape[0], config)
            if isinstance(value, AffineQuantizedTensor):
                try:
                    qtype, raw = encode_blocks(value, rows)
                except ValueError as e:
                    raise ValueError(f"{hf_name}: {e}") from None
                w.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
            else:
                if isinstance(value, TorchqTensor):
                    raise ValueError(f"{hf_name}: {type(value).__name__} weights have no GGUF type; quantize with {_LOSSLESS_CONFIGS}")
                data = value.detach().float().numpy()
                if rows is not None:
                    data = data[rows]
                if float_type == "f16" and data.ndim == 2:
                    data = data.astype(np.float16)
                w.add_tensor(gname, np.ascontiguousarray(data))
            written.add(gname)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(str(path), write)  # a failed or killed export leaves no partial file
    return str(path)
