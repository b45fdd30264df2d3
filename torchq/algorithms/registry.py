"""Calibration algorithm table: config type name -> the function that calibrates one block.

Each algorithm module registers itself (``@register_algorithm("gptq")``); importing
:mod:`torchq.algorithms` imports them all. The driver (:mod:`.sequential`) only looks up.
"""

from __future__ import annotations

from typing import Callable

from torchq.algorithms.configs import AlgorithmConfig

__all__ = ["Process", "register_algorithm", "get_algorithm"]

#: process(block, linear names, config, act_scales) -> results per linear
Process = Callable[..., dict]
_ALGORITHMS: dict[str, Process] = {}


def register_algorithm(type_name: str) -> Callable[[Process], Process]:
    def deco(fn: Process) -> Process:
        _ALGORITHMS[type_name] = fn
        return fn

    return deco


def get_algorithm(config: AlgorithmConfig) -> Process:
    try:
        return _ALGORITHMS[config.type_name]
    except KeyError:
        raise TypeError(f"no calibration algorithm registered for {config.type_name!r}; known: {sorted(_ALGORITHMS)}") from None
