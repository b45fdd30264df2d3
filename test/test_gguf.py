"""GGUF import: block decoding, rotary row order and a whole tiny llama vs transformers' loader."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.interop.gguf import (  # noqa: E402
    BLOCK_FORMATS,
    GGUFFile,
    _quantized_weight,
    gguf_to_hf_names,
    load_gguf,
    rotary_row_permutation,
)

from gguf_fixtures import LAYER_TYPES, LAYERS, write_tiny_llama  # noqa: E402


def _naive_codes(raw: np.ndarray, ggml_name: str, k: int) -> np.ndarray:
    """Signed codes in element order, straight from the GGUF block description."""
    fmt = BLOCK_FORMATS[ggml_name]
    blocks = raw.reshape(raw.shape[0], k // 32, fmt.block_bytes)
    if ggml_name == "Q8_0":
        return blocks[..., 2:].view(np.int8).reshape(raw.shape[0], k).astype(np.int16)
    qs = blocks[..., 2:18] if ggml_name == "Q4_0" else blocks[..., 4:20]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], k).astype(np.int16)
    return codes - 8 if ggml_name == "Q4_0" else codes


@settings(max_examples=25, deadline=None)
@given(
    ggml_name=st.sampled_from(sorted(BLOCK_FORMATS)),
    n=st.integers(1, 9),
    blocks=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale_dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_block_import_is_lossless(ggml_name, n, blocks, seed, scale_dtype):
    """Codes equal the file's, and dequantize() equals gguf-py's own dequantization bit for bit."""
    k = 32 * blocks
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3)).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (d = 0)
    qtype = gguf.GGMLQuantizationType[ggml_name]
    raw = gguf.quants.quantize(data, qtype)
    w = _quantized_weight(raw, ggml_name, k, torch.float32, scale_dtype, None)
    assert isinstance(w, torchq.AffineQuantizedTensor) and tuple(w.shape) == (n, k) and w.group_size == 32
    assert w.scale.dtype == scale_dtype
    assert torch.equal(w.codes().to(torch.int16), torch.from_numpy(_naive_codes(raw, ggml_name, k)))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k))
    assert torch.equal(w.dequantize(), expected)


def test_q8_0_full_int8_range_is_kept():
    raw = gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    raw[0, 2] = 0x80  # code -128, which llama.cpp never writes but the format allows
    w = _quantized_weight(raw, "Q8_0", 32, torch.float32, torch.float16, None)
    assert w.quant_min == -128 and int(w.codes()[0, 0]) == -128


def test_rows_are_permuted_whole():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1)
    rows = rotary_row_permutation(8, 2)
    w = _quantized_weight(raw, "Q4_1", 64, torch.float32, torch.float16, rows)
    full = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(8, 64)
    assert torch.equal(w.dequantize(), torch.from_numpy(full[rows]))


@pytest.mark.parametrize("n_rows,n_head", [(576, 9), (192, 3), (64, 4), (32, 2)])
def test_rotary_row_permutation_matches_transformers(n_rows, n_head):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_head})
    rows = np.arange(n_rows, dtype=np.float32)[:, None]
    expected = proc._reverse_permute_weights(rows, n_head, n_head)[:, 0].astype(np.int64)
    assert np.array_equal(rotary_row_permutation(n_rows, n_head), expected)


def test_bad_block_bytes_is_a_clear_error():
    with pytest.raises(ValueError, match="Q4_1 rows of 64 weights take 40 bytes, got 39"):
        _quantized_weight(np.zeros((2, 39), np.uint8), "Q4_1", 64, torch.float32, torch.float16, None)
    raw = np.zeros((2, 40), np.uint8)
    with pytest.raises(ValueError, match="scale_dtype"):
        _quantized_weight(raw, "Q4_1", 64, torch.float32, torch.bfloat16, None)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------------- a whole tiny llama
@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    types = write_tiny_llama(path, tied=request.param)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    hf.eval()
    return dict(path=path, types=types, hf=hf, tied=request.param)


def test_tiny_llama_weights_and_logits_match_transformers(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="torchq"):
        model, report = load_gguf(tiny["path"], return_report=True)
    hf_state = tiny["hf"].state_dict()
    for name, p in model.named_parameters():
        w = p.dequantize() if isinstance(p, torchq.AffineQuantizedTensor) else p
        assert torch.equal(w, hf_state[name]), name
    ids = torch.randint(0, 258, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny["hf"](ids).logits)

    # every mapped block type became a torchq weight; Q5_0 was dequantized, said so, and logged
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.quant_min == -8  # Q4_0: symmetric [-8, 7]
    assert layer.self_attn.k_proj.weight.zero_point_domain == "float"  # Q4_1
    assert layer.self_attn.v_proj.weight.scheme == "int8_weight_only"  # Q8_0
    assert not isinstance(layer.mlp.down_proj.weight, torchq.AffineQuantizedTensor)  # Q5_0
    assert report.count("Q5_0", "dequantized") == LAYERS
    assert report.count("Q4_0", "quantized") == 2 * LAYERS
    assert report.count("F32", "float") == 2 * LAYERS + 1
    assert sum("dequantized blk." in r.message and "Q5_0" in r.message for r in caplog.records) == LAYERS
    assert "dequantized: blk.0.ffn_down.weight (Q5_0) -> model.layers.0.mlp.down_proj.weight (linear): no lossless" in str(report)
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, torchq.AffineQuantizedTensor)
    if tiny["tied"]:
        assert model.lm_head.weight is emb
        assert report.tied == [("lm_head.weight", "model.embed_tokens.weight")]
        assert "lm_head.weight tied to model.embed_tokens.weight" in report.summary()
    else:
        assert model.lm_head.weight is not emb and report.tied == []
        assert model.lm_head.weight.zero_point_domain == "float"


def test_tiny_llama_float_load_matches_transformers(tiny):
    model, report = GGUFFile(tiny["path"]).model(keep_quantized=False)
    assert not any(isinstance(p, torchq.AffineQuantizedTensor) for p in model.parameters())
    hf_state = tiny["hf"].state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, hf_state[name]), name
    assert report.count(action="quantized") == 0


def test_tokenizer_equals_autotokenizers(tiny, tmp_path):
    """GGUFFile.tokenizer() builds, without AutoTokenizer's second parse of the file, the
    tokenizer AutoTokenizer returns: same class, backend, special tokens and encodings; with a
    tokenizer file beside the GGUF it defers to AutoTokenizer."""
    import os
    import shutil

    from transformers import AutoTokenizer

    from torchq.interop.gguf import _generic_tokenizer_is_autos_choice

    directory, name = os.path.split(tiny["path"])
    ours, ref = GGUFFile(tiny["path"]).tokenizer(), AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert _generic_tokenizer_is_autos_choice(GGUFFile(tiny["path"]).config, directory)
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.special_tokens_map == ref.special_tokens_map and ours.init_kwargs == ref.init_kwargs
    text = "hello world, the tiny llama"
    assert ours(text).input_ids == ref(text).input_ids
    other = tmp_path / "with_config"
    other.mkdir()
    shutil.copy(tiny["path"], other / name)
    (other / "tokenizer_config.json").write_text("{}")
    assert not _generic_tokenizer_is_autos_choice(GGUFFile(str(other / name)).config, str(other))


def test_from_pretrained_gguf_takes_config_overrides(tiny):
    """``torchq.from_pretrained(file.gguf, **overrides)`` applies them to the transformers config,
    as for a directory; a key no config attribute takes raises instead of being dropped."""
    model = torchq.from_pretrained(tiny["path"], attn_implementation="eager", max_position_embeddings=77)
    assert model.config._attn_implementation == "eager" and model.config.max_position_embeddings == 77
    ids = torch.randint(0, 258, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_gguf(tiny["path"])(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"unknown config overrides \['rope_thetta'\]"):
        torchq.from_pretrained(tiny["path"], rope_thetta=1e4)


def test_tiny_llama_name_map_matches_transformers(tiny):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    hf = tiny["hf"]
    expected = get_gguf_hf_weights_map(hf, LlamaTensorProcessor(config=hf.config.to_dict()))
    assert gguf_to_hf_names(hf, "llama", hf.config.num_hidden_layers) == expected


def test_tiny_llama_bfloat16_and_fp32_scales(tiny):
    model = load_gguf(tiny["path"], dtype=torch.bfloat16, scale_dtype=torch.float32)
    w = model.model.layers[1].self_attn.k_proj.weight
    assert w.dtype == torch.bfloat16 and w.scale.dtype == torch.float32
    ids = torch.randint(0, 258, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_layer_types_cover_every_mapped_format():
    assert set(BLOCK_FORMATS) <= set(LAYER_TYPES.values())


# ---------------------------------------------------------------------- the fast reader
def test_reader_matches_gguf_py(tiny):
    """Every metadata value, tensor entry and tensor byte as gguf-py reads them."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    from torchq.interop.gguf_reader import GGUFReader, StringArray

    ours, ref = GGUFReader(tiny["path"]), gguf.GGUFReader(tiny["path"])
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert list(ours.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key in ours.metadata:
        value = ours.value(key)
        assert (value if isinstance(value, list) else [value]) == read_field(ref, key), key
    assert isinstance(ours.metadata["tokenizer.ggml.tokens"], StringArray)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 258
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.shape, a.n_bytes, a.data_offset) == (b.tensor_type, tuple(b.shape), b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name
        a.release()  # pages leave the resident set; the values do not change
        assert np.array_equal(a.data, b.data), a.name


def test_config_equals_transformers(tiny):
    """The config built from the metadata equals AutoConfig.from_pretrained(dir, gguf_file=name)."""
    from transformers import AutoConfig

    ours = GGUFFile(tiny["path"]).config
    ref = AutoConfig.from_pretrained(os.path.dirname(tiny["path"]), gguf_file=os.path.basename(tiny["path"]))
    assert type(ours) is type(ref) and ours.to_dict() == ref.to_dict()
    assert ours.tie_word_embeddings == tiny["tied"]


def test_fast_loader_equals_gguf_py_loader(tiny):
    """Same weights (inner tensors bit for bit), logits and greedy tokens as the loader that parsed
    with gguf-py and took transformers' config."""
    from gguf_fixtures import legacy_gguf_file

    new, _ = GGUFFile(tiny["path"]).model()
    old, _ = legacy_gguf_file(tiny["path"]).model()
    _assert_same_model(new, old)


def _assert_same_model(new, old, steps: int = 8):
    old_state = old.state_dict()
    for name, p in new.state_dict().items():
        q = old_state[name]
        assert type(p) is type(q), name
        if isinstance(p, torchq.AffineQuantizedTensor):
            for field in ("qdata", "scale", "zero_point"):
                a, b = getattr(p, field), getattr(q, field)
                assert (a is None and b is None) or torch.equal(a, b), f"{name}.{field}"
        else:
            assert torch.equal(p, q), name
    ids = torch.tensor([[1, 5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(new(ids).logits, old(ids).logits)
        a = new.generate(ids, max_new_tokens=steps, do_sample=False)
        b = old.generate(ids, max_new_tokens=steps, do_sample=False)
    assert torch.equal(a, b)


def _damaged(tmp_path, mutate) -> str:
    from gguf_fixtures import write_tiny_llama

    src = tmp_path / "ok.gguf"
    write_tiny_llama(str(src))
    blob = bytearray(src.read_bytes())
    mutate(blob)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(blob))
    return str(path)


def _offset_of(blob: bytes, key: bytes) -> int:
    """Byte offset just past metadata key ``key`` (its u64 length and bytes)."""
    return bytes(blob).index(key) + len(key)


@pytest.mark.parametrize(
    "case,match",
    [
        ("truncated_header", "too short for a GGUF header"),
        ("truncated_metadata", "the file ends inside"),
        ("truncated_data", "past the end of the file"),
        ("bad_magic", "no 'GGUF' magic"),
        ("bad_version", "GGUF version 7"),
        ("huge_kv_count", "more than a file of"),
        ("huge_string", "the file ends inside"),
        ("bad_value_type", "value type 13"),
        ("bad_utf8_key", "not valid UTF-8"),
        ("bad_alignment", "general.alignment"),
        ("bad_tensor_type", "ggml type 999"),
        ("bad_n_dims", "dimensions"),
    ],
)
def test_damaged_file_is_a_checkpoint_error(tmp_path, case, match):
    """Each kind of damage is a CheckpointError naming the file, the problem and a fix."""
    import struct

    from torchq import CheckpointError

    def mutate(b: bytearray):
        if case == "truncated_header":
            del b[20:]
        elif case == "truncated_metadata":
            del b[_offset_of(b, b"tokenizer.ggml.tokens") + 400 :]
        elif case == "truncated_data":
            del b[-100:]
        elif case == "bad_magic":
            b[:4] = b"GGML"
        elif case == "bad_version":
            b[4:8] = struct.pack("<I", 7)
        elif case == "huge_kv_count":
            b[16:24] = struct.pack("<Q", 2**60)
        elif case == "huge_string":
            i = _offset_of(b, b"general.architecture") + 4
            b[i : i + 8] = struct.pack("<Q", 2**50)
        elif case == "bad_value_type":
            i = _offset_of(b, b"llama.block_count")
            b[i : i + 4] = struct.pack("<I", 13)
        elif case == "bad_utf8_key":
            i = b.index(b"llama.block_count")
            b[i] = 0xFF
        elif case == "bad_alignment":  # append general.alignment = 3 as the last metadata entry
            raise NotImplementedError
        elif case == "bad_tensor_type":
            i = _offset_of(b, b"token_embd.weight") + 4 + 2 * 8
            b[i : i + 4] = struct.pack("<I", 999)
        elif case == "bad_n_dims":
            i = _offset_of(b, b"token_embd.weight")
            b[i : i + 4] = struct.pack("<I", 9)

    if case == "bad_alignment":
        path = str(tmp_path / "damaged.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_uint32("general.alignment", 3)
        w.data_alignment = 32
        w.add_tensor("x", np.zeros(32, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        path = _damaged(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=match) as e:
        torchq.from_pretrained(path)
    assert "damaged.gguf" in str(e.value) and ("re-download" in str(e.value) or "gguf" in str(e.value))
