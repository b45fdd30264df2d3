"""Hostile and damaged inputs: every mutation of a real small checkpoint either loads
bit-exact or raises torchq.CheckpointError (never a crash, a wrong weight or a stray
exception type); saves are atomic; the kernels give the same results from many threads."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchq
from torchq import CheckpointError

SCHEMES = {
    "int4": torchq.int4_weight_only(group_size=32),
    "int4_float_zero": torchq.int4_weight_only(group_size=32, zero_point_domain="float"),
    "int8": torchq.int8_weight_only(),
    "int3": torchq.intx_weight_only(bits=3, group_size=32),
    "w8a8": torchq.int8_dynamic_activation_int8_weight(),
    "w4a8": torchq.int8_dynamic_activation_int4_weight(group_size=32),
    "nf4": torchq.nf4_weight_only(block_size=32),
    "nf4_dq": torchq.nf4_weight_only(block_size=32, double_quant=True),
    "fp4": torchq.fp4_weight_only(block_size=32),
}
FUZZ = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def model(scheme: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 40), nn.SiLU(), nn.Linear(40, 24, bias=False))
    torchq.quantize_(m, SCHEMES[scheme])
    return m


def same_state(a: dict, b: dict) -> bool:
    """Same keys, and every tensor bit-identical (quantized ones: canonical data + metadata)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if type(x) is not type(y):
            return False
        if hasattr(x, "checkpoint_state"):
            sx, sy = x.checkpoint_state(), y.checkpoint_state()
            if sx.keys() != sy.keys():
                return False
            for name in sx:
                u, v = sx[name], sy[name]
                if isinstance(u, torch.Tensor):
                    if u.dtype != v.dtype or u.shape != v.shape or not torch.equal(u.view(torch.uint8) if u.dtype != torch.bool else u, v.view(torch.uint8) if v.dtype != torch.bool else v):
                        return False
                elif u != v:
                    return False
        elif x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return False
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """scheme -> (bytes of a torchq safetensors file, its state dict)."""
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for scheme in SCHEMES:
        sd = model(scheme).state_dict()
        path = root / f"{scheme}.safetensors"
        torchq.save_file(sd, str(path))
        out[scheme] = (path.read_bytes(), sd)
    return out


