"""Heatmaps of layer × layer matrices: ``plot_matrix`` (matplotlib Axes) and ``heatmap_png`` (PNG bytes)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["heatmap_png", "plot_matrix"]


def plot_matrix(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str = "",
                xlabel: str = "", ylabel: str = "", value_range: tuple[float, float] | None = None,
                cmap: str = "magma", ax=None, annotate: bool | None = None):
    """Heatmap with layer names on both axes; returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    n_r, n_c = matrix.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.45 * n_c + 1.5), max(3.5, 1.0 + 0.4 * n_r + 1.0)),
                             dpi=120, layout="constrained")
    vmin, vmax = value_range if value_range else (np.nanmin(matrix), np.nanmax(matrix))
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, origin="upper", aspect="auto")
    ax.set_xticks(range(n_c), labels=list(cols), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), labels=list(rows), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, shrink=0.85)
    if annotate if annotate is not None else n_r * n_c <= 64:
        for i in range(n_r):
            for j in range(n_c):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < (vmin + vmax) / 2 else "black")
    return ax


def heatmap_png(result: PairResult) -> bytes:
    """The PNG heatmap of one result (layer names on both axes, the measure's range as colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = result.spec.value_range
    ax = plot_matrix(result.matrix, result.rows, result.cols,
                     title=f"{result.measure}: {result.store_a} vs {result.store_b}",
                     xlabel=result.store_b, ylabel=result.store_a,
                     value_range=(lo, hi) if np.isfinite([lo, hi]).all() else None)
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png")
    plt.close(ax.figure)
    return buf.getvalue()
