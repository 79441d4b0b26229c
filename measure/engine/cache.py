"""A persistent cache of per-layer statistics (float64 Grams) in a Zarr v3 group.

Comparing a zoo of models is dominated by the per-layer statistics (for the
Gram route, K = X Xᵀ of every layer of every store: O(n² p) each), while a
pair only costs a reduction over two statistics. This cache keeps the
statistics between runs, so that adding one model to a zoo of ten costs one
model's statistics plus the new pairs. Layout (readable with plain zarr)::

    .simtorch-cache.zarr/
      zarr.json
      entries/<key>    float64 array (the statistic), attributes "simtorch_cache":
                       {"complete": bool, "meta": {...}, "crc32c": int}

``key`` is the SHA-256 of ``meta``: the store's dataset fingerprint, weights
digest, a digest of the store's whole attribute record (its identity: model,
layers, sample count, chunking, completion info, library versions), the layer
name with its array shape and dtype, the statistic kind and the options that
change it (e.g. ``batch_size`` of per-batch Grams). A store rewritten with
other weights, data or layers has another key, so its old entries are never
read; ``evict_stale`` also deletes the entries recorded for the same store
path with an older identity.

Writes are atomic in the "write, then mark complete" sense: an entry is
created with ``complete: false``, filled, and only then marked complete
together with the CRC-32C of its bytes. A run killed mid-write leaves an
incomplete entry, which ``get`` treats as missing and the next ``put``
overwrites. ``get`` re-checks that checksum (each chunk also carries its own),
so a damaged entry is recomputed, never used; entries written by older versions
(which recorded a SHA-256 instead) are recomputed once. Works on a local
folder or any fsspec URL (``s3://...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from extract.store import ActivationStore
from extract.store.chunk_files import ChunkFiles

__all__ = ["CACHE_NAME", "StatisticsCache", "default_cache_path", "store_identity"]

CACHE_NAME = ".simtorch-cache.zarr"
ATTRS_KEY = "simtorch_cache"
CACHE_FORMAT = 1
ENTRIES = "entries"
CHUNK_BYTES = 16 * 2**20


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(value: np.ndarray) -> int:
    """CRC-32C of the statistic's bytes (catches a missing, truncated or swapped chunk; ~30× faster than SHA-256)."""
    return crc32c.crc32c(memoryview(np.ascontiguousarray(value)).cast("B"))


def _read(array) -> np.ndarray:
    """The entry's values: its chunk files read straight into the result (``extract.store.chunk_files``), else zarr."""
    files = ChunkFiles.of(array)
    if files is not None and array.dtype == np.float64:
        out = np.empty(array.shape, np.float64)
        if files.read(0, out):
            return out
    return np.asarray(array[...], dtype=np.float64)


def _write(array, value: np.ndarray) -> None:
    """Fill a new entry: whole chunks straight to their files (byte-identical to zarr's), the rest by zarr."""
    files = ChunkFiles.of(array) if value.ndim else None
    whole = files.whole_chunks(0, len(value)) if files is not None else 0
    if whole:
        files.write(0, value[:whole])
    if not value.ndim:
        array[...] = value
    elif whole < len(value):
        array[whole:] = value[whole:]


def store_identity(store: ActivationStore) -> str:
    """SHA-256 of the store's whole attribute record (changes whenever the store is rewritten)."""
    return _digest(asdict(store.info))


def _store_source(store: ActivationStore) -> str:
    return str(getattr(store, "path", repr(store)))


def default_cache_path(store_paths: list[str]) -> str:
    """``<folder of the first store>/.simtorch-cache.zarr`` (works for local paths and URLs)."""
    first = str(store_paths[0]).rstrip("/")
    if "://" in first:
        return first.rsplit("/", 1)[0] + "/" + CACHE_NAME
    return str(Path(first).parent / CACHE_NAME)


