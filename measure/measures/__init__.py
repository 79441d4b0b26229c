"""One class per similarity measure, one module per family; ``measure.registry`` collects them.

Adding a measure is adding a module here with a ``Measure`` subclass (see ``base.py``).
"""

from .base import Measure, Option

__all__ = ["Measure", "Option"]
