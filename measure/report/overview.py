"""The zoo overview of ``report.html``: what the page draws, and the numbers its script reads.

Per measure, ``measure_overview`` computes the views of ``zoo`` (the best match and one view per
shared layer) and the clustering order; ``overview_svg`` lays out the best-match view as inline
SVG in that order, the dendrogram beside it (readable without scripts). ``page_data`` is the JSON
the page's script draws from: every view, and every pair's layer × layer matrix. Numbers are
rounded to 4 significant digits; an undefined value is the string ``"NaN"``, a missing cell
``null``.

Colours: the measure's value range [lo, hi] mapped linearly onto viridis (``PALETTE``, 256
colours; index ⌊255 t + ½⌋ with t = (v - lo) / (hi - lo) clipped to [0, 1]); the script uses the
same palette and rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup

from .zoo import ZooView, cluster_order, layer_view, overview, shared_layers

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["MeasureOverview", "colour", "measure_overview", "overview_svg", "page_data", "palette"]

MISSING, UNDEFINED = "#ffffff", "#d9d9d9"
DENDROGRAM_WIDTH = 120


@cache
def palette() -> tuple[str, ...]:
    """Viridis as 256 hex colours, dark (low) to light (high)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return tuple("#{:02x}{:02x}{:02x}".format(*(int(round(255 * c)) for c in cmap(k / 255)[:3])) for k in range(256))


def colour(value: float, lo: float, hi: float) -> str:
    """The fill of ``value`` on a [lo, hi] scale (``UNDEFINED`` grey for NaN)."""
    if not math.isfinite(value):
        return UNDEFINED
    t = 0.5 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
    return palette()[math.floor(255 * t + 0.5)]


def ink(fill: str) -> str:
    """Text colour on ``fill``: dark on light colours (relative luminance above 0.45), else white."""
    r, g, b = (int(fill[k:k + 2], 16) / 255 for k in (1, 3, 5))
    return "#1d1d1f" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#ffffff"


@dataclass
class MeasureOverview:
    """One measure's zoo views over the stores ``names`` (natural order), and their display order."""

    measure: str
    kind: str
    symmetric: bool
    value_range: tuple[float, float]
    names: list[str]
    views: list[ZooView]
    order: list[int]
    linkage: np.ndarray | None
    results: list[PairResult]


def measure_overview(results: Sequence[PairResult], names: Sequence[str]) -> MeasureOverview:
    """The best-match view, one view per shared layer and the clustering order of one measure's results."""
    spec = results[0].spec
    lo, hi = spec.value_range
    if not (math.isfinite(lo) and math.isfinite(hi)):  # an unbounded range: the values' span
        lo, hi = _span([r.matrix for r in results])
    views = [overview(results, names)] + [layer_view(results, names, layer) for layer in shared_layers(results, names)]
    order, z = cluster_order(views[0], spec.kind, (lo, hi))
    return MeasureOverview(results[0].measure, spec.kind, bool(spec.symmetric), (float(lo), float(hi)), list(names),
                           views, order, z, list(results))


