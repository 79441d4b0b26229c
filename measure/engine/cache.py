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

In a local folder, an entry is written aside, as a complete array with its
attributes and the CRC-32C of its bytes, in ``.tmp/<key>.<random>`` (outside
``entries/``, so listing the entries never sees it; removed once empty), and published by one ``os.rename`` onto
``entries/<key>``: readers see a whole entry or none, and several runs started
together on one cache all keep using it. A run that finds the entry published
by another run first (the rename fails) checks it and uses it, discarding its
own copy; an incomplete or damaged entry in the way is renamed into ``.tmp``
first, then deleted. The cache's groups are created race-free too (their
``zarr.json`` is hard-linked into place, so a concurrent creator loses nothing).
On an fsspec URL, where no atomic rename exists, an entry is created with
``complete: false``, filled, and only then marked complete together with the
CRC-32C of its bytes. Either way, a run killed mid-write leaves at most an
incomplete entry (or a ``.tmp`` folder), which ``get`` treats as missing and
the next ``put`` replaces. ``get`` re-checks that checksum (each chunk also carries its own),
so a damaged entry is recomputed, never used; entries written by older versions
(which recorded a SHA-256 instead) are recomputed once. Works on a local
folder or any fsspec URL (``s3://...``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.parse
import uuid
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
ASIDE = ".tmp"  # local caches: entries being written, and entries being replaced (outside ``entries/``)
PUBLISH_ATTEMPTS = 5
ABANDONED_SECONDS = 24 * 3600  # an entry written aside for longer than this belongs to a killed run
CHUNK_BYTES = 16 * 2**20


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(value: np.ndarray) -> int:
    """CRC-32C of the statistic's bytes (catches a missing, truncated or swapped chunk; cheaper than SHA-256)."""
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


def _array_options(value: np.ndarray) -> dict[str, Any]:
    """How an entry's array is laid out: float64, ~16 MiB chunks of whole rows, each with its CRC-32C."""
    from zarr.codecs import Crc32cCodec

    row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * 8)
    rows = max(1, min(value.shape[0] if value.ndim else 1, CHUNK_BYTES // row_bytes))
    return dict(shape=value.shape, dtype="float64", chunks=(rows, *value.shape[1:]) if value.ndim else (),
                compressors=[Crc32cCodec()], fill_value=0.0,
                config={"write_empty_chunks": True})  # no all-equal scan


def _fill(array, meta: dict[str, Any], value: np.ndarray, source: str) -> None:
    """Mark ``array`` incomplete, write ``value``, then mark it complete with the CRC-32C of its bytes."""
    array.attrs[ATTRS_KEY] = {"complete": False, "meta": meta, "source": source}
    _write(array, value)
    array.attrs[ATTRS_KEY] = {"complete": True, "meta": meta, "source": source, "crc32c": _checksum(value)}


def _valid_entry(path: Path, meta: dict[str, Any], crc: int) -> bool:
    """Whether the local entry at ``path`` is complete, for ``meta``, records CRC-32C ``crc`` and its bytes match."""
    import zarr

    try:
        array = zarr.open_array(str(path), mode="r", zarr_format=3)
        attrs = dict(array.attrs.get(ATTRS_KEY, {}))
        if not attrs.get("complete") or attrs.get("meta") != json.loads(json.dumps(meta, default=str)):
            return False
        return attrs.get("crc32c") == crc and _checksum(_read(array)) == crc
    except Exception:  # gone, half-replaced or damaged: not usable
        return False


def _make_aside(folder: Path, name: str) -> Path:
    """Create and return the empty directory ``folder/name`` (``folder`` is ``.tmp``, which other runs remove
    when they find it empty: recreated and retried until ours holds it open)."""
    for _ in range(100):
        try:
            folder.mkdir(parents=True, exist_ok=True)  # (FileExistsError: made, then removed, while it looked)
            (folder / name).mkdir()
            return folder / name
        except (FileNotFoundError, FileExistsError):  # ``folder`` removed by another run meanwhile
            continue
    raise OSError(errno.ENOENT, f"could not create {folder / name}")


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when empty (so plain zarr, listing the cache group, meets ``.tmp`` only mid-write)."""
    try:
        folder.rmdir()
    except OSError:  # not empty (another run is writing), or already gone
        pass


def _discard(path: Path, aside: Path) -> None:
    """Remove the entry at ``path``: renamed into ``aside`` first (so it leaves ``entries/`` at once), then deleted."""
    trash = _make_aside(aside, f"trash.{uuid.uuid4().hex}")
    try:
        os.rename(path, trash / "entry")
    except FileNotFoundError:  # already removed (by another run)
        pass
    shutil.rmtree(trash, ignore_errors=True)


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
        path = str(path)
        if path.startswith("file://"):  # a local folder, written as one (aside, then renamed into place)
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        self.path = path
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
        except (KeyError, FileNotFoundError):  # absent, or being replaced by another run
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
        value = np.ascontiguousarray(value, dtype=np.float64)
        meta = self.meta(store, layer, kind, options)
        key = _digest(meta)
        self._found.pop(key, None)  # whatever ``contains`` saw is being replaced
        try:
            if self._local:
                self._put_local(store, key, meta, value)
            else:
                group = self._open(create=True)
                self.evict_stale(store)
                array = group.create_array(f"{ENTRIES}/{key}", overwrite=True, **_array_options(value))
                _fill(array, meta, value, _store_source(store))
        except (OSError, PermissionError) as exc:
            warnings.warn(f"Could not write to the statistics cache {self.path} ({exc}); continuing without it. "
                          "Name a writable folder with --cache, or pass --no-cache.", stacklevel=2)
            self.read_only = True
            return False
        with self._count_lock:
            self.writes += 1
        return True

    # ------------------------------------------------------------------ local folders: write aside, rename
    @property
    def _local(self) -> bool:
        return "://" not in self.path

    def _put_local(self, store: ActivationStore, key: str, meta: dict[str, Any], value: np.ndarray) -> None:
        """Write the entry aside (``.tmp/<key>.<random>``), complete, then publish it with one rename."""
        import zarr

        self._create_groups()
        self.evict_stale(store)
        root = Path(self.path)
        aside = _make_aside(root / ASIDE, f"{key}.{uuid.uuid4().hex}")
        try:
            array = zarr.create_array(str(aside), zarr_format=3, **_array_options(value))
            _fill(array, meta, value, _store_source(store))
            self._publish(aside, root / ENTRIES / key, meta, _checksum(value))
        finally:
            shutil.rmtree(aside, ignore_errors=True)  # gone when published; ours is discarded when another won
            _remove_if_empty(root / ASIDE)

    def _create_groups(self) -> None:
        """Create the cache group and its ``entries`` group, tolerating other runs creating them at once.

        Each ``zarr.json`` is written aside by zarr, then hard-linked into place: the link either creates
        the file whole or finds one already there (another run's, identical), never a half-written one.
        """
        import zarr

        if self._group is not None and self._writable:
            return
        root = Path(self.path)
        for folder in (root, root / ENTRIES):
            if (folder / "zarr.json").is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            aside = _make_aside(root / ASIDE, f"group.{uuid.uuid4().hex}")
            try:
                zarr.open_group(str(aside), mode="w", zarr_format=3)
                try:
                    os.link(aside / "zarr.json", folder / "zarr.json")
                except FileExistsError:
                    pass
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        self._remove_abandoned()
        _remove_if_empty(root / ASIDE)
        self._open(create=True)

    def _remove_abandoned(self) -> None:
        """Delete what runs killed mid-write left in ``.tmp`` (untouched for ``ABANDONED_SECONDS``)."""
        now = time.time()
        for path in (Path(self.path) / ASIDE).glob("*"):
            try:
                if now - path.stat().st_mtime > ABANDONED_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:  # removed by another run meanwhile
                continue

    def _publish(self, aside: Path, target: Path, meta: dict[str, Any], crc: int) -> None:
        """Rename ``aside`` onto ``target``; when ``target`` exists, use it if it is a valid entry for ``meta``
        holding the same bytes (CRC-32C ``crc``: another run published it first), else move it out of the way
        (renamed aside, then deleted) and retry."""
        for _ in range(PUBLISH_ATTEMPTS):
            try:
                os.rename(aside, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if _valid_entry(target, meta, crc):
                return
            _discard(target, Path(self.path) / ASIDE)
        raise OSError(errno.EEXIST, f"could not publish the entry {target.name} (other runs kept replacing it)")

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
        if stale and self._local:
            for key in stale:  # renamed out of ``entries/`` first: another run may be deleting it too
                _discard(Path(self.path) / ENTRIES / key, Path(self.path) / ASIDE)
            _remove_if_empty(Path(self.path) / ASIDE)
        elif stale:
            group = self._open(create=True)
            for key in stale:
                del group[f"{ENTRIES}/{key}"]
        return stale
