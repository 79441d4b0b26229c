"""Zoo views: model × model matrices that summarise the layer × layer results of many stores.

For one measure and an ordered pair of stores (A, B), S is the pair's layer × layer matrix
(rows: layers i of A, columns: layers j of B).

Best match (the overview)
    ``best_match(S, kind)`` is the symmetrised mean best match

    .. math:: s(A, B) = \\tfrac12 \\Big( \\operatorname{mean}_i \\max_j S_{ij}
                                      + \\operatorname{mean}_j \\max_i S_{ij} \\Big)

    with min in place of max for a distance. Against itself a model matches every layer to itself,
    so s(A, A) is the measure's value for identical representations: 1 for every similarity of
    ``measure.MEASURES``, 0 for a distance. NaN rule: each max (min) is over the finite entries
    of its row (column); a row (column) with no finite entry is left out of its mean; s is NaN
    only when S has no finite entry. One undefined layer pair therefore never makes a cell NaN.

Layer views
    For each layer name l held by at least two stores, v_l(A, B) = S_{ll}: layer l of A (row)
    against layer l of B (column). NaN where that value is undefined.

Orientation
    Row A, column B of every view comes from the result with ``store_a = A, store_b = B``. A
    symmetric measure is computed for one order only; its other cell is the same value
    (S(B, A) = S(A, B)ᵀ, and both views are invariant under that transpose). An asymmetric
    measure (``linreg``, ``pwcca``) has one result per order and no mirroring.

Clustering
    ``cluster_order`` orders the stores by average-linkage hierarchical clustering
    (``scipy.cluster.hierarchy``, optimal leaf ordering) of the dissimilarity d(A, B) = hi - s(A, B)
    for a similarity with range [lo, hi] (1 - s for every similarity here) and s(A, B) - lo for a
    distance, averaged with its transpose (asymmetric measures), 0 on the diagonal, and the
    largest defined d where s is missing or NaN. The input is in natural order (``natural_order``),
    so the same results, in any order, give the same tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["BEST_MATCH", "ZooView", "best_match", "best_matches", "cluster_order", "dissimilarity", "layer_view",
           "natural_key", "natural_order", "overview", "shared_layers"]

BEST_MATCH = "best match"


def natural_key(name: str) -> tuple:
    """Sort key reading digit runs as numbers: ``m2`` before ``m10`` (``m01`` and ``m1`` tie)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def natural_order(names: Iterable[str]) -> list[str]:
    """Distinct ``names`` in natural order (``m0, m1, m2, …, m10``), ties by the plain string."""
    return sorted(dict.fromkeys(names), key=lambda n: (natural_key(n), n))


def best_match(matrix: np.ndarray, kind: str = "similarity") -> float:
    """The symmetrised mean best match s of one layer × layer matrix (module docstring).

    Parameters
    ----------
    matrix : ndarray of shape (n_rows, n_cols)
    kind : {"similarity", "distance"}
        Best is the largest value of a similarity, the smallest of a distance.

    Returns
    -------
    float
        ½ (mean over rows of the row's best + mean over columns of the column's best), each best
        over finite entries and each mean over rows (columns) that have one; NaN if none is finite.
    """
    return float(best_matches(np.asarray(matrix, dtype=float)[None], kind)[0])


def best_matches(matrices: np.ndarray, kind: str = "similarity") -> np.ndarray:
    """``best_match`` of each matrix of a stack: shape (n_matrices, n_rows, n_cols) -> (n_matrices,)."""
    s = np.asarray(matrices, dtype=float)
    finite = np.isfinite(s)
    sign = 1.0 if kind == "similarity" else -1.0  # the best distance is the largest negated one
    filled = np.where(finite, sign * s, -np.inf)
    with np.errstate(invalid="ignore"):
        rows = np.where(finite.any(axis=2), filled.max(axis=2, initial=-np.inf), np.nan)
        cols = np.where(finite.any(axis=1), filled.max(axis=1, initial=-np.inf), np.nan)
        n_rows, n_cols = np.isfinite(rows).sum(axis=1), np.isfinite(cols).sum(axis=1)
        out = 0.5 * (np.nansum(rows, axis=1) / n_rows + np.nansum(cols, axis=1) / n_cols)
    return np.where(n_rows > 0, sign * out, np.nan)