def load_bytes(data: bytes, tmp_path, name="m.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return torchq.load_file(str(path))


def loads_exact_or_raises(data: bytes, original: dict, tmp_path) -> str:
    try:
        loaded = load_bytes(data, tmp_path)
    except CheckpointError as e:
        assert "m.safetensors" in str(e)  # names the file
        return "error"
    assert same_state(loaded, original), f"a damaged file loaded with different weights: {_diff(loaded, original)}"
    return "exact"


def _diff(a: dict, b: dict) -> str:
    """The first differing key and field (for the failure message)."""
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            return f"key {k!r} only on one side"
        if not same_state({k: a[k]}, {k: b[k]}):
            if hasattr(a[k], "checkpoint_state"):
                sa, sb = a[k].checkpoint_state(), b[k].checkpoint_state()
                fields = [f for f in sorted(set(sa) | set(sb)) if not same_state({"x": a[k]}, {"x": b[k]}) and (
                    f not in sa or f not in sb or (not isinstance(sa[f], torch.Tensor) and sa[f] != sb[f]))]
                return f"{k}: fields {fields}: {[(sa.get(f), sb.get(f)) for f in fields]}"
            return f"{k}: plain tensor differs"
    return "?"


def test_round_trip_is_exact(saved, tmp_path):
    for scheme, (data, sd) in saved.items():
        assert loads_exact_or_raises(data, sd, tmp_path) == "exact", scheme


@FUZZ
@given(scheme=st.sampled_from(sorted(SCHEMES)), data=st.data())
def test_bit_flips(saved, tmp_path, scheme, data):
    blob, sd = saved[scheme]
    flips = data.draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=4))
    b = bytearray(blob)
    for bit in flips:
        b[bit // 8] ^= 1 << (bit % 8)
    loads_exact_or_raises(bytes(b), sd, tmp_path)


@FUZZ
@given(scheme=st.sampled_from(sorted(SCHEMES)), data=st.data())
def test_truncation_and_appended_garbage(saved, tmp_path, scheme, data):
    blob, sd = saved[scheme]
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert loads_exact_or_raises(blob[:cut], sd, tmp_path) == "error"
    tail = data.draw(st.binary(min_size=1, max_size=64))
    loads_exact_or_raises(blob + tail, sd, tmp_path)


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


HEADER_EDITS = ["dtype_swap", "shape_edit", "offset_edit", "meta_value", "meta_drop", "version", "format"]


@FUZZ
@given(scheme=st.sampled_from(sorted(SCHEMES)), edit=st.sampled_from(HEADER_EDITS), data=st.data())
def test_header_edits(saved, tmp_path, scheme, edit, data):
    blob, sd = saved[scheme]
    header, payload = _split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    meta = json.loads(header["__metadata__"]["torchq"])
    entry = data.draw(st.sampled_from(sorted(meta["entries"])))
    if edit == "dtype_swap":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "BOOL"]))
    elif edit == "shape_edit":
        shape = header[name]["shape"]
        if shape:
            i = data.draw(st.integers(0, len(shape) - 1))
            shape[i] = data.draw(st.integers(0, 2**40))
    elif edit == "offset_edit":
        header[name]["data_offsets"][data.draw(st.integers(0, 1))] = data.draw(st.integers(0, 2**40))
    elif edit == "meta_value":
        field = data.draw(st.sampled_from(sorted(k for k in meta["entries"][entry] if k != "tensors")))
        meta["entries"][entry][field] = data.draw(
            st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=8), st.none(), st.lists(st.integers(-5, 10**6), max_size=3), st.booleans())
        )
    elif edit == "meta_drop":
        field = data.draw(st.sampled_from(sorted(meta["entries"][entry])))
        del meta["entries"][entry][field]
    elif edit == "version":
        meta[data.draw(st.sampled_from(["container_version"]))] = data.draw(st.integers(0, 5))
    elif edit == "format":
        meta["entries"][entry]["format"] = data.draw(st.sampled_from(["torchq.affine", "torchq.codebook4", "other"]))
    header["__metadata__"]["torchq"] = json.dumps(meta)
    loads_exact_or_raises(_join(header, payload), sd, tmp_path)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_state_fuzz_through_torch_load(scheme, tmp_path):
    """torch.load(weights_only=True) of a pickled state whose fields contradict each other
    raises CheckpointError (from the rebuild), never anything else."""
    w = model(scheme)[0].weight
    base = w.checkpoint_state()
    rebuild = w.__reduce_ex__(2)[0]
    torch.manual_seed(1)
    cases = []
    for field, value in base.items():
        if isinstance(value, torch.Tensor):
            cases.append({**base, field: value[:1]})  # too short
            cases.append({**base, field: value.to(torch.int64)})  # wrong dtype
            if value.is_floating_point():
                bad = value.clone()
                bad.view(-1)[0] = float("nan")
                cases.append({**base, field: bad})
        else:
            cases.append({**base, field: "bogus"})
            cases.append({k: v for k, v in base.items() if k != field})
    errors = 0
    for state in cases:
        class Pickled:
            def __reduce__(self, state=state):
                return (rebuild, (state,))

        path = tmp_path / "s.pt"
        torch.save({"w": Pickled()}, path)
        try:
            got = torch.load(path, weights_only=True)["w"]
        except CheckpointError:
            errors += 1
            continue
        # accepted: then it must be the same weight (e.g. a field that is only a hint)
        assert torch.equal(got.dequantize(), w.dequantize())
    assert errors >= len(cases) // 2


def test_kernel_ops_check_their_arguments():
    """A direct torch.ops.torchq call with inconsistent shapes raises, it never reads out of bounds."""
    w = model("int4")[0].weight
    x = torch.randn(3, 64)
    ops = torch.ops.torchq
    with pytest.raises(RuntimeError, match="torchq"):
        ops.int4_linear(x, w.qdata[:, :-4].contiguous(), w.scale, w.zero_point, None, 32, 0)
    with pytest.raises(RuntimeError, match="torchq"):
        ops.int4_linear(torch.randn(3, 100), w.qdata, w.scale, w.zero_point, None, 32, 0)
    with pytest.raises(RuntimeError, match="torchq"):
        ops.int4_linear(x, w.qdata, w.scale[:-1].contiguous(), w.zero_point, None, 32, 0)
    with pytest.raises(RuntimeError, match="torchq"):
        ops.int4_linear(x, w.qdata, w.scale, w.zero_point, torch.randn(7), 32, 0)