def _span(matrices: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([np.asarray(m, float).ravel() for m in matrices])
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def _text_width(names: Sequence[str], font: float) -> float:
    return 0.6 * font * max((len(n) for n in names), default=1)


def overview_svg(o: MeasureOverview) -> dict[str, Any]:
    """The layout of the best-match view as SVG, rows and columns in clustering order.

    Returns
    -------
    dict
        ``width``, ``height``, ``x0``, ``y0`` (the matrix's top-left corner), ``cell`` (side),
        ``n``, ``font``, ``value_font`` (0: no printed values), ``cells`` (x, y, fill, text, ink)
        row by row and the same as markup (``cells_svg``: the rectangles, ``values_svg``: the printed
        values), ``rows`` (y, name), ``cols`` (x, y, name), ``dendrogram`` (SVG path data),
        ``bar`` (x, y, height, gradient stops, ticks (y, label)).
    """
    n, lo, hi = len(o.names), *o.value_range
    cell = int(min(44, max(10, 640 // max(n, 1))))
    font = min(11.0, 0.9 * cell)
    shown = [o.names[k] for k in o.order]
    label_w = min(180, math.ceil(_text_width(shown, font)) + 8)
    dendro_w = DENDROGRAM_WIDTH if o.linkage is not None else 0
    x0, y0 = dendro_w + label_w, min(180, math.ceil(0.71 * _text_width(shown, font)) + 12)
    digits = 3 if cell >= 40 else 2
    value_font = 0 if cell < 28 else (11 if cell >= 40 else 10)
    gap = 1 if cell >= 16 else 0
    view = o.views[0]
    cells = []
    for i, a in enumerate(o.order):
        for j, b in enumerate(o.order):
            v = view.values[a, b]
            fill = colour(v, lo, hi) if view.known[a, b] else MISSING
            text = "" if not view.known[a, b] else (f"{v:.{digits}f}" if math.isfinite(v) else "NaN")
            cells.append((x0 + j * cell, y0 + i * cell, fill, text if value_font else "", ink(fill)))
    # the cells as markup, built here (numbers and colours only: nothing to escape) for 4,096 cells and more
    size = cell - gap
    rects = "".join(f'<rect x="{x}" y="{y}" width="{size}" height="{size}" fill="{fill}"/>'
                    for x, y, fill, _, _ in cells)
    texts = "".join(f'<text x="{x + cell / 2:g}" y="{y + cell / 2:g}" fill="{colour_}">{text}</text>'
                    for x, y, _, text, colour_ in cells) if value_font else ""
    side = n * cell
    bar_x = x0 + side + 14
    stops = [(f"{100 * k / 10:g}%", palette()[math.floor(255 * (1 - k / 10) + 0.5)]) for k in range(11)]
    ticks = [(y0 + side * (1 - f), f"{lo + f * (hi - lo):.3g}") for f in (0.0, 0.5, 1.0)]
    return {"width": bar_x + 12 + 8 + 7 * max(len(t[1]) for t in ticks), "height": y0 + side + 8,
            "x0": x0, "y0": y0, "cell": cell, "gap": gap, "n": n, "font": round(font, 1), "value_font": value_font,
            "cells": cells, "cells_svg": Markup(rects), "values_svg": Markup(texts),
            "rows": [(y0 + (i + 0.5) * cell, name) for i, name in enumerate(shown)],
            "cols": [(x0 + (j + 0.5) * cell, y0 - 5, name) for j, name in enumerate(shown)],
            "dendrogram": _dendrogram_paths(o.linkage, x0=0, width=dendro_w - 6, y0=y0, cell=cell),
            "bar": {"x": bar_x, "y": y0, "height": side, "stops": stops, "ticks": ticks}}


def _dendrogram_paths(z: np.ndarray | None, *, x0: float, width: float, y0: float, cell: float) -> list[str]:
    """SVG path data of the tree, leaves on the right (x0 + width) beside their rows, the root on the left."""
    if z is None:
        return []
    from scipy.cluster.hierarchy import dendrogram

    tree = dendrogram(z, no_plot=True)
    top = max((max(d) for d in tree["dcoord"]), default=0.0) or 1.0
    paths = []
    for ic, dc in zip(tree["icoord"], tree["dcoord"], strict=True):
        points = [(x0 + width * (1 - d / top), y0 + i / 10 * cell) for i, d in zip(ic, dc, strict=True)]
        paths.append("M" + " L".join(f"{x:.1f} {y:.1f}" for x, y in points))
    return paths


def _sig4(values: np.ndarray) -> list[Any]:
    """``values`` flattened and rounded to 4 significant digits, NaN as "NaN" (JSON-ready)."""
    a = np.asarray(values, dtype=float).ravel()
    finite = np.isfinite(a)
    magnitude = np.zeros_like(a)
    nonzero = finite & (a != 0)
    magnitude[nonzero] = np.floor(np.log10(np.abs(a[nonzero])))
    shift = 3 - magnitude
    up = 10.0 ** np.maximum(shift, 0)  # exact powers of ten: the division rounds to the shortest decimal
    down = 10.0 ** np.maximum(-shift, 0)
    rounded = np.where(finite, np.round(np.where(finite, a, 0) * up / down) / up * down, 0.0)
    out = rounded.tolist()
    if not finite.all():
        for k in np.flatnonzero(~finite):
            out[k] = "NaN"
    return out


def _refined(r: Any) -> list[list[int]]:
    """[positions in the row-by-row matrix of the entries of ``r`` recomputed exactly], or [] when none were."""
    refined = r.extras.get("refined") if isinstance(r.extras, dict) else None
    if not refined:
        return []
    rows, cols = {n: i for i, n in enumerate(r.rows)}, {n: j for j, n in enumerate(r.cols)}
    return [sorted(rows[e["row"]] * len(r.cols) + cols[e["col"]] for e in refined
                   if e["row"] in rows and e["col"] in cols)]


def page_data(overviews: Sequence[MeasureOverview]) -> str:
    """The JSON the page's script reads, safe inside a ``<script>`` element.

    Keys: ``palette``; ``stores`` (natural order); ``layers`` (the distinct layer lists);
    ``measures``, each with ``name``, ``kind``, ``symmetric``, ``range``, ``order``, ``views``
    (``name`` and the n × n ``values`` row by row, null where missing) and ``pairs``:
    [a, b, rows, cols, values] per result (store positions, indices into ``layers``, the matrix
    row by row), and a sixth item for a result with entries recomputed exactly (``extras["refined"]``):
    their positions in ``values``.
    """
    layer_lists: dict[tuple[str, ...], int] = {}

    def layers(names: Sequence[str]) -> int:
        return layer_lists.setdefault(tuple(names), len(layer_lists))

    measures = []
    for o in overviews:
        position = {name: k for k, name in enumerate(o.names)}
        views = []
        for v in o.views:
            values = _sig4(v.values)
            for k in np.flatnonzero(~v.known.ravel()):
                values[k] = None
            views.append({"name": v.name, "values": values})
        flat = [np.ravel(r.matrix) for r in o.results]
        values = _sig4(np.concatenate(flat)) if flat else []
        ends = np.cumsum([len(f) for f in flat]).tolist()
        pairs = [[position[r.store_a], position[r.store_b], layers(r.rows), layers(r.cols), values[end - len(f):end],
                  *_refined(r)] for r, f, end in zip(o.results, flat, ends, strict=True)]
        measures.append({"name": o.measure, "kind": o.kind, "symmetric": o.symmetric, "range": list(o.value_range),
                         "order": o.order, "views": views, "pairs": pairs})
    stores = overviews[0].names if overviews else []
    data = {"palette": list(palette()), "stores": stores, "layers": [list(k) for k in layer_lists],
            "measures": measures}
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
