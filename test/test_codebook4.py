"""Codebook4Tensor (NF4 / FP4): bitsandbytes equality, linear, tensor ops, checkpoints,
compile, memory, explain, configs and bad input."""

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import torchq
from torchq import Codebook4Tensor
from torchq.primitives.codebook import dequantize_codebook, quantize_codebook, signed_zero_codes, swap_nibbles

bnbf = pytest.importorskip("bitsandbytes.functional")

SCHEMES = ["nf4", "fp4_e2m1", "fp4_e2m1_bnb"]
CONFIGS = {
    "nf4": torchq.nf4_weight_only(),
    "nf4_dq": torchq.nf4_weight_only(double_quant=True),
    "fp4_e2m1": torchq.fp4_weight_only(variant="e2m1"),
    "fp4_bnb_b32": torchq.fp4_weight_only(variant="bnb", block_size=32),
    "fp4_e2m1_dq": torchq.fp4_e2m1(double_quant=True),
}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


# ---------------------------------------------------------------------- bitsandbytes equality
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type,scheme", [("nf4", "nf4"), ("fp4", "fp4_e2m1_bnb")])
@pytest.mark.parametrize("shape,block", [((96, 256), 64), ((40, 96), 32), ((300, 128), 128), ((8, 4096), 4096)])
def test_dequantized_weight_equals_bitsandbytes(quant_type, scheme, double_quant, dtype, shape, block):
    torch.manual_seed(hash((quant_type, double_quant, shape)) % 1000)
    w = (torch.randn(shape) * 0.05).to(dtype)
    w[0, :5] = 0
    packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type=quant_type, compress_statistics=double_quant)
    ref = bnbf.dequantize_4bit(packed, state)
    t = Codebook4Tensor.from_float(w, scheme=scheme, block_size=block, double_quant=double_quant)
    # equal by value: bitsandbytes' CPU quantizer picks +0 or -0 for tiny weights by an argsort
    # tie-break that depends on the CPU (torchq follows the sign rule, test below)
    assert torch.equal(t.dequantize(), ref) and t.dequantize().dtype == ref.dtype
    # same codes too, up to that choice of zero: bitsandbytes' bytes are ours with the nibbles swapped
    c = t.canonical_tensors()
    assert torch.equal(_zero_code_as_plus(swap_nibbles(c["qdata"]), scheme), _zero_code_as_plus(packed, scheme))
    if double_quant:
        assert torch.equal(c["scale_q"].reshape(-1), state.absmax)
        assert torch.equal(c["scale_absmax"], state.state2.absmax)
        assert torch.equal(c["scale_offset"].reshape(()), state.offset)
    else:
        assert torch.equal(c["scale"].reshape(-1), state.absmax)
    # and the import path reads bitsandbytes' storage losslessly (its own zero codes included):
    # the same bytes back, the same values, and the -0 code dequantized to -0. bitsandbytes'
    # own CPU dequantizer gives -0 for that code on AVX2 but +0 from its AVX-512 kernel and
    # its lookup-table fallback, so its zeros are compared by value only
    imported = Codebook4Tensor.from_bnb(packed, state)
    assert torch.equal(swap_nibbles(imported.canonical_tensors()["qdata"]).reshape(-1), packed.reshape(-1))
    assert bits_equal(imported.dequantize(), _with_signed_zeros(ref, packed, scheme))
    if not double_quant:
        p2, absmax = t.to_bnb()
        assert torch.equal(_zero_code_as_plus(p2, scheme), _zero_code_as_plus(packed, scheme))
        assert torch.equal(absmax, state.absmax)


def _with_signed_zeros(values, packed, scheme):
    """``values`` with -0 wherever bitsandbytes' packed code is the format's -0 code."""
    zc = signed_zero_codes(scheme)
    if zc is None:
        return values
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], 1).reshape(values.shape)
    return torch.where(codes == zc[1], torch.tensor(-0.0, dtype=values.dtype), values)


def _zero_code_as_plus(packed, scheme):
    """Packed codes with every -0 code replaced by the +0 code (formats with a signed zero)."""
    zc = signed_zero_codes(scheme)
    if zc is None:
        return packed.reshape(-1)
    plus, minus = zc
    lo, hi = packed.reshape(-1) & 0xF, packed.reshape(-1) >> 4
    lo = torch.where(lo == minus, plus, lo)
    hi = torch.where(hi == minus, plus, hi)
    return (hi << 4) | lo


