"""Which config each linear layer gets, and what happened to it: the per-layer plan and report
shared by :func:`torchq.quantize_`, the calibration driver and the transformers quantizer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torchq.quantize.configs import QuantConfig

__all__ = ["LayerReport", "QuantizationReport", "config_for"]


@dataclass
class LayerReport:
    name: str
    status: str  # quantized | padded | tied | skipped
    config: str
    note: str = ""


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for layer in self.layers if layer.status == status)

    @property
    def quantized(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.status != "skipped"]

    @property
    def skipped(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.status == "skipped"]

    def summary(self) -> str:
        return (
            f"torchq.quantize_: {len(self.layers)} linear layers: {self.count('quantized')} quantized, "
            f"{self.count('padded')} padded, {self.count('tied')} tied, {self.count('skipped')} skipped"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        for layer in self.layers:
            note = f"  ({layer.note})" if layer.note else ""
            lines.append(f"  {layer.status:<9} {layer.name}  [{layer.config}]{note}")
        return "\n".join(lines)


def config_for(
    name: str, config: Optional[QuantConfig], overrides: Mapping[str, Optional[QuantConfig]]
) -> tuple[bool, Optional[QuantConfig]]:
    """(matched_override, config) for a module name."""
    if name in overrides:
        return True, overrides[name]
    for pattern, cfg in overrides.items():
        if re.fullmatch(pattern, name):
            return True, cfg
    return False, config
