"""Kernels and torch.compile: which kernel each layer runs, how fast, and compiled graphs.

torchq picks a kernel for every quantized weight when it is built (quantize time, load
time): the C++ CPU kernels (``torch.ops.torchq.*``, compiled on first use and cached) when
they accept the weight, else the plain-PyTorch references. This tutorial

1. quantizes a small MLP with SmolLM2-135M's layer shapes,
2. shows the chosen kernels and their numerics with ``torchq.explain`` and the ISA path
   the C++ kernels run (AVX-512 / AVX2 / portable, chosen from cpuid; ``TORCHQ_ISA`` forces one),
3. checks them against the reference kernels and times decode-sized calls,
4. compiles the model with ``torch.compile(fullgraph=True)``: the C++ ops stay in the
   graph (they have fake implementations), around them Inductor's C++ backend generates
   code for the rest. (Triton-CPU is not installable here; the compiled path is C++ ops
   plus Inductor's C++ backend.)

Runs in well under a minute once the kernels are built (the very first build takes about
a minute and is cached under ~/.cache/torchq).
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import torchq
from torchq.kernels import cpu_ext
from torchq.formats.dispatch import prefer_kernels


class MLP(nn.Module):
    """A SmolLM2-135M feed-forward block: 576 -> 1536 (gate, up) -> 576."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(576, 1536, bias=False)
        self.up = nn.Linear(576, 1536, bias=False)
        self.down = nn.Linear(1536, 576, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def best_time(fn, reps: int = 50) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _on(isa: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with cpu_ext.force_isa(isa):
        return module(x)


def main() -> None:
    torch.manual_seed(0)
    float_model = MLP().eval()
    x1 = torch.randn(1, 576)  # one decode token
    x64 = torch.randn(64, 576)  # a short prefill

    # 1-2. quantize; explain shows scheme, layout, kernel and each kernel's numerics
    model = copy.deepcopy(float_model)
    torchq.quantize_(model, torchq.int4_weight_only(group_size=64), overrides={"down": torchq.int8_dynamic_activation_int4_weight(group_size=64)})
    torchq.explain(model)
    print(f"\nC++ kernels built: {cpu_ext.available()}; ISA paths on this CPU: {cpu_ext.supported_isas()}; "
          f"running: {cpu_ext.current_isa()}; threads: {torch.get_num_threads()}")

    # 3. the same model on the reference kernels. Layer by layer, on identical inputs, the
    # outputs agree to fp32 rounding. (End to end they may differ a little more: W4A8
    # rounds its activations to int8, and an input that differs in the last fp32 bit can
    # land on the other side of a rounding boundary.)
    with prefer_kernels("reference"):
        ref_model = copy.deepcopy(float_model)
        torchq.quantize_(ref_model, torchq.int4_weight_only(group_size=64), overrides={"down": torchq.int8_dynamic_activation_int4_weight(group_size=64)})
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            lin, ref_lin = getattr(model, name), getattr(ref_model, name)
            for m in (1, 64):
                x = torch.randn(m, lin.in_features)
                y, y_ref = lin(x), ref_lin(x)
                rel = float((y - y_ref).norm() / y_ref.norm())
                worst_isa = max(
                    float((_on(isa, lin, x) - y_ref).norm() / y_ref.norm()) for isa in cpu_ext.supported_isas()
                )
                print(f"{name:>4} M={m:>2} ({lin.weight.kernel}): C++ vs reference relative difference {rel:.1e}, "
                      f"worst over ISA paths {worst_isa:.1e}")
                assert worst_isa < 1e-5

        # 3b. the precision rule: PyTorch's own switch decides whether fp32 activations may
        # use bf16 products (only from 32 rows, only where the CPU has a bf16 dot product)
        from torchq.kernels.numerics import weight_only_route

        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            route = weight_only_route(torch.float32, 64)
            print(f"matmul precision {precision!r}: fp32 activations, M=64 -> {route}")
            if precision == "highest":
                assert route == "fp32"  # PyTorch's default: fp32 arithmetic on every CPU
        torch.set_float32_matmul_precision("highest")

        print("\nlatency per call (best of 50):")
        for name, m in (("float32 dense", float_model), ("torchq C++", model), ("torchq reference", ref_model)):
            t1, t64 = best_time(lambda: m(x1)), best_time(lambda: m(x64), 10)
            print(f"  {name:<17} M=1 {t1 * 1e6:8.0f} us   M=64 {t64 * 1e3:7.2f} ms")

    # 4. torch.compile(fullgraph=True): the torchq ops are in the graph, no breaks
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    recorder = AotEagerAndRecordGraphs()
    with torch.no_grad():
        torch.compile(model, backend=recorder, fullgraph=True)(x64)
    ops = sorted({line.split("torch.ops.")[1].split("(")[0] for g in recorder.fw_graphs for line in g.code.splitlines() if "torch.ops.torchq" in line})
    print(f"\ntorchq ops in the compiled graph: {ops}")

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # Inductor (C++ backend) around the torchq ops
    with torch.no_grad():
        start = time.perf_counter()
        y = compiled(x64)
        print(f"Inductor compile + first call: {time.perf_counter() - start:.1f} s")
        assert torch.allclose(y, model(x64), rtol=1e-4, atol=1e-5)
        t = best_time(lambda: compiled(x1))
    print(f"compiled, M=1: {t * 1e6:.0f} us per call (matches eager to fp32 rounding)")


if __name__ == "__main__":
    main()