@pytest.mark.parametrize("scheme", ["fp4_e2m1_bnb"])
def test_signed_zero_rule(scheme):
    """A weight that rounds to zero gets +0 when it is >= 0 and -0 when negative (the sign
    bit of bitsandbytes' CUDA kernel), on every CPU."""
    plus, minus = signed_zero_codes(scheme)
    assert (plus, minus) == (0, 8)
    w = torch.tensor([[1.0, 1e-6, -1e-6, 0.0, -0.0, 2e-3, -2e-3, 1e-30]])
    codes, scale = quantize_codebook(w, 8, scheme)
    assert codes[0, 1:].tolist() == [plus, minus, plus, plus, plus, minus, plus]
    deq = dequantize_codebook(codes, scale, 8, scheme)
    assert torch.signbit(deq[0, 1:]).tolist() == [False, True, False, False, False, True, False]
    assert torch.equal(deq[0, 1:], torch.zeros(7))
    # formats without a -0 decision code keep their documented rule
    assert signed_zero_codes("nf4") is None and signed_zero_codes("fp4_e2m1") is None


def test_bnb_import_rejects_what_it_cannot_represent():
    w = torch.randn(10, 48)
    packed, state = bnbf.quantize_4bit(w, blocksize=32, quant_type="nf4")
    with pytest.raises(ValueError, match="multiple of the block size"):
        Codebook4Tensor.from_bnb(packed, state)


