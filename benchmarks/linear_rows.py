"""The rows of ``bench_linear``: one registration per way of computing ``y = x @ W^T``.

A row's ``prepare(ctx, act_dtype)`` turns the fp32 weight of one shape into a
:class:`Prepared`: the function that is timed, the bytes of weight (+ scales, zero points)
it reads, and the name of the kernel it runs. torchq rows go through the public API only
(``torchq.quantize_`` on an ``nn.Linear``) and report whichever kernel the weight selected,
so rerunning after new kernels register measures them. Adding a row is one line::

    torchq_row("torchq nf4", lambda: torchq.nf4_weight_only())

Peers whose package is missing, or that raise on this machine, become "did not run"
entries with the reason (never silently dropped).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Prepared", "Row", "ShapeContext", "ROWS", "register_row", "torchq_row", "ACT_DTYPES", "BASELINE"]

#: "fp32 high": fp32 activations under torch.set_float32_matmul_precision("high") (torchq's
#: precision rule then allows bf16 products; see torchq.kernels.numerics)
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32, "fp32 high": torch.float32}

#: (row name, act) that speedups are relative to: bf16 dense, eager.
BASELINE = ("bf16 dense", "bf16")


@dataclass
class Prepared:
    """What one row measures at one shape.

    ``fn(make_input(x))`` is timed (``make_input`` is not); ``to_output(fn_result, x_in)``
    gives the float output compared with fp32 dense for SQNR.
    """

    fn: Callable[[Any], Any]
    weight_bytes: int
    kernel: str
    note: str = ""
    make_input: Callable[[torch.Tensor], Any] = lambda x: x
    to_output: Callable[[Any, Any], torch.Tensor] = lambda y, _x: y
    compiles: bool = False  # the first call at each new input shape compiles: call it untimed first


@dataclass
class ShapeContext:
    """The fp32 weight ``(N, K)`` of one shape, and a cache rows may share (e.g. packing)."""

    weight: torch.Tensor
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass(frozen=True)
class Row:
    name: str
    act: str  # key of ACT_DTYPES
    family: str  # dense | torchq | peer
    prepare: Callable[[ShapeContext, torch.dtype], Prepared]
    unavailable: Callable[[], Optional[str]] = lambda: None  # a reason, or None when runnable

    @property
    def key(self) -> str:
        return f"{self.name} [{self.act}]"


ROWS: list[Row] = []


def register_row(
    name: str,
    prepare: Callable[[ShapeContext, torch.dtype], Prepared],
    *,
    acts: tuple[str, ...] = ("bf16",),
    family: str = "peer",
    unavailable: Callable[[], Optional[str]] = lambda: None,
) -> None:
    """Add one row per activation dtype in ``acts`` (table order = registration order)."""
    for act in acts:
        if act not in ACT_DTYPES:
            raise ValueError(f"unknown activation dtype {act!r}; known: {sorted(ACT_DTYPES)}")
        row = Row(name, act, family, prepare, unavailable)
        if any(r.key == row.key for r in ROWS):
            raise ValueError(f"row {row.key} registered twice")
        ROWS.append(row)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module(module: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        return None if importlib.util.find_spec(module) else f"{module} is not installed"

    return check


def _aten_op(name: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        return None if hasattr(torch.ops.aten, name) else f"torch {torch.__version__} has no aten.{name}"

    return check


def _group_for(k: int, preferred: int = 128) -> tuple[int, str]:
    """Largest group <= ``preferred`` dividing K (peers cannot pad), with a note if changed."""
    for g in (preferred, 64, 32):
        if g <= preferred and k % g == 0:
            return g, "" if g == preferred else f"group {g} (K={k} not a multiple of {preferred})"
    raise ValueError(f"K={k} is not a multiple of 32")


# ---------------------------------------------------------------------- dense
def _dense(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    w = ctx.weight.to(dtype)
    return Prepared(lambda x: F.linear(x, w), _nbytes(w), "aten.linear")


def _dense_compiled(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    """torch.compile with Inductor freezing (weights folded and prepacked as constants).

    ``torch._inductor.config.freezing`` must be on when each M compiles (its first call);
    bench_linear turns it on for the whole run and restores it afterwards.
    """
    lin = nn.Linear(ctx.k, ctx.n, bias=False).to(dtype)
    lin.weight = nn.Parameter(ctx.weight.to(dtype), requires_grad=False)
    compiled = torch.compile(lin, dynamic=False)
    return Prepared(compiled, _nbytes(lin.weight), "inductor (freezing)", compiles=True)


register_row("fp32 dense", _dense, acts=("fp32",), family="dense")
register_row("bf16 dense", _dense, acts=("bf16",), family="dense")
register_row("bf16 dense compiled", _dense_compiled, acts=("bf16",), family="dense")


# ---------------------------------------------------------------------- torchq
def _call_under(fn: Callable[[Any], Any], precision: Optional[str], tunables: dict) -> Callable[[Any], Any]:
    """``fn`` run under a float32 matmul precision and kernel tunables (restored after each call)."""
    if precision is None and not tunables:
        return fn

    def call(x):
        old_p = torch.get_float32_matmul_precision()
        old_t = {k: torch.ops.torchq._tune(k, v) for k, v in tunables.items()}
        if precision:
            torch.set_float32_matmul_precision(precision)
        try:
            return fn(x)
        finally:
            torch.set_float32_matmul_precision(old_p)
            for k, v in old_t.items():
                torch.ops.torchq._tune(k, v)

    return call


def torchq_row(
    name: str,
    make_config: Callable[[], Any],
    acts: tuple[str, ...] = ("fp32", "bf16"),
    tunables: Optional[dict] = None,
) -> None:
    """Register a torchq scheme: ``quantize_`` an ``nn.Linear`` in the activation dtype
    (as a user would after ``model.to(dtype)``) and time ``F.linear`` on it. Act ``"fp32
    high"`` calls it under matmul precision "high"; ``tunables`` (``torch.ops.torchq._tune``)
    force a kernel route, to compare routes on one machine."""

    def prepare_act(act: str):
        def prepare(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
            import torchq

            cfg = make_config()
            lin = nn.Linear(ctx.k, ctx.n, bias=False, device="meta")
            lin.weight = nn.Parameter(ctx.weight.to(dtype), requires_grad=False)
            report = torchq.quantize_(lin, cfg)
            w = lin.weight
            fn = _call_under(lambda x: F.linear(x, w), "high" if act == "fp32 high" else None, tunables or {})
            return Prepared(fn, w.nbytes_quantized, w.kernel, report.layers[0].note)

        return prepare

    for act in acts:
        register_row(name, prepare_act(act), acts=(act,), family="torchq")


torchq_row("torchq int8 wo", lambda: __import__("torchq").int8_weight_only())
torchq_row("torchq int4 wo g128", lambda: __import__("torchq").int4_weight_only(group_size=128), ("fp32", "bf16", "fp32 high"))
# the large-M routes side by side (the amx path's default is the oneDNN route; elsewhere it is forced here)
torchq_row("torchq int4 wo g128 oneDNN route", lambda: __import__("torchq").int4_weight_only(group_size=128),
           ("bf16", "fp32 high"), tunables={"onednn_route": 1})
torchq_row("torchq int4 wo g32", lambda: __import__("torchq").int4_weight_only(group_size=32))
torchq_row("torchq W8A8", lambda: __import__("torchq").int8_dynamic_activation_int8_weight())
torchq_row("torchq W4A8 g128", lambda: __import__("torchq").int8_dynamic_activation_int4_weight(group_size=128))
torchq_row("torchq int4 wo g64", lambda: __import__("torchq").int4_weight_only(group_size=64))
torchq_row("torchq nf4 b64", lambda: __import__("torchq").nf4_weight_only(), ("fp32", "bf16", "fp32 high"))
torchq_row("torchq nf4 b64 dq", lambda: __import__("torchq").nf4_weight_only(double_quant=True))
torchq_row("torchq fp4 e2m1 b64", lambda: __import__("torchq").fp4_weight_only(variant="e2m1"))
torchq_row("torchq fp4 bnb b64", lambda: __import__("torchq").fp4_weight_only(variant="bnb"))


# ---------------------------------------------------------------------- aten peers
def _aten_int4(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    """``aten._weight_int4pack_mm_for_cpu`` (torchao's CPU int4 path): asymmetric int4,
    tinygemm convention ``w = (q - 8) * scale + zero``; scales/zeros in the activation dtype."""
    g, note = _group_for(ctx.k)

    def pack():
        n, k = ctx.weight.shape
        wg = ctx.weight.reshape(n, k // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.clamp(torch.round((wg - lo) / scale), 0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)
        return packed, sz

    packed, sz = ctx.cached(("aten_int4", g), pack)
    sz = sz.to(dtype)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    return Prepared(lambda x: op(x, packed, g, sz), _nbytes(packed, sz), "aten._weight_int4pack_mm_for_cpu", note)


def _int8_per_channel(ctx: ShapeContext) -> tuple[torch.Tensor, torch.Tensor]:
    def make():
        scale = (ctx.weight.abs().amax(1) / 127).clamp(min=1e-12)
        return torch.round(ctx.weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    return ctx.cached("int8_per_channel", make)


def _aten_int8(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    q, scale = _int8_per_channel(ctx)
    s = scale.to(dtype)
    op = torch.ops.aten._weight_int8pack_mm
    return Prepared(lambda x: op(x, q, s), _nbytes(q, s), "aten._weight_int8pack_mm")


def _quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager per-token symmetric int8 (what a user writes around ``_int_mm``)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def _int_mm_alone(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    """``torch._int_mm`` on pre-quantized int8 activations: the integer GEMM only."""
    q, scale = _int8_per_channel(ctx)
    qt = q.t()
    return Prepared(
        lambda xq: torch._int_mm(xq[0], qt),
        _nbytes(q, scale),
        "aten._int_mm",
        make_input=_quantize_rows_int8,
        to_output=lambda acc, xq: acc.float() * xq[1] * scale,
    )


def _int_mm_epilogue(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    """W8A8 done by hand in eager: quantize activations per token, ``_int_mm``, rescale."""
    q, scale = _int8_per_channel(ctx)
    qt = q.t()

    def fn(x: torch.Tensor) -> torch.Tensor:
        xq, xs = _quantize_rows_int8(x)
        return (torch._int_mm(xq, qt).float() * xs * scale).to(x.dtype)

    return Prepared(fn, _nbytes(q, scale), "aten._int_mm + eager epilogue")


register_row("aten int4pack_mm g128", _aten_int4, acts=("bf16", "fp32"), unavailable=_aten_op("_weight_int4pack_mm_for_cpu"))
register_row("aten int8pack_mm", _aten_int8, acts=("bf16", "fp32"), unavailable=_aten_op("_weight_int8pack_mm"))
register_row("aten _int_mm alone", _int_mm_alone, acts=("int8",))
register_row("aten _int_mm + epilogue", _int_mm_epilogue, acts=("bf16", "fp32"))


# ---------------------------------------------------------------------- torchao
def _torchao(
    make_config: Callable[[int], Any], kernel: str, grouped: bool = False
) -> Callable[[ShapeContext, torch.dtype], Prepared]:
    """A torchao config (``make_config(group_size)``) applied with torchao's ``quantize_``."""

    def prepare(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import quantize_

        g, note = _group_for(ctx.k) if grouped else (0, "")
        lin = nn.Linear(ctx.k, ctx.n, bias=False, device="meta")
        lin.weight = nn.Parameter(ctx.weight.to(dtype), requires_grad=False)
        quantize_(lin, make_config(g))
        w = lin.weight
        inner = [getattr(w, n) for n in getattr(w, "tensor_data_names", []) + getattr(w, "optional_tensor_data_names", [])]
        nbytes = _nbytes(*[t for t in inner if isinstance(t, torch.Tensor)])
        return Prepared(lambda x: F.linear(x, w), nbytes, f"{type(w).__name__}: {kernel}", note)

    return prepare


def _ao_int8_wo(g: int):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _ao_w8a8(g: int):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _ao_int4_wo(g: int):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g))


