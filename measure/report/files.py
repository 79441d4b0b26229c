"""Writing results: CSV matrices with layer headers, heatmaps (``heatmaps``), and a JSON manifest.

Every file is written to a temporary name and renamed into place, and the
manifest is written last, so a run killed half-way leaves no file that looks
complete and a manifest that lists only finished results.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .heatmaps import heatmap_png

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["atomic_write_bytes", "check_file_names", "file_names", "matrix_csv", "read_matrix_csv", "write_results"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
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


def file_names(names: Sequence[str]) -> dict[str, str]:
    """Store name -> the distinct, stable file-name part of its results.

    A name is sanitised to ``[A-Za-z0-9_.-]`` (other runs of characters become ``_``). When
    sanitised names clash (``m a``, ``m_a`` and ``m/a`` all give ``m_a``; names that differ only
    in case clash too, as on case-insensitive file systems), each clashing name gets the first
    8 hex digits of the SHA-256 of its raw name appended (``m_a-1b2c3d4e``), except the one name
    that was already safe, which keeps its plain name. The same names always give the same files.
    """
    safe = {name: _safe(name) for name in dict.fromkeys(names)}
    groups: dict[str, list[str]] = {}
    for name, cleaned in safe.items():
        groups.setdefault(cleaned.casefold(), []).append(name)
    out = dict(safe)
    for members in groups.values():
        if len(members) < 2:
            continue
        plain = [n for n in members if safe[n] == n]
        for name in members:
            if not (len(plain) == 1 and name == plain[0]):
                out[name] = f"{safe[name]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return out


def check_file_names(names: Sequence[str]) -> dict[str, str]:
    """``file_names(names)``, after checking that every ordered pair of stores gets its own file stem.

    Raises ValueError naming the two pairs when ``A__B`` stems would still coincide (store names that
    themselves contain ``__``, such as ``a__b`` with ``c`` and ``a`` with ``b__c``): call it before computing.
    """
    names = list(dict.fromkeys(names))
    fn = file_names(names)
    seen: dict[str, tuple[str, str]] = {}
    for a in names:
        for b in names:
            stem = f"{fn[a]}__{fn[b]}".casefold()
            other = seen.setdefault(stem, (a, b))
            if other != (a, b):
                raise ValueError(f"The results of stores {other[0]!r} × {other[1]!r} and {a!r} × {b!r} would share "
                                 f"the file {fn[a]}__{fn[b]}; re-extract with --name values without '__'.")
    return fn


def matrix_csv(result: PairResult) -> bytes:
    """CSV with a header row of column layer names and the row layer name first on each line."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f"{result.store_a} \\ {result.store_b}", *result.cols])
    for name, row in zip(result.rows, result.matrix, strict=True):
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


def write_results(results: Sequence[PairResult], out: str | Path, *, stores: dict[str, dict[str, Any]],
                  device: str, plots: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write one CSV (and PNG) per result and ``manifest.json`` listing them; returns the manifest path."""
    from extract import __version__

    out = Path(out)
    names = check_file_names([*stores, *(n for r in results for n in (r.store_a, r.store_b))])
    entries = [_write_result(r, out, plots, names) for r in results]
    manifest = {
        "simtorch": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
        "stores": stores, "results": entries, **(extra or {}),
    }
    path = out / "manifest.json"
    atomic_write_bytes(path, json.dumps(manifest, indent=2, default=_json_default).encode())
    return path


def _write_result(r: PairResult, out: Path, plots: bool, names: dict[str, str]) -> dict[str, Any]:
    """Write the files of one result (CSV, PNG, inference CSVs); returns its manifest entry.

    ``names`` maps each store name to its file-name part (``file_names``).
    """
    stem = f"{_safe(r.measure)}/{names[r.store_a]}__{names[r.store_b]}"
    csv_path = out / f"{stem}.csv"
    atomic_write_bytes(csv_path, matrix_csv(r))
    entry: dict[str, Any] = {
        "measure": r.measure, "options": r.options, "store_a": r.store_a, "store_b": r.store_b,
        "rows": r.rows, "cols": r.cols, "csv": str(csv_path.relative_to(out)),
        "symmetric": r.spec.symmetric, "kind": r.spec.kind, "range": list(r.spec.value_range),
        "reference": r.spec.reference,
        "note": "" if r.spec.symmetric else "asymmetric measure: the full matrix, rows = store_a, not symmetrised",
    }
    if plots:
        png_path = out / f"{stem}.png"
        atomic_write_bytes(png_path, heatmap_png(r))
        entry["png"] = str(png_path.relative_to(out))
    if r.extras:
        entry["extras"] = r.extras
    if r.inference:  # measure.inference: p-values, bootstrap bounds beside the matrix
        entry["statistics"], entry["statistics_options"] = _write_inference(r, out, stem)
    return entry


def _write_inference(r: PairResult, out: Path, stem: str) -> tuple[dict[str, str], dict[str, Any]]:
    """({name: CSV path} of the matrices of ``r.inference``, its other settings), the CSVs written beside ``r``'s."""
    files, settings = {}, {}
    for key, value in r.inference.items():
        if isinstance(value, np.ndarray) and value.shape == r.matrix.shape:
            stat_path = out / f"{stem}.{_safe(key)}.csv"
            atomic_write_bytes(stat_path, matrix_csv(dataclasses.replace(r, matrix=value)))
            files[key] = str(stat_path.relative_to(out))
        else:
            settings[key] = value
    return files, settings


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
