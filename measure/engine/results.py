"""``PairResult``: one measure on one ordered pair of stores, as the engine returns it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..measures.base import Measure

__all__ = ["PairResult"]


@dataclass
class PairResult:
    """One measure on one (ordered) pair of stores.

    Attributes
    ----------
    measure : str
    options : dict
        The resolved options of the measure.
    store_a, store_b : str
        Model names of the row and column stores.
    rows, cols : list of str
        Layer names of ``store_a`` and ``store_b``.
    matrix : ndarray of shape (len(rows), len(cols))
    spec : Measure
        The measure definition (``measure.MEASURES[measure]``): kind, range, reference...
    extras : dict
        Per-layer by-products keyed by side and layer (dCKA's variance explained...), or the route.
    inference : dict
        Permutation p-values and/or bootstrap bounds (matrices shaped like ``matrix``) and how they
        were made (``measure.inference.add_statistics``); written as "statistics" in manifests.
    """

    measure: str
    options: dict[str, Any]
    store_a: str
    store_b: str
    rows: list[str]
    cols: list[str]
    matrix: np.ndarray
    spec: type[Measure]
    extras: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)

    def best_matches(self) -> list[tuple[str, str, float]]:
        """For each row layer, the most similar column layer (smallest value for distances)."""
        pick = np.nanargmin if self.spec.kind == "distance" else np.nanargmax
        out = []
        for i, row in enumerate(self.rows):
            values = self.matrix[i]
            if np.all(np.isnan(values)):
                out.append((row, "", float("nan")))
            else:
                j = int(pick(values))
                out.append((row, self.cols[j], float(values[j])))
        return out
