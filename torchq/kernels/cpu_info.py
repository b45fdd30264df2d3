"""What this CPU offers the kernels and which path each of them takes: the report that goes
into bug reports and into the header of benchmark tables (``python -m torchq.kernels``)."""

from __future__ import annotations

import platform

import torch

from torchq.kernels import cpu_ext
from torchq.kernels.cpu_kernels import BF16_MIN_M, GEMM_MIN_M
from torchq.kernels.numerics import weight_only_route

__all__ = ["cpu_model", "cpu_features", "cpu_report", "cpu_summary"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The x86 features the kernel paths depend on, as cpuid (and the OS) report them."""
    cpu_ext.load()
    return torch.ops.torchq._cpu_features().split()


def cpu_summary() -> str:
    """One line: model, kernel paths this CPU runs, the path in use, threads."""
    if not cpu_ext.available():
        return f"{cpu_model()}; C++ kernels unavailable (reference kernels)"
    return (
        f"{cpu_model()}; kernel paths {'/'.join(cpu_ext.supported_isas())}, using {cpu_ext.current_isa()}; "
        f"{torch.get_num_threads()} threads"
    )


def cpu_report() -> str:
    """Features, paths, precision setting and the route each weight-only call takes now."""
    lines = [f"cpu: {cpu_model()}", f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if not cpu_ext.available():
        lines.append(f"C++ kernels unavailable: {cpu_ext.build_error()!r}; the reference kernels run")
        return "\n".join(lines)
    lines += [
        f"features: {' '.join(cpu_features()) or '(none of interest)'}",
        f"native bf16 dot product: {bool(torch.ops.torchq._native_bf16())}",
        f"kernel paths: {', '.join(cpu_ext.supported_isas())}; in use: {cpu_ext.current_isa()} (TORCHQ_ISA forces one)",
        f"float32 matmul precision: {torch.get_float32_matmul_precision()}",
        "weight-only kernels (int4, int8, intx, nf4, fp4), by activation dtype:",
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        big = weight_only_route(dtype, BF16_MIN_M)
        lines.append(
            f"  {str(dtype).replace('torch.', ''):<9} M<{GEMM_MIN_M}: fp32 GEMV; "
            f"M>={GEMM_MIN_M}: fp32 GEMM" + (f"; M>={BF16_MIN_M}: {big}" if big != "fp32" else "")
        )
    lines.append("w8a8 / w4a8: int8 activations per token, int8 x int8 -> int32 (VNNI on avx512)")
    return "\n".join(lines)