# ---------------------------------------------------------------------- linear
@settings(deadline=None, max_examples=30)
@given(
    m=st.sampled_from([1, 2, 7]),
    n=st.integers(1, 40),
    k=st.integers(1, 150),
    block=st.sampled_from([32, 64, 128]),
    scheme=st.sampled_from(SCHEMES),
    dq=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_reference_linear_equals_linear_of_dequantized(m, n, k, block, scheme, dq, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, 3, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    t = Codebook4Tensor.from_float(w, scheme=scheme, block_size=block, double_quant=dq)
    assert t.padded_in_features == -(-k // block) * block
    deq = t.dequantize(torch.float32)
    assert deq.shape == (n, k)
    y = F.linear(x, t, b)
    ref = F.linear(x.float(), deq, None if b is None else b.float()).to(dtype)
    assert y.dtype == dtype and y.shape == (m, 3, n)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, ref, **tol)


def test_padding_uses_zero_columns():
    torch.manual_seed(0)
    w = torch.randn(6, 100)
    t = Codebook4Tensor.from_float(w, scheme="nf4", block_size=64)
    padded = Codebook4Tensor.from_float(F.pad(w, (0, 28)), scheme="nf4", block_size=64)
    assert t.padded_in_features == 128 and "padded_in_features=128" in repr(t)
    assert torch.equal(t.dequantize(), padded.dequantize()[:, :100])
    a, b = t.canonical_tensors(), padded.canonical_tensors()
    assert torch.equal(a["qdata"], b["qdata"]) and torch.equal(a["scale"], b["scale"])


def test_quantization_error_is_small_and_nf4_beats_uniform_fp4_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    err = {s: float((Codebook4Tensor.from_float(w, scheme=s).dequantize() - w).pow(2).mean() / w.pow(2).mean()) for s in SCHEMES}
    assert err["nf4"] < 0.012  # ~ -20 dB on Gaussian weights
    assert err["nf4"] < err["fp4_e2m1"] and err["nf4"] < err["fp4_e2m1_bnb"]
    assert max(err.values()) < 0.03


# ---------------------------------------------------------------------- tensor ops
def _weight(dq=False, n=20, k=160, block=32, scheme="nf4", dtype=torch.float32):
    torch.manual_seed(1)
    return Codebook4Tensor.from_float(torch.randn(n, k).to(dtype), scheme=scheme, block_size=block, double_quant=dq)


@pytest.mark.parametrize("dq", [False, True])
def test_detach_clone_to_and_repr(dq):
    t = _weight(dq)
    for other in (t.detach(), t.clone(), t.to("cpu"), copy.deepcopy(t)):
        assert isinstance(other, Codebook4Tensor)
        assert torch.equal(other.dequantize(), t.dequantize())
    c = t.clone()
    assert c.qdata.data_ptr() != t.qdata.data_ptr()
    half = t.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.qdata, t.qdata)
    assert half.dequantize().dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating dtype"):
        t.to(torch.int8)
    r = repr(t)
    assert "Codebook4Tensor(shape=(20, 160)" in r and "scheme=nf4" in r and "block_size=32" in r
    assert ("double_quant=True" in r) == dq and "kernel=" in r


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("rows", [(0, 20), (8, 16), (3, 11), (-4, None)])
def test_row_slices(dq, rows):
    # 20 rows x 5 blocks = 100 scales; with 256-scale blocks only row 0 starts one
    t = _weight(dq, n=120)
    full = t.dequantize()
    s = t[rows[0] : rows[1]]
    assert isinstance(s, Codebook4Tensor)
    assert torch.equal(s.dequantize(), full[rows[0] : rows[1]])
    if dq:
        assert s.double_quant == (rows[0] == 0)


def test_row_slice_keeps_double_quant_on_256_scale_boundaries():
    t = _weight(True, n=64, k=256, block=32)  # 8 scales per row: row 32 starts scale 256
    s = t[32:50]
    assert s.double_quant and s.canonical_tensors()["scale_absmax"].shape == (1,)
    assert torch.equal(s.dequantize(), t.dequantize()[32:50])


@pytest.mark.parametrize("dq", [False, True])
def test_column_slices_whole_blocks_only(dq):
    t = _weight(dq, k=150, block=32)  # padded to 160
    full = t.dequantize()
    for start, end in ((32, 96), (64, 150), (0, 32)):
        s = t[:, start:end]
        assert s.shape == (20, end - start)
        assert torch.equal(s.dequantize(), full[:, start:end])
    with pytest.raises(ValueError, match="whole blocks of 32"):
        t[:, 10:40]
    with pytest.raises(NotImplementedError, match="step"):
        t[::2]


def test_embedding_lookup_dequantizes_only_rows():
    for dq in (False, True):
        t = _weight(dq, n=300, k=64)
        idx = torch.tensor([[0, 299, 17], [256, 5, 5]])
        emb = nn.Embedding(300, 64)
        emb.weight = nn.Parameter(t, requires_grad=False)
        assert bits_equal(emb(idx), F.embedding(idx, t.dequantize()))
        with pytest.raises(NotImplementedError, match="max_norm"):
            F.embedding(idx, t, max_norm=1.0)


def test_unknown_ops_raise():
    t = _weight()
    with pytest.raises(NotImplementedError, match="Codebook4Tensor does not support"):
        t + 1
    with pytest.raises(NotImplementedError, match="no silent dequantize"):
        torch.cat([t, t])
    with pytest.raises(NotImplementedError, match="quantized \\*input\\*"):
        F.linear(t, t)
    with pytest.raises(RuntimeError, match="input has 100 features"):
        F.linear(torch.randn(2, 100), t)


@pytest.mark.parametrize("dq", [False, True])
def test_aten_mm_addmm_paths_run_the_same_kernel(dq):
    t = _weight(dq, n=16, k=64)
    x = torch.randn(2, 3, 64)
    b = torch.randn(16)
    y = F.linear(x, t, b)
    assert torch.equal(x @ t.t() + b, y)
    assert torch.equal(torch.matmul(x, t.T) + b, y)
    assert torch.equal(torch.addmm(b, x[0], t.t()), F.linear(x[0], t, b))
    assert type(t.t().t()) is Codebook4Tensor
    with pytest.raises(NotImplementedError, match="right operand of mm"):
        t.t() @ torch.randn(16, 2)


def test_copy_checks_formats():
    a, b = _weight(), _weight()
    b.qdata.zero_()
    b.copy_(a)
    assert torch.equal(b.dequantize(), a.dequantize())
    with pytest.raises(ValueError, match="scheme: nf4 vs fp4_e2m1"):
        _weight().copy_(_weight(scheme="fp4_e2m1"))
    with pytest.raises(ValueError, match="double_quant"):
        _weight().copy_(_weight(dq=True))
    with pytest.raises(TypeError, match="float tensor"):
        _weight().copy_(torch.randn(20, 160))


# ---------------------------------------------------------------------- quantize_ / checkpoints
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 96)
        self.proj = nn.Linear(96, 80, bias=True)
        self.odd = nn.Linear(80, 72, bias=True)  # K=80: padded with block 64
        self.out = nn.Linear(72, 50, bias=False)

    def forward(self, idx):
        return self.out(torch.relu(self.odd(torch.relu(self.proj(self.embed(idx))))))


IDX = torch.tensor([[1, 4, 9, 16, 25]])


def quantized(cfg):
    torch.manual_seed(0)
    m = Net().eval()
    report = torchq.quantize_(m, cfg)
    return m, report


