"""Writing results: the tidy results table, CSV matrices with layer headers, heatmaps (``heatmaps``),
and a JSON manifest.

Every file is written to a temporary name and renamed into place, and the
manifest is written last, so a run killed half-way leaves no file that looks
complete and a manifest that lists only finished results.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .heatmaps import Heatmaps

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["APPROXIMATE_COLUMNS", "TABLE_GZIP_ROWS", "approximate_measures", "atomic_write_bytes", "check_file_names",
           "file_names", "matrix_csv", "read_matrix_csv", "read_results_table", "results_table", "table_columns",
           "write_results"]

TABLE_GZIP_ROWS = 100_000
"""Results tables of more rows than this are written gzip-compressed (``results.csv.gz``), smaller ones
as plain ``results.csv``."""

TABLE_KEYS = ["measure", "store_a", "layer_a", "store_b", "layer_b", "value"]
# The inference matrices (``PairResult.inference``) as table columns, in this order; others keep their key.
STATISTIC_COLUMNS = {"pvalues": "pvalue", "pvalues_fwer": "pvalue_fwer", "ci_low": "ci_low", "ci_high": "ci_high"}
# After ``mirrored``, only in the table of a run with an approximate measure (``cka_sketch``): whether the row's
# measure is approximate, and whether its value was recomputed exactly (``--refine``; ``extras["refined"]``).
APPROXIMATE_COLUMNS = ["approximate", "refined"]
BOOL_COLUMNS = ("mirrored", *APPROXIMATE_COLUMNS)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
    with _atomic_open(path) as f:
        f.write(data)


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


def _statistic_keys(results: Sequence[PairResult]) -> list[str]:
    """The keys of the inference matrices of ``results`` (shaped like their matrix), known ones first."""
    keys = {k for r in results for k, v in r.inference.items()
            if isinstance(v, np.ndarray) and v.shape == r.matrix.shape}
    return [k for k in STATISTIC_COLUMNS if k in keys] + sorted(keys - set(STATISTIC_COLUMNS))


def _is_approximate(r: PairResult) -> bool:
    return bool(getattr(r.spec, "approximate", False))


def table_columns(results: Sequence[PairResult]) -> list[str]:
    """The header of the results table of ``results`` (``results_table``)."""
    flags = APPROXIMATE_COLUMNS if any(_is_approximate(r) for r in results) else []
    return [*TABLE_KEYS, *(STATISTIC_COLUMNS.get(k, k) for k in _statistic_keys(results)), "mirrored", *flags]


def _table_rows(r: PairResult, keys: Sequence[str], approximate: bool = False) -> list[list[Any]]:
    """The rows of one result (``results_table``), values as text: floats as ``repr`` (the shortest text
    that reads back to the same float; ``nan``, ``inf``), a missing statistic as an empty field; with
    ``approximate``, each row ends with the ``approximate`` and ``refined`` flags."""
    grids = [r.matrix, *(r.inference.get(k) for k in keys)]
    text = [[[repr(v) for v in line] for line in np.asarray(g, dtype=np.float64).tolist()]
            if isinstance(g, np.ndarray) and g.shape == r.matrix.shape else None for g in grids]
    refined = {(e["row"], e["col"]) for e in r.extras.get("refined", [])}

    def flags(i: int, j: int) -> list[str]:
        if not approximate:
            return []
        return [str(_is_approximate(r)), str((r.rows[i], r.cols[j]) in refined)]

    rows = []
    for i, layer_a in enumerate(r.rows):
        for j, layer_b in enumerate(r.cols):
            rows.append([r.measure, r.store_a, layer_a, r.store_b, layer_b,
                         *(g[i][j] if g is not None else "" for g in text), "False", *flags(i, j)])
    if r.spec.symmetric and r.store_a != r.store_b:  # the other order: the transposed entries
        for j, layer_b in enumerate(r.cols):
            for i, layer_a in enumerate(r.rows):
                rows.append([r.measure, r.store_b, layer_b, r.store_a, layer_a,
                             *(g[i][j] if g is not None else "" for g in text), "True", *flags(i, j)])
    return rows


def _csv_lines(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _n_table_rows(r: PairResult) -> int:
    return r.matrix.size * (2 if r.spec.symmetric and r.store_a != r.store_b else 1)


def results_table(results: Sequence[PairResult]) -> tuple[list[str], Iterator[list[str]]]:
    """The tidy results table: (header, rows), one row per (measure, store_a, layer_a, store_b, layer_b).

    Each row holds one entry of a result's matrix: ``value`` = ``matrix[i, j]`` with ``layer_a`` =
    ``rows[i]`` and ``layer_b`` = ``cols[j]``, then the inference statistics at ``[i, j]`` (``pvalue``,
    ``pvalue_fwer``, ``ci_low``, ``ci_high``; empty for a result without them), then ``mirrored``.
    A symmetric measure is computed for one order of each pair of different stores; the table holds
    the other order too, as the transposed entries with ``mirrored`` True, so that every
    (measure, store_a, store_b) has its rows. ``mirrored`` is False for every computed entry.
    When a result's measure is approximate (``cka_sketch``), every row ends with ``approximate`` (the
    row's measure is) and ``refined`` (its value was recomputed exactly, ``extras["refined"]``; mirrored
    rows too); tables of exact measures only have neither column.
    Fields are text as written to the CSV; rows are made one result at a time.
    """
    keys = _statistic_keys(results)
    approximate = any(_is_approximate(r) for r in results)
    return table_columns(results), (row for r in results for row in _table_rows(r, keys, approximate))


@contextlib.contextmanager
def _atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file written at a temporary name beside ``path``, flushed to disk and renamed into place
    when the block ends without an error (removed otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_table(results: Sequence[PairResult], out: Path) -> dict[str, Any]:
    """Write ``results.csv`` (``results.csv.gz`` above ``TABLE_GZIP_ROWS`` rows), one result's rows at a
    time; returns its manifest entry."""
    keys = _statistic_keys(results)
    header = table_columns(results)
    approximate = any(_is_approximate(r) for r in results)
    n_rows = sum(_n_table_rows(r) for r in results)
    name = "results.csv.gz" if n_rows > TABLE_GZIP_ROWS else "results.csv"
    for stale in ("results.csv", "results.csv.gz"):  # a table of an earlier run in the same folder
        if stale != name:
            (out / stale).unlink(missing_ok=True)
    with _atomic_open(out / name) as raw, (gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
                                           if name.endswith(".gz") else contextlib.nullcontext(raw)) as f:
        f.write(_csv_lines([header]))
        for r in results:
            f.write(_csv_lines(_table_rows(r, keys, approximate)))
    return {"path": name, "format": "csv.gz" if name.endswith(".gz") else "csv", "rows": n_rows,
            "columns": header}


def read_results_table(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, rows as dicts) of a table written by ``write_results`` (``.csv`` or ``.csv.gz``).

    Values and statistics read back as floats (None where empty), ``mirrored`` (and ``approximate``,
    ``refined`` where present) as bool. With pandas: ``pd.read_csv(path)``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = []
        for line in reader:
            row: dict[str, Any] = dict(zip(header, line, strict=True))
            for key in header[len(TABLE_KEYS) - 1:header.index("mirrored")]:
                row[key] = float(row[key]) if row[key] != "" else None
            for key in BOOL_COLUMNS:
                if key in row:
                    row[key] = row[key] == "True"
            rows.append(row)
    return header, rows


def write_results(results: Sequence[PairResult], out: str | Path, *, stores: dict[str, dict[str, Any]],
                  device: str, plots: bool = True, matrices: bool = True,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write the results table (``results_table``), one CSV per result (``matrices``) and its heatmap
    (``plots``), and ``manifest.json`` listing them; returns the manifest path."""
    from extract import __version__

    out = Path(out)
    names = check_file_names([*stores, *(n for r in results for n in (r.store_a, r.store_b))])
    table = _write_table(results, out)
    with Heatmaps() as heatmaps:
        entries = [_write_result(r, out, heatmaps if plots else None, matrices, names) for r in results]
    manifest = {
        "simtorch": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
        "table": table, "stores": stores, "results": entries, **(extra or {}),
    }
    approximate = approximate_measures(results)
    if approximate:
        manifest["approximate"] = approximate
    path = out / "manifest.json"
    atomic_write_bytes(path, json.dumps(manifest, indent=2, default=_json_default).encode())
    return path