# ---------------------------------------------------------------------- atomic saves
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    sd = model("int4").state_dict()
    torchq.save_file(sd, str(path))
    before = path.read_bytes()

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        torchq.save_file(model("int8").state_dict(), str(path))
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert same_state(torchq.load_file(str(path)), sd)


def test_killed_save_leaves_no_corrupt_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    sd = model("int4").state_dict()
    torchq.save_file(sd, str(path))
    code = textwrap.dedent(f"""
        import os, sys, time
        from torchq.formats.serialization import atomic_write
        def slow(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half a checkpoint")
                f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert same_state(torchq.load_file(str(path)), sd)  # the real name still holds the old checkpoint
    leftovers = [n for n in os.listdir(tmp_path) if n != "m.safetensors"]
    assert all(n.startswith(".m.safetensors.") and n.endswith(".tmp") for n in leftovers)


# ---------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_four_threads_give_the_sequential_results(scheme):
    m = model(scheme).eval()
    inputs = [torch.randn(m_rows, 64, generator=torch.Generator().manual_seed(i)) for i, m_rows in enumerate((1, 3, 17, 40))]
    with torch.no_grad():
        expected = [m(x) for x in inputs]
        results: dict[int, list] = {}

        def worker(i: int) -> None:
            results[i] = [m(inputs[(i + r) % 4]) for r in range(8)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(4):
        for r, y in enumerate(results[i]):
            assert torch.equal(y, expected[(i + r) % 4]), (scheme, i, r)


def test_quantizing_in_one_thread_while_another_runs_inference():
    served = model("w4a8").eval()
    x = torch.randn(9, 64)
    with torch.no_grad():
        want = served(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    assert torch.equal(served(x), want)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        for scheme in ("int4", "nf4_dq", "w8a8", "int3"):  # quantize (repack, huge-page arena) meanwhile
            m = model(scheme)
            with torch.no_grad():
                assert torch.isfinite(m(x)).all()
    finally:
        stop.set()
        t.join()
    assert not errors, errors


# ---------------------------------------------------------------------- compile caches
def test_compile_caches_are_keyed_on_torchq_sources():
    from torchq._compile_cache import source_digest, tag_compile_caches

    tag = tag_compile_caches()
    assert tag == f"torchq-{source_digest()}" and tag in torch.compiler.config.cache_key_tag
    assert tag_compile_caches() == tag and torch.compiler.config.cache_key_tag.count(tag) == 1


# ---------------------------------------------------------------------- foreign checkpoints
@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    """A tiny Llama exported by torchq in GPTQ format (a directory from_pretrained reads)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    m = transformers.LlamaForCausalLM(cfg)
    torchq.quantize_(m, torchq.int4_weight_only(group_size=32), filter_fn=lambda mod, name: name != "lm_head")
    out = tmp_path_factory.mktemp("gptq") / "m"
    torchq.save_pretrained(m, str(out), format="gptq")
    return out


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_foreign_checkpoint_damage_raises_checkpoint_error(gptq_dir, tmp_path, data):
    """from_pretrained of a GPTQ directory whose safetensors file was truncated or had its
    header damaged raises CheckpointError before allocating anything the file cannot hold."""
    import shutil

    work = tmp_path / "d"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(gptq_dir, work)
    path = next(work.glob("*.safetensors"))
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    kind = data.draw(st.sampled_from(["truncate", "header_len", "offsets", "header_json"]))
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "header_len":
        blob = struct.pack("<Q", data.draw(st.integers(n + 1, 2**62))) + blob[8:]
    elif kind == "offsets":
        header = json.loads(blob[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name]["data_offsets"][1] += data.draw(st.integers(1, 2**40))
        blob = _join(header, blob[8 + n :])
    else:
        blob = blob[:8] + b"{" * n + blob[8 + n :]
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=path.name):
        torchq.from_pretrained(str(work))


def test_saved_files_get_the_usual_permissions(tmp_path):
    """The temporary file of an atomic save is created like open() would (umask applies)."""
    old = os.umask(0o022)
    try:
        torchq.save_file(model("int8").state_dict(), str(tmp_path / "m.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


@FUZZ
@given(data=st.data())
def test_damaged_gguf_raises_checkpoint_error(tmp_path, data):
    """A truncated or bit-flipped GGUF file loads (the flip hit nothing that matters) or raises
    CheckpointError naming the file; never another exception."""
    pytest.importorskip("gguf")
    from gguf_fixtures import write_tiny_llama

    src = tmp_path / "ok.gguf"
    if not src.exists():
        write_tiny_llama(str(src))
    blob = src.read_bytes()
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        b = bytearray(blob)
        for bit in data.draw(st.lists(st.integers(0, min(len(b), 4096) * 8 - 1), min_size=1, max_size=3)):
            b[bit // 8] ^= 1 << (bit % 8)  # the header and metadata region
        blob = bytes(b)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(blob)
    from torchq.interop.gguf import GGUFFile

    try:
        GGUFFile(str(path)).reader  # noqa: B018  (parsing is what is tested)
    except CheckpointError as e:
        assert "damaged.gguf" in str(e)


# ---------------------------------------------------------------------- fault injection: the build
def test_fresh_build_self_test_passes_here_and_refuses_a_broken_library(tmp_path):
    """Every fresh build is loaded in a child process that formats an error message. This
    host's build passes; a library the child cannot use (here: not a library at all; seen on
    a CUDA image: a compiler linking libstdc++ statically, whose kernels crashed on every
    error message) is deleted and refused with the compiler named and the fix."""
    from torchq.kernels import cpu_ext

    cpu_ext.load()
    name = f"torchq_cpu_{cpu_ext._build_key()}"
    cpu_ext.check_library(cpu_ext._build_dir(name) / f"{name}.so")
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF but not a shared library")
    with pytest.raises(RuntimeError, match=r"CXX=\S+ fail their self-test \(exit status 1\).*Fix: .*CXX=g\+\+"):
        cpu_ext.check_library(junk)
    assert not junk.exists()


def test_a_fresh_build_keeps_the_build_key(tmp_path, monkeypatch):
    """torch's ``cpp_extension.load`` appends its own libraries to the flag lists it is
    given. The key must not change with them: a process that built the kernels itself (a
    fresh CI machine) then looked for its library under another name."""
    from torch.utils import cpp_extension

    from torchq.kernels import cpu_ext

    def load(**kwargs):  # what torch's load does to its arguments, without compiling
        kwargs["extra_ldflags"].append("-ltorch")
        kwargs["extra_cflags"].append("-DTORCH_EXTENSION_NAME=x")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpu_ext, "check_library", lambda lib: None)
    monkeypatch.setattr(cpu_ext, "_AFTER_LOAD", [])
    key = cpu_ext._build_key()
    cpu_ext._load()
    assert cpu_ext._build_key() == key


@pytest.mark.parametrize("fault", ["no_compiler", "broken_cache_dir"])
def test_kernel_build_failure_falls_back_to_references_with_one_warning(tmp_path, fault):
    """A fresh process whose kernel build cannot succeed (no C++ compiler; a cache directory
    that cannot be created) warns once and computes correct results with the references."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if fault == "no_compiler":
        env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-such-c++"), CC=str(tmp_path / "no-such-cc"))
        env["PATH"] = "/nonexistent"  # nor c++ / g++ / ninja on PATH
    else:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        env.update(TORCH_EXTENSIONS_DIR=str(blocker / "ext"))
    code = textwrap.dedent("""
        import warnings, torch, torchq
        from torch import nn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            m = nn.Linear(64, 16)
            x = torch.randn(3, 64)
            torchq.quantize_(m, torchq.int4_weight_only(group_size=32))
            torchq.quantize_(nn.Linear(64, 8), torchq.int8_dynamic_activation_int8_weight())
            y = m(x)
        msgs = [w for w in caught if "building the C++ CPU kernels failed" in str(w.message)]
        assert len(msgs) == 1, [str(w.message)[:200] for w in caught]
        assert m.weight.kernel == "reference.int4_weight_only", m.weight.kernel
        ref = torch.nn.functional.linear(x, m.weight.dequantize(), m.bias)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-3000:]
