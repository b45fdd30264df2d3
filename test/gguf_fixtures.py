"""Tiny synthetic GGUF files for fast tests (written with gguf-py's writer).

A 2-layer llama (hidden 64, 4 heads, 2 KV heads) whose tensors use every block type the
importer maps (Q4_0, Q4_1, Q8_0), plain floats (F32, F16) and one type it must dequantize
(Q5_0), with a byte-level BPE tokenizer (the 256 byte symbols, one merge, an end-of-text
token). Weights are random; gguf-py's ports of llama.cpp's quantizers write them.
"""

from __future__ import annotations

import numpy as np
import pytest

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 128, 258, 2

#: tensor (per layer) -> ggml type name
LAYER_TYPES = {
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "Q8_0",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_0",
    "ffn_up": "F16",
    "ffn_down": "Q5_0",
}


def write_tiny_llama(path: str, tied: bool = True, seed: int = 0) -> dict:
    """Write the file; returns ``{gguf_name: ggml type name}``."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    _add_tokenizer(w)
    types: dict[str, str] = {}

    def add(name: str, shape: tuple[int, ...], qtype: str, scale: float = 0.05) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            data = 1.0 + data
        t = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
        types[name] = qtype

    add("token_embd.weight", (VOCAB, HIDDEN), "Q8_0", 0.5)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for layer in range(LAYERS):
        add(f"blk.{layer}.attn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{layer}.ffn_norm.weight", (HIDDEN,), "F32")
        for name, qtype in LAYER_TYPES.items():
            add(f"blk.{layer}.{name}.weight", shapes[name], qtype)
    add("output_norm.weight", (HIDDEN,), "F32")
    if not tied:
        add("output.weight", (VOCAB, HIDDEN), "Q4_1", 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def _add_tokenizer(w) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())  # byte-level BPE alphabet, 256 symbols
    space_t = "\u0120t"  # "Ġt": a space followed by t
    tokens = symbols + [space_t, "<|endoftext|>"]
    assert len(tokens) == VOCAB
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 1) + [3])  # normal ..., control
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(VOCAB - 1)
    w.add_eos_token_id(VOCAB - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """Path of a tiny llama GGUF written for the module (import this fixture by name)."""
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_tiny_llama(path)
    return path


class GGUFPyReader:
    """gguf-py's ``GGUFReader`` behind the interface ``torchq.interop.gguf`` uses (tensor
    ``name``, ``type_name``, ``data``, ``n_bytes``, ``release()``; ``architecture``): the
    pre-fast-reader loader, kept for tests comparing the two."""

    class _Tensor:
        def __init__(self, t):
            self.name, self.data, self.n_bytes = t.name, t.data, int(t.n_bytes)
            self.type_name, self.tensor_type, self.shape = t.tensor_type.name, t.tensor_type, tuple(int(d) for d in t.shape)

        def release(self):
            pass

    def __init__(self, path: str):
        import gguf

        self.gguf = gguf.GGUFReader(path)
        self.tensors = [self._Tensor(t) for t in self.gguf.tensors]
        self.architecture = str(bytes(self.gguf.fields["general.architecture"].parts[-1]), "utf-8")


def legacy_gguf_file(path: str):
    """A ``GGUFFile`` that parses with gguf-py and takes its config from transformers'
    ``AutoConfig.from_pretrained(dir, gguf_file=name)``, as torchq did before its own reader."""
    import os

    from transformers import AutoConfig

    from torchq.interop.gguf import GGUFFile

    f = GGUFFile(path)
    f._reader = GGUFPyReader(path)
    f._config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return f