def approximate_measures(results: Sequence[PairResult]) -> list[dict[str, Any]]:
    """One entry per approximate measure (and options) of ``results``: ``measure``, ``options``,
    ``approximation`` (``spec.approximation(options)``: the method, its settings, ``std`` and ``bound_95``)
    and ``refined``, the number of layer pairs recomputed exactly (``extras["refined"]``; for a symmetric
    measure an entry and its transpose are one pair)."""
    out: dict[str, dict[str, Any]] = {}
    pairs: dict[str, set[tuple[str, ...]]] = {}
    for r in results:
        if not _is_approximate(r):
            continue
        key = json.dumps([r.measure, r.options], sort_keys=True, default=str)
        out.setdefault(key, {"measure": r.measure, "options": r.options,
                             "approximation": r.spec.approximation(r.options), "refined": 0})
        for e in r.extras.get("refined", []):
            cell = (r.store_a, e["row"], r.store_b, e["col"])
            pairs.setdefault(key, set()).add(min(cell, cell[2:] + cell[:2]) if r.spec.symmetric else cell)
    for key, entry in out.items():
        entry["refined"] = len(pairs.get(key, ()))
    return list(out.values())


def _write_result(r: PairResult, out: Path, heatmaps: Heatmaps | None, matrices: bool,
                  names: dict[str, str]) -> dict[str, Any]:
    """Write the files of one result (CSV and inference CSVs with ``matrices``, PNG with ``heatmaps``);
    returns its manifest entry, which names the files written (``csv``, ``png``, ``statistics``).

    ``names`` maps each store name to its file-name part (``file_names``).
    """
    stem = f"{_safe(r.measure)}/{names[r.store_a]}__{names[r.store_b]}"
    entry: dict[str, Any] = {
        "measure": r.measure, "options": r.options, "store_a": r.store_a, "store_b": r.store_b,
        "rows": r.rows, "cols": r.cols,
        "symmetric": r.spec.symmetric, "kind": r.spec.kind, "range": list(r.spec.value_range),
        "reference": r.spec.reference,
        "note": "" if r.spec.symmetric else "asymmetric measure: the full matrix, rows = store_a, not symmetrised",
    }
    if matrices:
        csv_path = out / f"{stem}.csv"
        atomic_write_bytes(csv_path, matrix_csv(r))
        entry["csv"] = str(csv_path.relative_to(out))
    if heatmaps is not None:
        png_path = out / f"{stem}.png"
        atomic_write_bytes(png_path, heatmaps.png(r))
        entry["png"] = str(png_path.relative_to(out))
    if r.extras:
        entry["extras"] = r.extras
    if r.inference:  # measure.inference: p-values, bootstrap bounds beside the matrix
        entry["statistics"], entry["statistics_options"] = _write_inference(r, out, stem, matrices)
    return entry


def _write_inference(r: PairResult, out: Path, stem: str,
                     matrices: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """({name: CSV path} of the matrices of ``r.inference``, its other settings), the CSVs written beside ``r``'s
    (with ``matrices``; the table holds them in any case)."""
    files, settings = {}, {}
    for key, value in r.inference.items():
        if isinstance(value, np.ndarray) and value.shape == r.matrix.shape:
            if matrices:
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
