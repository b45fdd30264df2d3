"""Storage layouts of quantized codes and the registry that converts between them.

Every layout names the *canonical* layout it derives from and knows how to convert a dict
of inner tensors (``qdata``, ``scale``, ``zero_point``) from canonical to itself and back.
Checkpoints always hold the canonical form; a kernel that wants another arrangement (e.g.
interleaved for SIMD) registers its layout here and the tensor repacks at quantize and load
time. Canonical layouts:

* ``plain_int8``: ``qdata`` int8 ``(N, K_padded)`` holding the signed codes.
* ``packed_int4``: ``qdata`` uint8 ``(N, K_padded / 2)``, two unsigned codes ``q - qmin``
  per byte, low nibble first (see :mod:`torchq.primitives.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from torchq.primitives.packing import pack_int4, unpack_int4

__all__ = ["Layout", "register_layout", "get_layout", "layout_names", "PLAIN_INT8", "PACKED_INT4"]

Fields = dict[str, Optional[torch.Tensor]]
_ROW_FIELDS = ("qdata", "scale", "zero_point")


def _identity(fields: Fields) -> Fields:
    return dict(fields)


@dataclass(frozen=True)
class Layout:
    """A named storage arrangement of the inner tensors of a quantized weight."""

    name: str
    canonical: str
    description: str
    to_layout: Callable[[Fields], Fields] = _identity
    to_canonical: Callable[[Fields], Fields] = _identity
    # optional: (fields, row index) -> canonical qdata/scale/zero_point of those rows only
    rows_to_canonical: Optional[Callable[[Fields, torch.Tensor], Fields]] = None

    @property
    def is_canonical(self) -> bool:
        return self.name == self.canonical

    def canonical_rows(self, fields: Fields, index: torch.Tensor) -> Fields:
        """Canonical ``qdata`` / ``scale`` / ``zero_point`` of rows ``index`` (embedding
        lookups): without converting the whole tensor when the layout can gather rows."""
        if self.rows_to_canonical is not None:
            return self.rows_to_canonical(fields, index)
        c = self.to_canonical(fields)
        return {k: (v.index_select(0, index) if v is not None else None) for k, v in c.items() if k in _ROW_FIELDS}


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    if layout.name in _LAYOUTS and _LAYOUTS[layout.name] != layout:
        raise ValueError(f"layout {layout.name!r} is already registered")
    if layout.canonical != layout.name and layout.canonical not in _LAYOUTS:
        raise ValueError(f"layout {layout.name!r} derives from unknown canonical layout {layout.canonical!r}")
    _LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; registered layouts: {sorted(_LAYOUTS)}") from None


def layout_names() -> list[str]:
    return sorted(_LAYOUTS)


PLAIN_INT8 = register_layout(
    Layout("plain_int8", "plain_int8", "int8 codes, one per byte, row-major (N, K_padded)")
)
PACKED_INT4 = register_layout(
    Layout("packed_int4", "packed_int4", "4-bit codes, two per byte, low nibble = even column (N, K_padded/2)")
)


def codes_from_canonical(layout_name: str, qdata: torch.Tensor, quant_min: int) -> torch.Tensor:
    """Signed integer codes (int8, ``(N, K_padded)``) from canonical ``qdata``."""
    if layout_name == "plain_int8":
        return qdata
    if layout_name == "packed_int4":
        return (unpack_int4(qdata).to(torch.int16) + quant_min).to(torch.int8)
    raise ValueError(f"{layout_name!r} is not a canonical integer layout")


def canonical_from_codes(layout_name: str, codes: torch.Tensor, quant_min: int) -> torch.Tensor:
    """Inverse of :func:`codes_from_canonical`."""
    if layout_name == "plain_int8":
        return codes.to(torch.int8)
    if layout_name == "packed_int4":
        return pack_int4(codes.to(torch.int16) - quant_min)
    raise ValueError(f"{layout_name!r} is not a canonical integer layout")
