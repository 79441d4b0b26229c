"""The measure registry: every ``Measure`` subclass defined in the modules of ``measure.measures``.

``MEASURES`` maps each measure's ``name`` to its class, in ``order``; adding a module with a new
``Measure`` subclass to ``measure/measures/`` registers it, with nothing to edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import measures
from .errors import MeasureError
from .measures.base import Measure

__all__ = ["MEASURES", "get_measure"]


def _collect() -> dict[str, type[Measure]]:
    """The named ``Measure`` subclasses of every module of ``measure.measures``, sorted by ``order``."""
    found: list[type[Measure]] = []
    for module_info in pkgutil.iter_modules(measures.__path__, measures.__name__ + "."):
        module = importlib.import_module(module_info.name)
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, Measure) and obj.__module__ == module.__name__
                  and "name" in vars(obj)]
    collected: dict[str, type[Measure]] = {}
    for cls in sorted(found, key=lambda c: c.order):
        if cls.name in collected:
            other = collected[cls.name]
            raise TypeError(f"Two measures are named {cls.name!r}: {other.__module__}.{other.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}; rename one.")
        collected[cls.name] = cls
    return collected


MEASURES: dict[str, type[Measure]] = _collect()


def get_measure(name: str) -> type[Measure]:
    """The registered measure ``name``; an unknown name lists the valid ones."""
    try:
        return MEASURES[name]
    except KeyError:
        raise MeasureError(f"Unknown measure {name!r}; valid measures: {', '.join(sorted(MEASURES))}.") from None