@dataclass
class ZooView:
    """One model × model view of one measure.

    Attributes
    ----------
    name : str
        ``BEST_MATCH`` or ``"layer <name>"``.
    values : ndarray of shape (n, n)
        Row A, column B; NaN where undefined or missing.
    known : ndarray of bool, shape (n, n)
        Whether a result (and, for a layer view, the layer in both stores) exists for the cell.
    """

    name: str
    values: np.ndarray
    known: np.ndarray


def _cells(results: Sequence[PairResult], names: Sequence[str]) -> dict[tuple[int, int], PairResult]:
    """(row, column) -> the result of one measure that fills it; a symmetric result fills both orders."""
    position = {name: k for k, name in enumerate(names)}
    cells = {(position[r.store_a], position[r.store_b]): r for r in results}
    for r in results:
        if r.spec.symmetric:
            cells.setdefault((position[r.store_b], position[r.store_a]), r)
    return cells


def overview(results: Sequence[PairResult], names: Sequence[str]) -> ZooView:
    """The best-match view of one measure's ``results`` over the stores ``names`` (rows: ``store_a``)."""
    n = len(names)
    view = ZooView(BEST_MATCH, np.full((n, n), np.nan), np.zeros((n, n), bool))
    cells = _cells(results, names)
    groups: dict[tuple[tuple[int, ...], str], list[tuple[int, int]]] = {}  # stacked by shape: one vectorised call each
    for cell, r in cells.items():
        groups.setdefault((np.shape(r.matrix), r.spec.kind), []).append(cell)
    for (_, kind), group in groups.items():
        values = best_matches(np.stack([cells[c].matrix for c in group]), kind)  # invariant under the transpose
        rows, cols = np.array(group).T
        view.values[rows, cols] = values
        view.known[rows, cols] = True
    return view


def shared_layers(results: Sequence[PairResult], names: Sequence[str]) -> list[str]:
    """Layer names held by at least two of the stores ``names``, in order of first appearance."""
    held: dict[str, set[str]] = {}
    for r in results:
        for store, layers in ((r.store_a, r.rows), (r.store_b, r.cols)):
            for layer in layers:
                held.setdefault(layer, set()).add(store)
    return [layer for layer, stores in held.items() if len(stores & set(names)) >= 2]


def layer_view(results: Sequence[PairResult], names: Sequence[str], layer: str) -> ZooView:
    """v_l(A, B) = S_ll, layer ``layer`` of A (row) against the same layer of B (column)."""
    n = len(names)
    view = ZooView(f"layer {layer}", np.full((n, n), np.nan), np.zeros((n, n), bool))
    for (a, b), r in _cells(results, names).items():
        if layer in r.rows and layer in r.cols:  # S(B, A)[l, l] = S(A, B)[l, l] for a mirrored cell
            view.values[a, b] = r.matrix[r.rows.index(layer), r.cols.index(layer)]
            view.known[a, b] = True
    return view


def dissimilarity(view: ZooView, kind: str, value_range: tuple[float, float]) -> np.ndarray:
    """The symmetric dissimilarity clustered by ``cluster_order`` (module docstring), shape (n, n)."""
    lo, hi = value_range
    d = hi - view.values if kind == "similarity" else view.values - lo
    d = np.where(view.known & np.isfinite(d), np.maximum(d, 0.0), np.nan)
    both = np.stack([d, d.T])
    count = np.isfinite(both).sum(axis=0)
    d = np.where(count > 0, np.nansum(both, axis=0) / np.maximum(count, 1), np.nan)  # mean of the defined
    off = ~np.eye(len(d), dtype=bool)
    defined = np.isfinite(d) & off
    worst = float(d[defined].max()) if defined.any() else 1.0
    d = np.where(np.isfinite(d), d, worst)
    np.fill_diagonal(d, 0.0)
    return d


def cluster_order(view: ZooView, kind: str, value_range: tuple[float, float]) -> tuple[list[int], np.ndarray | None]:
    """The leaf order of the average-linkage tree of ``view``'s stores, and the linkage matrix.

    Returns
    -------
    order : list of int
        Store positions (rows of ``view``) from the first leaf to the last.
    linkage : ndarray of shape (n - 1, 4) or None
        ``scipy.cluster.hierarchy.linkage`` output (None for fewer than two stores).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = len(view.values)
    if n < 2:
        return list(range(n)), None
    z = linkage(squareform(dissimilarity(view, kind, value_range), checks=False), method="average",
                optimal_ordering=n > 2)
    return [int(k) for k in leaves_list(z)], z
