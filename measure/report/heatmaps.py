"""Heatmaps of layer × layer matrices: ``plot_matrix`` (matplotlib Axes), ``Heatmaps`` and ``heatmap_png`` (PNG bytes).

``Heatmaps`` draws many PNGs on reused figures, laid out once; then only the image, the printed
values and the titles change from one result to the next. Constrained layout depends on the tick
labels, the colour bar and the thickness of the title and axis labels (their height, or width for
the rotated y label: a name with a descender, ``g`` or ``y``, is taller than one without), not on
their length. So a figure serves every result with the same layer names, colour scale and label
thicknesses, and each PNG is the same, byte for byte, as a figure drawn afresh for that result.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["Heatmaps", "heatmap_png", "plot_matrix"]

ANNOTATE_MAX_CELLS = 64


def plot_matrix(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str = "",
                xlabel: str = "", ylabel: str = "", value_range: tuple[float, float] | None = None,
                cmap: str = "magma", ax=None, annotate: bool | None = None):
    """Heatmap with layer names on both axes.

    Parameters
    ----------
    matrix : ndarray of shape (len(rows), len(cols))
    rows, cols : sequence of str
        Layer names of the rows and the columns.
    title, xlabel, ylabel : str
    value_range : (float, float), optional
        The colour scale; default the matrix's finite minimum and maximum.
    cmap : str
    ax : matplotlib Axes, optional
        Where to draw; default a new figure sized to the matrix.
    annotate : bool, optional
        Print each finite value in its cell; default for matrices of at most 64 cells.

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    n_r, n_c = matrix.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.45 * n_c + 1.5), max(3.5, 1.0 + 0.4 * n_r + 1.0)),
                             dpi=120, layout="constrained")
    vmin, vmax = value_range if value_range else (np.nanmin(matrix), np.nanmax(matrix))
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, origin="upper", aspect="auto")
    ax.set_xticks(range(n_c), labels=list(cols), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), labels=list(rows), fontsize=8)
    _set_titles(ax, title, xlabel, ylabel)
    ax.figure.colorbar(image, ax=ax, shrink=0.85)
    if annotate if annotate is not None else n_r * n_c <= ANNOTATE_MAX_CELLS:
        for i in range(n_r):
            for j in range(n_c):
                ax.text(j, i, "", ha="center", va="center", fontsize=7)
        _set_values(ax, matrix, vmin, vmax)
    return ax


def _set_titles(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def _set_values(ax, matrix: np.ndarray, vmin: float, vmax: float) -> None:
    """Show ``matrix`` in the image of ``ax`` and in its cell texts, if any (hidden where not finite)."""
    ax.images[0].set_data(matrix)
    for text, v in zip(ax.texts, matrix.flat, strict=False):
        text.set_visible(bool(np.isfinite(v)))
        text.set_text(f"{v:.2f}")
        text.set_color("white" if v < (vmin + vmax) / 2 else "black")


def _colour_range(result: PairResult) -> tuple[float, float]:
    """The measure's range, or the matrix's finite extremes for a measure with an unbounded range."""
    lo, hi = result.spec.value_range
    if np.isfinite([lo, hi]).all():
        return float(lo), float(hi)
    return float(np.nanmin(result.matrix)), float(np.nanmax(result.matrix))


def _thickness(ax) -> tuple[float, float, float]:
    """What constrained layout reads of the title and axis labels: the title's and x label's heights, the
    (rotated) y label's width, in pixels."""
    renderer = ax.figure.canvas.get_renderer()
    return (round(ax.title.get_window_extent(renderer).height, 3),
            round(ax.xaxis.label.get_window_extent(renderer).height, 3),
            round(ax.yaxis.label.get_window_extent(renderer).width, 3))


class Heatmaps:
    """PNG heatmaps of results, drawn on a few reused figures.

    Parameters
    ----------
    keep : int
        Figures kept open at once (one per set of row names, column names, colour scale and label
        thicknesses); the least recently used is closed beyond that.

    Examples
    --------
    >>> with Heatmaps() as heatmaps:                                  # doctest: +SKIP
    ...     pngs = [heatmaps.png(r) for r in results]
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._figures: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def png(self, result: PairResult) -> bytes:
        """The PNG heatmap of one result: layer names on both axes, the measure's range as colour scale."""
        import matplotlib

        matplotlib.use("Agg")
        vmin, vmax = _colour_range(result)
        titles = (f"{result.measure}: {result.store_a} vs {result.store_b}", result.store_b, result.store_a)
        base = (tuple(result.rows), tuple(result.cols), vmin, vmax)
        key = ax = None
        similar = [k for k in self._figures if k[0] == base]
        if similar:  # measure the new titles' thickness on a figure of the same layout
            probe = self._figures[similar[-1]]
            _set_titles(probe, *titles)
            key = (base, _thickness(probe))
            ax = self._figures.pop(key, None)
        if ax is None:
            ax = plot_matrix(result.matrix, result.rows, result.cols, title=titles[0], xlabel=titles[1],
                             ylabel=titles[2], value_range=(vmin, vmax))
            ax.figure.draw_without_rendering()  # the constrained layout, once for this figure
            ax.figure.set_layout_engine(None)
            key = (base, _thickness(ax))
            if key in self._figures:
                self._close(self._figures.pop(key))
        else:
            _set_values(ax, result.matrix, vmin, vmax)
            _set_titles(ax, *titles)
        self._figures[key] = ax
        while len(self._figures) > self.keep:
            self._close(self._figures.popitem(last=False)[1])
        buf = io.BytesIO()
        ax.figure.savefig(buf, format="png")
        return buf.getvalue()

    def close(self) -> None:
        """Close every figure."""
        while self._figures:
            self._close(self._figures.popitem()[1])

    @staticmethod
    def _close(ax) -> None:
        import matplotlib.pyplot as plt

        plt.close(ax.figure)

    def __enter__(self) -> Heatmaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def heatmap_png(result: PairResult) -> bytes:
    """The PNG heatmap of one result (layer names on both axes, the measure's range as colour scale)."""
    with Heatmaps(keep=1) as heatmaps:
        return heatmaps.png(result)
