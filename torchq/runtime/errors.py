"""The runtime's error for models it does not run."""

from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(NotImplementedError):
    """The model (or one of its weights) uses something the fused decoder does not run; the
    message names it. Plain ``model.generate`` still works for such a model."""