def _fresh():
    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantize_report_and_torch_save_round_trip(name):
    m, report = quantized(CONFIGS[name])
    statuses = {layer.name: (layer.status, layer.note) for layer in report.layers}
    bs = CONFIGS[name].block_size
    if 80 % bs:
        assert statuses["odd"] == ("padded", f"padded K 80->{-(-80 // bs) * bs}")
    assert isinstance(m.proj.weight, Codebook4Tensor) and m.proj.weight.scheme == CONFIGS[name].scheme
    y = m(IDX)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for key in ("proj.weight", "odd.weight", "out.weight"):
        for field, value in m.state_dict()[key].checkpoint_state().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(sd[key].canonical_tensors()[field], value), (key, field)
    same, _ = quantized(CONFIGS[name])
    same.proj.weight.qdata.zero_()
    same.load_state_dict(sd)
    assert torch.equal(same(IDX), y)
    fresh = _fresh()
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(IDX), y)


@pytest.mark.parametrize("name", ["nf4", "nf4_dq", "fp4_e2m1"])
def test_safetensors_round_trip(name, tmp_path):
    m, _ = quantized(CONFIGS[name])
    y = m(IDX)
    path = str(tmp_path / "m.safetensors")
    torchq.save_file(m.state_dict(), path)
    sd = torchq.load_file(path)
    w = sd["odd.weight"]
    assert isinstance(w, Codebook4Tensor) and w.padded_in_features == 128
    fresh = _fresh()
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(IDX), y)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["torchq"])
    entry = header["entries"]["proj.weight"]
    assert entry["format"] == "torchq.codebook4" and entry["version"] == 1
    assert entry["scheme"] == CONFIGS[name].scheme and entry["double_quant"] == CONFIGS[name].double_quant


def test_checkpoint_version_and_format_are_checked():
    state = _weight().checkpoint_state()
    with pytest.raises(ValueError, match="version 2 is not supported"):
        Codebook4Tensor.from_checkpoint_state({**state, "version": 2})
    with pytest.raises(ValueError, match="not a torchq.codebook4 tensor"):
        Codebook4Tensor.from_checkpoint_state({**state, "format": "torchq.affine"})
    with pytest.raises(ValueError, match="scale must be fp32"):
        Codebook4Tensor.from_checkpoint_state({**state, "scale": state["scale"][:, :2]})


# ---------------------------------------------------------------------- compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "name,dtype",
    [("nf4", torch.float32), ("nf4_dq", torch.bfloat16), ("fp4_e2m1", torch.bfloat16), ("fp4_bnb_b32", torch.float32)],
)
def test_compile_fullgraph_matches_eager(name, dtype, fresh_dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 40, bias=False)).to(dtype).eval()
    x = torch.randn(2, 5, 96, dtype=dtype)
    torchq.quantize_(model, CONFIGS[name])
    with torch.no_grad():
        eager = model(x)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        out = compiled(x)
        out2 = compiled(x)
    assert counter.frame_count == 1, "compile fell back or recompiled"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, eager, **tol)
    assert torch.equal(out, out2)


# ---------------------------------------------------------------------- memory / explain
def _bytes(model):
    return sum(m.weight.nbytes_quantized for m in model.modules() if isinstance(m, nn.Linear))


def test_memory_smaller_than_int8_and_close_to_int4_g64():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576), nn.Linear(576, 576)).eval()

    sizes = {}
    for name, cfg in {
        "int8": torchq.int8_weight_only(),
        "int4_g64": torchq.int4_weight_only(group_size=64),
        "nf4": torchq.nf4_weight_only(),
        "nf4_dq": torchq.nf4_weight_only(double_quant=True),
        "fp4_e2m1": torchq.fp4_weight_only(),
        "fp4_bnb": torchq.fp4_weight_only(variant="bnb"),
    }.items():
        m = model()
        torchq.quantize_(m, cfg)
        sizes[name] = _bytes(m)
    int4 = sizes["int4_g64"]
    for name in ("nf4", "nf4_dq", "fp4_e2m1", "fp4_bnb"):
        assert sizes[name] < sizes["int8"], name
        assert sizes[name] <= 1.05 * int4, (name, sizes[name], int4)
    for name in ("nf4", "fp4_e2m1", "fp4_bnb"):  # 4.5 bits/weight vs 4.625
        assert abs(sizes[name] / int4 - 1) <= 0.05, (name, sizes[name], int4)
    assert sizes["nf4_dq"] < 0.92 * int4  # ~4.13 bits/weight
    n_weights = 2 * 576 * 1536 + 576 * 576
    assert sizes["nf4"] == n_weights // 2 + n_weights // 64 * 4


