"""GPTQ's column loop within one block of columns: the C++ kernel
(``torch.ops.torchq.gptq_block_``, ``csrc/gptq_block.cpp``) and its plain-PyTorch reference.

For each column ``i`` in ``[start, stop)`` of the block ``w`` ``(rows, B)``, every row is
rounded with its own per-column parameters ``scale`` / ``zero`` (``(rows, B)``), the
rounding error ``e = (x - dequantized) / u[i, i]`` is stored in ``err`` and pushed onto
the row's columns ``i..B-1`` (``w[:, i:] -= e u[i, i:]``); the code goes to ``codes``.
The rounding rule (``mode``):

* ``"none"`` (symmetric): ``q = clamp(round(x / s))``, ``x^ = q s``;
* ``"int"`` (integer zero point): ``q = clamp(round(x / s) + z)``, ``x^ = (q - z) s``;
* ``"float"`` (float zero point): ``q = clamp(round((x - z) / s))``, ``x^ = q s + z``;
* ``"codebook"``: ``v = clamp(x / s)``, ``q`` = the index of the nearest of the sorted
  ``levels`` (ties to the lower one), ``x^ = levels[q] s``.

``clamp`` is to ``[qmin, qmax]``; ``round`` is half-to-even. The kernel computes these in
the reference's order (built with ``-ffp-contract=off``): both give the same bits
(tested). Which one runs: :func:`gptq_block_route`; ``impl=`` forces one.
"""

from __future__ import annotations

from typing import Optional

import torch

from torchq.kernels import cpu_ext

__all__ = ["MODES", "gptq_block", "gptq_block_reference", "gptq_block_route"]

MODES = {"none": 0, "int": 1, "float": 2, "codebook": 3}


def gptq_block_reference(w, u, scale, zero, levels, codes, err, start: int, stop: int, mode: str, qmin: float, qmax: float):
    """Plain-PyTorch definition of the kernel (arguments as :func:`gptq_block`)."""
    mids = (levels[:-1] + levels[1:]) / 2 if mode == "codebook" else None
    for i in range(start, stop):
        x, s = w[:, i].clone(), scale[:, i]
        if mode == "none":
            q = torch.round(x / s).clamp(qmin, qmax)
            d = q * s
        elif mode == "int":
            z = zero[:, i]
            q = (torch.round(x / s) + z).clamp(qmin, qmax)
            d = (q - z) * s
        elif mode == "float":
            z = zero[:, i]
            q = torch.round((x - z) / s).clamp(qmin, qmax)
            d = q * s + z
        else:
            idx = torch.bucketize((x / s).clamp(qmin, qmax), mids)
            q, d = idx.float(), levels[idx] * s
        e = (x - d) / u[i, i]
        codes[:, i] = q
        err[:, i] = e
        w[:, i:] -= e[:, None] * u[i, i:]


def gptq_block_route() -> str:
    """``"cpp"`` when the C++ kernels are loaded, else ``"reference"``."""
    return "cpp" if cpu_ext.available() else "reference"


def gptq_block(
    w: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    levels: Optional[torch.Tensor],
    codes: torch.Tensor,
    err: torch.Tensor,
    start: int,
    stop: int,
    mode: str,
    qmin: float,
    qmax: float,
    impl: Optional[str] = None,
) -> None:
    """Round columns ``start..stop-1`` of the block ``w`` in place (see the module docstring).

    ``w``, ``scale``, ``zero``, ``codes``, ``err``: contiguous fp32 ``(rows, B)``; ``u``:
    the block's ``(B, B)`` slice of the upper Cholesky factor of the inverse Hessian;
    ``levels``: the sorted codebook values (mode ``"codebook"`` only). ``impl``:
    ``"cpp"`` / ``"reference"`` (default: :func:`gptq_block_route`)."""
    if mode not in MODES:
        raise ValueError(f"unknown GPTQ rounding mode {mode!r}; choose one of {sorted(MODES)}")
    impl = impl or gptq_block_route()
    if impl == "reference":
        return gptq_block_reference(w, u, scale, zero, levels, codes, err, start, stop, mode, qmin, qmax)
    if impl != "cpp":
        raise ValueError(f"unknown gptq_block impl {impl!r}; choose 'cpp' or 'reference'")
    cpu_ext.load()
    torch.ops.torchq.gptq_block_(w, u, scale, zero, levels, codes, err, start, stop, MODES[mode], qmin, qmax)
