"""``torchq.explain(model)`` (this module): which scheme, layout and kernel every quantized layer runs, and in
which arithmetic under this CPU's kernel path and the current precision setting."""

from __future__ import annotations

from torch import nn

from torchq.formats.base import TorchqTensor

__all__ = ["explain", "explain_rows"]


def _host_line() -> str:
    import torch

    from torchq.kernels import cpu_ext

    path = cpu_ext.current_isa() if cpu_ext.available() else "reference kernels (C++ build failed)"
    return f"kernel path: {path}; float32 matmul precision: {torch.get_float32_matmul_precision()}"


def explain_rows(model: nn.Module) -> list[dict]:
    """One dict per module whose ``weight`` is a torchq tensor (linear or tied embedding)."""
    rows = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, TorchqTensor):
            continue
        rows.append(
            dict(
                layer=name,
                kind=type(mod).__name__,
                scheme=getattr(w, "scheme", "?"),
                layout=getattr(w, "quant_layout", "?"),
                kernel=getattr(w, "kernel", "?"),
                shape="x".join(str(s) for s in w.shape),
                bytes=w.nbytes_quantized,
                arithmetic=_arithmetic_now(getattr(w, "kernel", "?"), w),
            )
        )
    return rows


def _arithmetic_now(name: str, weight) -> str:
    """What the layer's kernel computes in now, for activations of the weight's dtype."""
    from torchq.formats.dispatch import get_kernel

    try:
        return get_kernel(name).arithmetic(weight)
    except KeyError:
        return "unknown kernel"


def _kernel_note(name: str) -> str:
    """A kernel's numerics string (host-independent, so the table is reproducible)."""
    from torchq.formats.dispatch import get_kernel

    try:
        return get_kernel(name).numerics
    except KeyError:
        return "unknown kernel"


def explain(model: nn.Module, print_table: bool = True) -> str:
    """A table of every quantized layer: scheme, layout, kernel, weight bytes and the arithmetic
    it runs now (this CPU's kernel path, ``torch.get_float32_matmul_precision()``, activations
    of the weight's dtype), then one line per kernel used with its numerics on every host, and
    the CPU line (``python -m torchq.kernels`` prints the full CPU report). Printed and returned.

    A weight shared by several modules (tied embedding / LM head) is listed under each but
    counted once in the total.
    """
    rows = explain_rows(model)
    headers = ["layer", "kind", "scheme", "layout", "kernel", "shape", "bytes", "arithmetic"]
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*c) for c in cells]
    seen, total = set(), 0
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, TorchqTensor) and id(w) not in seen:
            seen.add(id(w))
            total += w.nbytes_quantized
    lines.append(f"{len(rows)} quantized modules, {total} bytes of quantized weights")
    for name in sorted({r["kernel"] for r in rows}):
        lines.append(f"{name}: {_kernel_note(name)}")
    lines.append(_host_line())
    text = "\n".join(lines)
    if print_table:
        print(text)
    return text
