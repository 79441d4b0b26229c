"""Store inspection: what ``pipeline.py info STORE`` and ``pipeline.py ls [FOLDER]`` print.

``summarize(path)`` reads a store's attributes and array metadata (no
activations) and measures its size on disk, per layer: the compression ratio
is the uncompressed size (samples × per-sample elements × item size) over the
bytes of the array's files. ``list_stores(folder)`` summarises every store in
a folder and ``comparability_groups`` groups them the way ``measure`` does:
two stores are comparable when both are complete and their dataset
fingerprints and sample counts agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .format import INPUTS_ARRAY, LAYERS_GROUP, MASK_ARRAY
from .zarr_store import ZarrStore

__all__ = [
    "ArraySummary",
    "StoreSummary",
    "comparability_groups",
    "format_info",
    "format_ls",
    "human_bytes",
    "list_stores",
    "summarize",
]


@dataclass
class ArraySummary:
    """One array of a store: per-sample shape, dtype, reduction and bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reduction: str
    stored_bytes: int
    raw_bytes: int

    @property
    def ratio(self) -> float:
        """Compression ratio raw / stored (NaN when nothing is stored yet)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")


@dataclass
class StoreSummary:
    """What ``info`` prints about one store."""

    path: str
    model_name: str
    model_spec: str
    weights_digest: str
    n_samples: int
    samples_done: int
    complete: bool
    fingerprint: str
    dtype: str
    chunk_samples: int
    layers: list[ArraySummary] = field(default_factory=list)
    extras: list[ArraySummary] = field(default_factory=list)  # inputs, mask
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        return sum(a.stored_bytes for a in (*self.layers, *self.extras))

    @property
    def raw_bytes(self) -> int:
        return sum(a.raw_bytes for a in (*self.layers, *self.extras))

    @property
    def group_key(self) -> tuple[str, int] | None:
        """(fingerprint, n_samples) of a complete store; None when it cannot be compared yet."""
        return (self.fingerprint, self.n_samples) if self.complete and self.fingerprint else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stored_bytes"], d["raw_bytes"] = self.stored_bytes, self.raw_bytes
        return d


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _disk_bytes(path: str) -> int:
    """Bytes of every file under ``path`` (a local directory or an fsspec URL)."""
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        try:
            return int(fs.du(root, total=True))
        except FileNotFoundError:
            return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _array(store: ZarrStore, key: str, name: str, reduction: str) -> ArraySummary:
    array = store.zarr_array(key)
    shape = tuple(int(s) for s in array.shape)
    itemsize = np.dtype(array.dtype).itemsize
    raw = int(np.prod(shape, dtype=np.int64)) * itemsize
    return ArraySummary(name=name, shape=shape[1:], dtype=str(array.dtype), reduction=reduction,
                        stored_bytes=_disk_bytes(f"{store.path.rstrip('/')}/{key}"), raw_bytes=raw)


def summarize(path: str | os.PathLike[str]) -> StoreSummary:
    """Summary of the store at ``path`` (attributes, array shapes and sizes; no activations are read).

    Raises
    ------
    StoreError
        If there is no simtorch store at ``path``.
    """
    path = str(path)
    if "://" not in path and not Path(path).exists():
        raise StoreError(f"No store at {path}: check the path (`pipeline.py ls FOLDER` lists the stores there).")
    store = ZarrStore(path, read_only=True)
    info = store.info
    layers = [_array(store, f"{LAYERS_GROUP}/{layer}", layer, info.reductions.get(layer, "flatten"))
              for layer in info.layers if store.has_array(f"{LAYERS_GROUP}/{layer}")]
    extras = [_array(store, key, key, "") for key in (INPUTS_ARRAY, MASK_ARRAY) if store.has_array(key)]
    return StoreSummary(
        path=path, model_name=info.model_name, model_spec=info.model_spec, weights_digest=info.weights_digest,
        n_samples=info.n_samples, samples_done=info.samples_done, complete=info.complete,
        fingerprint=info.fingerprint, dtype=info.dtype, chunk_samples=info.chunk_samples, layers=layers,
        extras=extras, versions=dict(info.versions),
    )


def _completeness(s: StoreSummary) -> str:
    if s.complete:
        return "complete"
    return (f"INCOMPLETE: {s.samples_done} of {s.n_samples} samples written; rerun the same "
            "`pipeline.py extract` command to finish it")


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def format_info(s: StoreSummary) -> str:
    """The text ``pipeline.py info`` prints."""
    lines = [
        f"store        {s.path}",
        f"model        {s.model_name}" + (f"  ({s.model_spec})" if s.model_spec else ""),
        f"weights      {s.weights_digest or '-'}",
        f"samples      {s.n_samples}  [{_completeness(s)}]",
        f"fingerprint  {s.fingerprint or '- (written when the store is complete)'}",
        f"dtype        {s.dtype}, chunks of {s.chunk_samples} samples",
    ]
    if s.versions:
        lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in s.versions.items()))
    rows = [["layer", "shape", "dtype", "reduction", "on disk", "raw", "ratio"]]
    for a in (*s.layers, *s.extras):
        rows.append([a.name if a in s.layers else f"({a.name})", str(a.shape), a.dtype, a.reduction or "-",
                     human_bytes(a.stored_bytes), human_bytes(a.raw_bytes), f"{a.ratio:.1f}x"])
    ratio = s.raw_bytes / s.stored_bytes if s.stored_bytes else float("nan")
    rows.append([f"total ({len(s.layers)} layers)", "", "", "", human_bytes(s.stored_bytes),
                 human_bytes(s.raw_bytes), f"{ratio:.1f}x"])
    lines += ["", *_table(rows, right={4, 5, 6})]
    return "\n".join(lines)


def list_stores(folder: str | os.PathLike[str]) -> tuple[list[StoreSummary], list[tuple[str, str]]]:
    """(summaries of the stores in ``folder``, [(path, why) for Zarr groups that are not readable stores]).

    A store is a direct child directory holding ``zarr.json`` (hidden ones, such
    as the statistics cache, are skipped); ``folder`` may itself be a store.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a folder; `pipeline.py ls FOLDER` lists the stores in a folder.")
    candidates = [folder] if (folder / "zarr.json").exists() else sorted(
        p for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").exists())  # .simtorch-cache.zarr...
    found, skipped = [], []
    for path in candidates:
        try:
            found.append(summarize(path))
        except StoreError as exc:
            skipped.append((str(path), str(exc)))
    return found, skipped


def comparability_groups(summaries: Sequence[StoreSummary]) -> tuple[list[list[StoreSummary]], list[StoreSummary]]:
    """(groups of mutually comparable complete stores, incomplete stores)."""
    groups: dict[tuple[str, int], list[StoreSummary]] = {}
    incomplete = []
    for s in summaries:
        key = s.group_key
        if key is None:
            incomplete.append(s)
        else:
            groups.setdefault(key, []).append(s)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0].path))  # biggest group first
    return ordered, incomplete