class StatisticsCache:
    """Per-layer statistics kept in a Zarr group between runs.

    Parameters
    ----------
    path : str or path-like
        The cache group (created on first write), a local folder or an fsspec URL.
    storage_options : dict, optional
        fsspec options for URLs (credentials come from the environment by default).
    read_only : bool, default=False
        Never write; only reuse what is there.

    Attributes
    ----------
    hits, misses, writes : int
        Counts of ``get`` calls answered from the cache, ``get`` calls that were
        not, and entries written: the work the cache saved or did.
    """

    def __init__(self, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                 read_only: bool = False) -> None:
        self.path = str(path)
        self.storage_options = storage_options
        self.read_only = read_only
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._count_lock = threading.Lock()  # the engine reads entries on several threads
        self._group = None
        self._writable = False
        self._evicted: set[str] = set()
        self._found: dict[str, tuple[Any, dict[str, Any]]] = {}  # entries ``contains`` found, for ``get``

    def __repr__(self) -> str:
        return f"StatisticsCache({self.path!r})"

    # ------------------------------------------------------------------ keys
    @staticmethod
    def meta(store: ActivationStore, layer: str | None, kind: str = "gram",
             options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything that determines the statistic; ``layer=None`` means the stored inputs."""
        info = store.info
        if layer is None:
            shape = list(info.input_shape)
        else:
            shape = list(store.layer_shape(layer))
        return {
            "format": CACHE_FORMAT,
            "fingerprint": info.fingerprint,
            "weights_digest": info.weights_digest,
            "store_identity": store_identity(store),
            "n_samples": info.n_samples,
            "layer": layer,
            "layer_shape": shape,
            "dtype": info.dtype,
            "kind": kind,
            "options": dict(sorted((options or {}).items())),
        }

    def key(self, store: ActivationStore, layer: str | None, kind: str = "gram",
            options: dict[str, Any] | None = None) -> str:
        return _digest(self.meta(store, layer, kind, options))

    # ------------------------------------------------------------------ storage
    def _open(self, create: bool):
        import zarr

        if self._group is not None and (not create or self._writable):
            return self._group
        kwargs: dict[str, Any] = {"zarr_format": 3}
        if self.storage_options:
            kwargs["storage_options"] = self.storage_options
        try:
            self._group = zarr.open_group(self.path, mode="r" if self.read_only or not create else "a", **kwargs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            if create:
                raise
            return None
        self._writable = create and not self.read_only
        return self._group

    def _entry(self, key: str):
        group = self._open(create=False)
        if group is None:
            return None
        try:
            node = group[f"{ENTRIES}/{key}"]
        except KeyError:
            return None
        return node if hasattr(node, "shape") else None

    def _complete_entry(self, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """(array, attributes) of the entry for ``meta`` when it exists and is marked complete for it."""
        known = self._found.pop(_digest(meta), None)  # found by ``contains`` just before: not looked up twice
        if known is not None:
            return known
        array = self._entry(_digest(meta))
        if array is None:
            return None
        attrs = dict(array.attrs.get(ATTRS_KEY, {}))
        if attrs.get("complete") and attrs.get("meta") == json.loads(json.dumps(meta, default=str)):
            return array, attrs
        return None

    def contains(self, store: ActivationStore, layer: str | None, kind: str = "gram",
                 options: dict[str, Any] | None = None) -> bool:
        """Whether a complete entry exists (its data is checked only by ``get``); counts nothing."""
        meta = self.meta(store, layer, kind, options)
        found = self._complete_entry(meta)
        if found is not None:
            self._found[_digest(meta)] = found
        return found is not None

    def get(self, store: ActivationStore, layer: str | None, kind: str = "gram",
            options: dict[str, Any] | None = None) -> np.ndarray | None:
        """The cached statistic, or None when absent, incomplete, stale or damaged."""
        meta = self.meta(store, layer, kind, options)
        found = self._complete_entry(meta)
        value = None
        if found is not None:
            array, attrs = found
            try:
                data = _read(array)
            except Exception as exc:  # a damaged chunk fails its crc32c check: recompute
                warnings.warn(f"Cache entry {_digest(meta)[:12]} of {self.path} is unreadable ({exc}); "
                              "recomputing it.", stacklevel=2)
                data = None
            if data is not None and _checksum(data) == attrs.get("crc32c"):
                value = data
        with self._count_lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def put(self, store: ActivationStore, layer: str | None, value: np.ndarray, kind: str = "gram",
            options: dict[str, Any] | None = None) -> bool:
        """Write ``value`` as the entry for (store, layer, kind, options); False when the cache is not writable."""
        if self.read_only:
            return False
        from zarr.codecs import Crc32cCodec

        value = np.ascontiguousarray(value, dtype=np.float64)
        meta = self.meta(store, layer, kind, options)
        key = _digest(meta)
        self._found.pop(key, None)  # whatever ``contains`` saw is being replaced
        try:
            group = self._open(create=True)
            self.evict_stale(store)
            row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * 8)
            rows = max(1, min(value.shape[0] if value.ndim else 1, CHUNK_BYTES // row_bytes))
            array = group.create_array(
                f"{ENTRIES}/{key}", shape=value.shape, dtype="float64",
                chunks=(rows, *value.shape[1:]) if value.ndim else (), compressors=[Crc32cCodec()],
                fill_value=0.0, overwrite=True, config={"write_empty_chunks": True},  # no all-equal scan
            )
            array.attrs[ATTRS_KEY] = {"complete": False, "meta": meta, "source": _store_source(store)}
            _write(array, value)
            array.attrs[ATTRS_KEY] = {"complete": True, "meta": meta, "source": _store_source(store),
                                      "crc32c": _checksum(value)}
        except (OSError, PermissionError) as exc:
            warnings.warn(f"Could not write to the statistics cache {self.path} ({exc}); continuing without it. "
                          "Name a writable folder with --cache, or pass --no-cache.", stacklevel=2)
            self.read_only = True
            return False
        with self._count_lock:
            self.writes += 1
        return True

    # ------------------------------------------------------------------ housekeeping
    def entries(self) -> dict[str, dict[str, Any]]:
        """Key -> the entry's attributes, for every entry in the cache."""
        group = self._open(create=False)
        if group is None or ENTRIES not in group:
            return {}
        out = {}
        for name, node in group[ENTRIES].members():
            out[name] = dict(node.attrs.get(ATTRS_KEY, {}))
        return out

    def evict_stale(self, store: ActivationStore) -> list[str]:
        """Delete entries recorded for the same store path whose store identity is no longer current."""
        source = _store_source(store)
        if self.read_only or source in self._evicted:
            return []
        self._evicted.add(source)
        current = store_identity(store)
        stale = [key for key, attrs in self.entries().items()
                 if attrs.get("source") == source and attrs.get("meta", {}).get("store_identity") != current]
        if stale:
            group = self._open(create=True)
            for key in stale:
                del group[f"{ENTRIES}/{key}"]
        return stale
