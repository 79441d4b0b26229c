"""The error every layer of ``measure`` raises for input it cannot measure."""

from __future__ import annotations

__all__ = ["MeasureError"]


class MeasureError(ValueError):
    """Input that a measure cannot be computed on (shapes, values, options)."""
