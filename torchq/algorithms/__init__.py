"""Calibration algorithms (GPTQ, AWQ, AutoRound, HQQ, SmoothQuant) for :func:`torchq.quantize_`.

Each algorithm wraps a storage config (``GPTQ(int4_weight_only(group_size=64))``) and
produces the storage config's ordinary tensors. :mod:`.sequential` drives calibration one
decoder layer at a time; :mod:`.grid` defines what each storage format can round to.
"""

from torchq.algorithms.configs import (
    AWQ,
    AWQConfig,
    AlgorithmConfig,
    AutoRound,
    AutoRoundConfig,
    GPTQ,
    GPTQConfig,
    HQQ,
    HQQConfig,
    SmoothQuant,
    SmoothQuantConfig,
    VALID_BASES,
)
from torchq.algorithms.data import calibration_data
from torchq.algorithms import autoround, awq, gptq, hqq, smoothquant  # noqa: F401  (register the algorithms)
from torchq.algorithms import handlers  # noqa: F401  (registers handlers for the algorithm configs)
from torchq.algorithms.sequential import calibrate as _calibrate
from torchq.quantize.api import register_calibrator as _register_calibrator

_register_calibrator(_calibrate)  # quantize_(..., calibration=...) hands algorithm configs to it

__all__ = [
    "AlgorithmConfig",
    "GPTQ",
    "GPTQConfig",
    "HQQ",
    "HQQConfig",
    "AWQ",
    "AWQConfig",
    "SmoothQuant",
    "SmoothQuantConfig",
    "AutoRound",
    "AutoRoundConfig",
    "VALID_BASES",
    "calibration_data",
]
