"""Row-block quantization is bit-identical to whole-tensor quantization; memory release is safe."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchq
from torchq.quantize.handlers import get_handler
from torchq.memory import copy_out_of_file, release_file_pages, release_free_memory
from torchq.quantize.row_chunks import quantize_in_row_chunks

CONFIGS = [
    torchq.int8_weight_only(),
    torchq.int8_weight_only(group_size=32),
    torchq.int4_weight_only(group_size=32),
    torchq.int4_weight_only(group_size=64, zero_point_domain="float"),
    torchq.int4_weight_only(group_size=128, symmetric=True),
    torchq.int8_dynamic_activation_int8_weight(),
    torchq.int8_dynamic_activation_int4_weight(group_size=64),
    torchq.intx_weight_only(3, group_size=32),
]


@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(1, 70),
    k=st.sampled_from([1, 7, 32, 33, 96, 130]),
    cfg=st.sampled_from(CONFIGS),
    rows=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_row_blocks_equal_whole(n, k, cfg, rows, dtype):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 131 + k)).to(dtype)
    whole, note = get_handler(cfg)(w, cfg)
    chunked, chunk_note = quantize_in_row_chunks(w, cfg, max_chunk_bytes=rows * k * w.element_size())
    assert chunk_note == note
    assert chunked.format_signature() == whole.format_signature() and chunked.dtype == whole.dtype
    a, b = whole.canonical_tensors(), chunked.canonical_tensors()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            assert torch.equal(a[name], b[name]), name


def test_unregistered_formats_are_quantized_whole(monkeypatch):
    from torchq.quantize import row_chunks

    monkeypatch.setattr(row_chunks, "_STITCHERS", {})
    cfg = torchq.int4_weight_only(group_size=32)
    w = torch.randn(50, 64)
    out, _ = quantize_in_row_chunks(w, cfg, max_chunk_bytes=64 * 4 * 3)
    assert torch.equal(out.dequantize(), get_handler(cfg)(w, cfg)[0].dequantize())


def _rss_file_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_file_pages_drops_mmap_pages_and_keeps_values(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    big = torch.randn(2048, 1024)  # 8 MiB
    save_file({"w": big, "small": torch.arange(10.0)}, tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        w = f.get_slice("w")[...]
        small = f.get_slice("small")[...]
        assert float(w.sum()) == pytest.approx(float(big.sum()), rel=1e-4)  # touch every page
        before = _rss_file_kb()
        assert release_file_pages(w)
        after = _rss_file_kb()
        assert before - after > 6 * 1024  # most of the 8 MiB went
        assert torch.equal(w, big)  # still readable: the pages fault back in from the file
        assert torch.equal(small, torch.arange(10.0))


def test_release_file_pages_leaves_ordinary_memory_alone():
    t = torch.randn(4096, 512)
    copy = t.clone()
    assert not release_file_pages(t)  # anonymous memory: refused, never zeroed
    assert not release_file_pages(t[:, ::2])
    assert torch.equal(t, copy)
    release_free_memory()  # harmless anywhere


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3 * 4096 + 12, 64 << 20])
def test_copy_out_of_file_copies_and_leaves_the_file_pages_dropped(tmp_path, chunk_bytes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    big = torch.randn(2048, 1024)  # 8 MiB
    save_file({"w": big}, tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        w = f.get_slice("w")[...]
        before = _rss_file_kb()
        copy = copy_out_of_file(w, chunk_bytes=chunk_bytes)
        after = _rss_file_kb()
        assert torch.equal(copy, big) and copy.data_ptr() != w.data_ptr()
        assert after - before < 1024  # the copy read all 8 MiB of the file, none of it stayed resident
        copy.add_(1.0)
        assert torch.equal(w, big)  # an independent copy


def test_copy_out_of_file_of_ordinary_memory_is_a_clone():
    t = torch.randn(100, 7)[:, ::2]
    copy = copy_out_of_file(t)
    assert torch.equal(copy, t) and copy.is_contiguous() and copy.data_ptr() != t.data_ptr()