def format_ls(summaries: Sequence[StoreSummary], skipped: Sequence[tuple[str, str]] = (), folder: str = "") -> str:
    """The text ``pipeline.py ls`` prints: stores grouped by what can be compared with what."""
    if not summaries and not skipped:
        return f"no stores in {folder or 'the folder'}; create some with `pipeline.py extract`."
    groups, incomplete = comparability_groups(summaries)
    lines = []
    for i, group in enumerate(groups):
        label = chr(ord("A") + i) if i < 26 else str(i + 1)
        fp, n = group[0].group_key  # type: ignore[misc]
        lines.append(f"group {label}: {len(group)} store(s) comparable with each other "
                     f"({n} samples, fingerprint {fp[:23]}…)")
        rows = [[f"  {s.model_name}", Path(s.path).name, f"{len(s.layers)} layers", human_bytes(s.stored_bytes),
                 s.dtype] for s in group]
        lines += _table(rows, right={3})
    if incomplete:
        lines.append("incomplete (not comparable until finished; rerun their extract command):")
        lines += _table([[f"  {s.model_name}", Path(s.path).name, f"{s.samples_done}/{s.n_samples} samples",
                          human_bytes(s.stored_bytes)] for s in incomplete], right={3})
    if skipped:
        lines.append("not readable as stores:")
        lines += [f"  {Path(p).name}: {why}" for p, why in skipped]
    if len(groups) > 1:
        lines.append("stores of different groups hold different data and cannot be measured together.")
    return "\n".join(lines)
