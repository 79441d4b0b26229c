"""Refinement: recompute exactly the sketched values a researcher cares about.

``cka_sketch`` screens a zoo with a stated error; ``refine`` then takes its results, picks the
layer pairs that matter — by default the K most and the K least similar, and every pair whose
sketched value lies within the error ``margin`` of a user ``threshold`` (the only ones the sketch
cannot place on a side of it) — recomputes those pairs exactly with the engine (``cka``, the
value the sketch estimates), and returns the results with exactly those entries replaced and
listed in ``extras["refined"]``.

A selected pair is one entry of the results table: (store A, layer a, store B, layer b), counted
once for a symmetric measure (the entry and its transpose are one pair; a layer with itself, always 1,
is never selected). The exact values are computed per store pair, all layers at once (a store pair's
Grams are formed once), but only the selected entries are replaced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MeasureError
from .registry import get_measure

__all__ = ["Cell", "refine", "select_cells"]


@dataclass(frozen=True, order=True)
class Cell:
    """One entry of the results: layer ``row`` of store ``store_a`` with layer ``col`` of store ``store_b``."""

    store_a: str
    row: str
    store_b: str
    col: str


def _candidates(results: Sequence[Any]) -> list[tuple[Cell, float]]:
    """Every distinct pair of the results with its value (a symmetric pair once, no layer with itself, no NaN)."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in results:
        for i, row in enumerate(r.rows):
            for j, col in enumerate(r.cols):
                value = float(r.matrix[i, j])
                if math.isnan(value) or (r.store_a == r.store_b and row == col):
                    continue
                key = (r.store_a, row, r.store_b, col)
                if r.spec.symmetric:
                    key = min(key, (r.store_b, col, r.store_a, row))
                if key in seen:
                    continue
                seen.add(key)
                out.append((Cell(*key), value))
    return out


def default_margin(results: Sequence[Any], z: float = 3.0) -> float:
    """``z`` times the largest stated standard deviation of the results (``extras["approximate"]["std"]``)."""
    stds = [r.extras.get("approximate", {}).get("std") for r in results]
    stds = [s for s in stds if s is not None]
    if not stds:
        raise MeasureError("The results carry no stated error (extras['approximate']); pass margin= explicitly.")
    return z * max(stds)


def select_cells(results: Sequence[Any], k: int, *, threshold: float | None = None,
                 margin: float | None = None) -> list[Cell]:
    """The pairs to recompute: the ``k`` most and the ``k`` least similar, and those within ``margin`` of ``threshold``.

    Parameters
    ----------
    results : sequence of PairResult
        Sketched results (``cka_sketch``), of one measure.
    k : int
        Pairs taken from each end of the ranking (≥ 0); for a distance, "most similar" is the smallest.
    threshold : float, optional
        A value the researcher decides by; every pair with |value − threshold| ≤ margin is selected too.
    margin : float, optional
        Half-width of the band around ``threshold``; by default three stated standard deviations
        (``default_margin``).

    Returns
    -------
    list of Cell
        Distinct pairs: the threshold band (nearest first), then the most and the least similar.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MeasureError(f"k must be a non-negative integer (pairs from each end of the ranking), got {k!r}.")
    names = sorted({r.measure for r in results})
    if len(names) > 1:
        raise MeasureError(f"select_cells takes the results of one measure, got {names}; select per measure.")
    candidates = _candidates(results)
    distance = bool(results) and results[0].spec.kind == "distance"
    ranked = sorted(candidates, key=lambda cv: (cv[1], cv[0]), reverse=not distance)  # most similar first
    chosen: dict[Cell, None] = {}
    if threshold is not None:
        band = default_margin(results) if margin is None else float(margin)
        near = sorted((abs(v - threshold), c) for c, v in candidates if abs(v - threshold) <= band)
        chosen.update((c, None) for _, c in near)
    chosen.update((c, None) for c, _ in ranked[:k])
    chosen.update((c, None) for c, _ in ranked[::-1][:k])
    return list(chosen)


def refine(engine: Any, results: Sequence[Any], cells: Sequence[Cell], measure: str = "cka",
           options: dict[str, Any] | None = None) -> list[Any]:
    """``results`` with the entries of ``cells`` recomputed exactly by ``engine`` under ``measure``.

    Parameters
    ----------
    engine : measure.engine.Engine
        An engine over (at least) the stores named in ``cells``.
    results : sequence of PairResult
        The sketched results; not modified.
    cells : sequence of Cell
        The pairs to recompute (``select_cells``).
    measure : str, default="cka"
        The exact measure the sketch estimates.
    options : dict, optional
        Its options (``{"route": "gram"}`` ...).

    Returns
    -------
    list of PairResult
        Copies of ``results``; in each, every entry of ``cells`` (and its transpose, for a symmetric
        measure) holds the exact value, and ``extras["refined"]`` lists them as
        ``{"row", "col", "sketch", "exact", "measure"}``.
    """
    index = {store.name: s for s, store in enumerate(engine.stores)}
    missing = sorted({name for c in cells for name in (c.store_a, c.store_b)} - set(index))
    if missing:
        raise MeasureError(f"The engine has no store named {missing}; refine with an engine over the screened stores.")
    pairs = list(dict.fromkeys((index[c.store_a], index[c.store_b]) for c in cells))
    exact = {(r.store_a, r.store_b): r for r in engine.run([(measure, dict(options or {}))], pairs, release=False)}
    symmetric = get_measure(measure).symmetric
    out = []
    for r in results:
        matrix = np.array(r.matrix, dtype=np.float64, copy=True)
        refined = list(r.extras.get("refined", []))
        rows, cols = {name: i for i, name in enumerate(r.rows)}, {name: j for j, name in enumerate(r.cols)}
        for c in cells:
            for a, row, b, col in _orientations(c, symmetric and r.spec.symmetric):
                if (a, b) != (r.store_a, r.store_b) or row not in rows or col not in cols:
                    continue
                source = exact.get((c.store_a, c.store_b))
                value = float(source.matrix[source.rows.index(c.row), source.cols.index(c.col)])
                sketched = float(matrix[rows[row], cols[col]])
                if any(e["row"] == row and e["col"] == col for e in refined):
                    continue
                matrix[rows[row], cols[col]] = value
                refined.append({"row": row, "col": col, "sketch": sketched, "exact": value, "measure": measure})
        extras = dict(r.extras)
        if refined:
            extras["refined"] = refined
        out.append(dataclasses.replace(r, matrix=matrix, extras=extras))
    return out


def _orientations(c: Cell, symmetric: bool) -> list[tuple[str, str, str, str]]:
    both = [(c.store_a, c.row, c.store_b, c.col)]
    if symmetric:
        both.append((c.store_b, c.col, c.store_a, c.row))
    return both
