"""Handlers for algorithm configs on the plain (per-weight, no data) path of ``quantize_``.

HQQ is data-free and registers its own handler (:mod:`.hqq`). The others need calibration
inputs: reaching them without data (e.g. ``TorchqConfig(GPTQ(...))`` quantizing while a
checkpoint loads) raises, saying how to calibrate.
"""

from __future__ import annotations

from torchq.quantize.handlers import register_handler
from torchq.algorithms.configs import AWQConfig, AutoRoundConfig, GPTQConfig, SmoothQuantConfig
from torchq.algorithms import hqq  # noqa: F401  (HQQ's handler)


@register_handler(GPTQConfig)
@register_handler(AWQConfig)
@register_handler(AutoRoundConfig)
@register_handler(SmoothQuantConfig)
def _needs_data(weight, config):
    raise ValueError(
        f"{type(config).__name__} needs calibration data: quantize the float model with "
        f"torchq.quantize_(model, config, calibration=torchq.calibration_data(tokenizer)), then save it "
        "(a checkpoint loads without data); data-free: HQQ or the storage config itself"
    )
