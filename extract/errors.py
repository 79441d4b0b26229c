"""The errors of the extract side, in one leaf module every layer may import.

Each names what went wrong and how to fix it; the command line prints them as
one line (``extract.cli.exit_on_known_errors``).
"""

from __future__ import annotations

__all__ = ["LayerSelectionError", "ReductionError", "SpecError", "StoreError"]


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupt, or not a simtorch store."""


class LayerSelectionError(ValueError):
    """A layer pattern or output selector does not fit the model."""


class SpecError(ValueError):
    """A model, weights or data spec that cannot be loaded."""


class ReductionError(ValueError):
    """A reduction that is unknown or does not fit a layer."""