def _ao_w4a8(g: int):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(g))


_ao = _module("torchao")
register_row("torchao int8 wo", _torchao(_ao_int8_wo, "int8 weight cast + mm"), unavailable=_ao)
register_row("torchao W8A8", _torchao(_ao_w8a8, "int_scaled_matmul"), unavailable=_ao)
register_row("torchao int4 wo g128 (intx)", _torchao(_ao_int4_wo, "dequantize + linear", grouped=True), unavailable=_ao)
register_row("torchao W4A8 g128 (intx)", _torchao(_ao_w4a8, "fake-quant act + dequantize + linear", grouped=True), unavailable=_ao)


# ---------------------------------------------------------------------- bitsandbytes
def _bnb_nf4(ctx: ShapeContext, dtype: torch.dtype) -> Prepared:
    """bitsandbytes NF4, block 64, no double quantization: ``matmul_4bit`` on CPU."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(ctx.weight.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=False)
    qt = q.t()
    fused = bool(getattr(state, "packing_format_for_cpu", False))
    kernel = "bnb gemv_4bit (fused CPU)" if fused else "bnb dequantize_4bit + linear"
    return Prepared(
        lambda x: bnb.matmul_4bit(x, qt, quant_state=state), _nbytes(q, state.absmax), kernel, "NF4 block 64"
    )


register_row("bnb nf4", _bnb_nf4, acts=("bf16", "fp32"), unavailable=_module("bitsandbytes"))
