"""Writing results: CSV matrices with layer headers, heatmaps, and a JSON manifest.

Every file is written to a temporary name and renamed into place, and the
manifest is written last, so a run killed half-way leaves no file that looks
complete and a manifest that lists only finished results.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine import PairResult

__all__ = ["plot_matrix", "read_matrix_csv", "write_results"]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def matrix_csv(result: PairResult) -> bytes:
    """CSV with a header row of column layer names and the row layer name first on each line."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f"{result.store_a} \\ {result.store_b}", *result.cols])
    for name, row in zip(result.rows, result.matrix):
        writer.writerow([name, *(f"{v:.17g}" for v in row)])
    return buf.getvalue().encode()


def read_matrix_csv(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(row names, column names, matrix) from a CSV written by ``write_results``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    cols = rows[0][1:]
    names = [r[0] for r in rows[1:]]
    matrix = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)
    return names, cols, matrix


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


def write_results(results: Sequence[PairResult], out: str | Path, *, stores: dict[str, dict[str, Any]],
                  device: str, plots: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write one CSV (and PNG) per result and ``manifest.json`` listing them; returns the manifest path."""
    from extract import __version__

    out = Path(out)
    entries = []
    for r in results:
        stem = f"{_safe(r.measure)}/{_safe(r.store_a)}__{_safe(r.store_b)}"
        csv_path = out / f"{stem}.csv"
        _atomic_write_bytes(csv_path, matrix_csv(r))
        entry: dict[str, Any] = {
            "measure": r.measure, "options": r.options, "store_a": r.store_a, "store_b": r.store_b,
            "rows": r.rows, "cols": r.cols, "csv": str(csv_path.relative_to(out)),
            "symmetric": r.spec.symmetric, "kind": r.spec.kind, "range": list(r.spec.value_range),
            "reference": r.spec.reference,
            "note": "" if r.spec.symmetric else "asymmetric measure: the full matrix, rows = store_a, not symmetrised",
        }
        if plots:
            png_path = out / f"{stem}.png"
            _atomic_write_bytes(png_path, heatmap_png(r))
            entry["png"] = str(png_path.relative_to(out))
        if r.extras:
            entry["extras"] = r.extras
        if getattr(r, "statistics", None):  # measure.stats: p-values, bootstrap bounds beside the matrix
            files, settings = {}, {}
            for key, value in r.statistics.items():
                if isinstance(value, np.ndarray) and value.shape == r.matrix.shape:
                    stat_path = out / f"{stem}.{_safe(key)}.csv"
                    _atomic_write_bytes(stat_path, matrix_csv(dataclasses.replace(r, matrix=value)))
                    files[key] = str(stat_path.relative_to(out))
                else:
                    settings[key] = value
            entry["statistics"], entry["statistics_options"] = files, settings
        entries.append(entry)
    manifest = {
        "simtorch": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
        "stores": stores, "results": entries, **(extra or {}),
    }
    path = out / "manifest.json"
    _atomic_write_bytes(path, json.dumps(manifest, indent=2, default=_json_default).encode())
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