def test_explain_lists_scheme_layout_kernel():
    m, _ = quantized(CONFIGS["nf4_dq"])
    text = torchq.explain(m, print_table=False)
    w = m.proj.weight
    assert "nf4" in text and w.quant_layout in text and w.kernel in text
    assert "codebook4" in w.quant_layout and w.kernel in ("reference.nf4", "cpu.nf4")
    total = _bytes(m)
    assert f"{total} bytes" in text


# ---------------------------------------------------------------------- configs / bad input
def test_configs_json_round_trip_and_aliases():
    for cfg in CONFIGS.values():
        again = torchq.config_from_json(cfg.to_json())
        assert again == cfg and type(again) is type(cfg)
    assert torchq.fp4_weight_only(variant="fp4_e2m1_bnb") == torchq.fp4_e2m1_bnb() == torchq.fp4_weight_only("bnb")
    assert torchq.fp4_weight_only(variant="fp4_e2m1").scheme == "fp4_e2m1"
    assert torchq.fp4_e2m1_bnb().scheme == "fp4_e2m1_bnb" and torchq.nf4_weight_only().scheme == "nf4"
    d = torchq.nf4_weight_only(double_quant=True).to_dict()
    assert d == {"type": "nf4_weight_only", "version": 1, "block_size": 64, "double_quant": True, "pad_policy": "pad"}
    assert torchq.fp4_weight_only().to_dict()["variant"] == "e2m1"


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="variant must be one of"):
        torchq.fp4_weight_only(variant="e3m0")
    with pytest.raises(ValueError, match="block_size must be one of"):
        torchq.nf4_weight_only(block_size=48)
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        torchq.nf4_weight_only(double_quant="yes")
    with pytest.raises(ValueError, match="pad_policy"):
        torchq.nf4_weight_only(pad_policy="drop")
    with pytest.raises(ValueError, match="version 2"):
        torchq.NF4WeightOnlyConfig(version=2)
    with pytest.raises(ValueError, match="unknown 4-bit codebook scheme"):
        Codebook4Tensor.from_float(torch.randn(4, 64), scheme="int4")
    with pytest.raises(TypeError, match="floating-point"):
        Codebook4Tensor.from_float(torch.ones(4, 64, dtype=torch.int32), scheme="nf4")
    with pytest.raises(ValueError, match="2-D"):
        Codebook4Tensor.from_float(torch.randn(2, 4, 64), scheme="nf4")
    with pytest.raises(ValueError, match="empty weight"):
        Codebook4Tensor.from_float(torch.randn(0, 64), scheme="nf4")
    m = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        torchq.quantize_(m, torchq.nf4_weight_only())


def test_largest_group_pad_policy_picks_a_dividing_block():
    m = nn.Sequential(nn.Linear(96, 8))
    report = torchq.quantize_(m, torchq.nf4_weight_only(pad_policy="largest_group"))
    assert m[0].weight.block_size == 32 and m[0].weight.padded_in_features == 96
    assert report.layers[0].note == "group 64->32 (K=96)"


def test_every_kernel_layout_gathers_embedding_rows_without_untiling():
    """A tied 49152-row head serves the embedding lookup: converting the whole table back to the
    canonical layout per call cost 130 ms per token (NF4, SmolLM2). Every kernel layout must
    gather rows directly; prove the lookup never calls ``to_canonical``."""
    import torchq.kernels.cpu_codebook4  # noqa: F401  (registers the codebook layouts)
    from torchq.formats.layouts import get_layout, layout_names

    kernel_layouts = [get_layout(n) for n in layout_names() if not get_layout(n).is_canonical]
    assert kernel_layouts
    missing = [lay.name for lay in kernel_layouts if lay.rows_to_canonical is None]
    assert not missing, f"kernel layouts without a row gather: {missing}"
    for dq in (False, True):
        t = _weight(dq, n=300, k=64)
        layout = get_layout(t.quant_layout)
        if layout.is_canonical:
            pytest.skip("C++ kernels unavailable: weights stay in the canonical layout")
        idx = torch.tensor([[0, 299, 17], [256, 5, 5]])
        want = t.dequantize()[idx]

        def refuse(fields):
            raise AssertionError("embedding lookup untiled the whole table")

        original = layout.to_canonical
        object.__setattr__(layout, "to_canonical", refuse)
        try:
            got = F.embedding(idx, t)
        finally:
            object.__setattr__(layout, "to_canonical", original)
        assert bits_equal(got, want)
