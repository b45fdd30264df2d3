"""Short algorithm names (the CLI's ``--algo``): name -> factory(storage config) -> config."""

from __future__ import annotations

from typing import Callable

from torchq.quantize.configs import QuantConfig
from torchq.algorithms.configs import AWQ, GPTQ, HQQ, AutoRound, SmoothQuant

__all__ = ["ALGORITHM_NAMES", "with_algorithm"]

ALGORITHM_NAMES: dict[str, Callable[[QuantConfig], QuantConfig]] = {
    "rtn": lambda base: base,
    "gptq": GPTQ,
    "gptq-act-order": lambda base: GPTQ(base, static_groups=False),  # act-order through a stored perm
    "awq": AWQ,
    "awq+gptq": lambda base: AWQ(GPTQ(base)),
    # no act_scale where no op can take a scale (o_proj under GQA): exports to AutoAWQ / GPTQ / compressed-tensors
    "awq-exportable": lambda base: AWQ(base, unfoldable="skip"),
    "awq+gptq-exportable": lambda base: AWQ(GPTQ(base), unfoldable="skip"),
    "hqq": HQQ,
    "autoround": AutoRound,
    "autoround-light": lambda base: AutoRound(base, preset="light"),
    # bf16 products in the tuning (as auto-round on CPU): faster where the CPU has AVX512-BF16 / AMX
    "autoround-bf16": lambda base: AutoRound(base, compute_dtype="bfloat16"),
    "autoround-light-bf16": lambda base: AutoRound(base, preset="light", compute_dtype="bfloat16"),
    "smoothquant": SmoothQuant,
}


def with_algorithm(name: str, base: QuantConfig) -> QuantConfig:
    """``base`` wrapped in algorithm ``name`` (invalid pairs raise naming the valid bases)."""
    if name not in ALGORITHM_NAMES:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHM_NAMES)}")
    return ALGORITHM_NAMES[name](base)
