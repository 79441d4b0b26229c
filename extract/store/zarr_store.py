"""``ZarrStore``: a store in a Zarr v3 group on local disk or an fsspec URL, and ``open_store``.

The format it reads and writes is described in ``extract.store.format``; whole
chunks of a local store go through ``extract.store.chunk_files``, everything
else through zarr.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .base import ActivationStore
from .chunk_files import ChunkFiles
from .format import (
    ATTRS_KEY,
    INPUTS_ARRAY,
    LAYERS_GROUP,
    MASK_ARRAY,
    SAMPLE_CLASS_ARRAY,
    SAMPLE_PATH_ARRAY,
    StoreInfo,
    chunk_codecs,
    dimension_names,
    document_digest,
)
from .remote import unreachable_message

__all__ = ["ZarrStore", "open_store"]


class ZarrStore(ActivationStore):
    """A store in a Zarr v3 group, on local disk or any fsspec URL."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = True,
        create: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        import zarr

        super().__init__(read_only=read_only)
        self.path = str(path)
        self._storage_options = storage_options
        mode = "r" if read_only else ("w" if create else "r+")
        kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
        if storage_options:
            kwargs["storage_options"] = storage_options
        try:
            self._group = zarr.open_group(self.path, **kwargs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                f"No store at {self.path}: check the path, or create it with `pipeline.py extract`."
            ) from exc
        except (ValueError, KeyError, zarr.errors.NodeTypeValidationError) as exc:
            raise StoreError(f"{self.path} is not a readable Zarr v3 group: {exc}") from exc
        except Exception as exc:  # a lost connection to remote storage gets a clear message
            _raise_if_unreachable(f"The store {self.path}", exc)
            raise
        self._info: StoreInfo | None = None
        self._chunks_checked: set[str] = set()
        if not create and ATTRS_KEY not in self._group.attrs:
            raise StoreError(
                f"{self.path} is a Zarr group but not a simtorch store (no '{ATTRS_KEY}' attributes); "
                "point at a store written by `pipeline.py extract`."
            )
        if read_only and not create:
            self._verify_integrity()

    def __repr__(self) -> str:
        return f"store {self.path}"

    @property
    def info(self) -> StoreInfo:
        if self._info is None:
            self._info = StoreInfo.from_dict(dict(self._group.attrs[ATTRS_KEY]))
        return self._info

    def write_info(self, info: StoreInfo) -> None:
        """Write the attributes; a complete store also gets the digests that ``_verify_integrity`` checks."""
        self._check_writable()
        info.integrity = self._metadata_digests(info) if info.complete else {}
        self._group.attrs[ATTRS_KEY] = asdict(info)
        self._info = StoreInfo.from_dict(asdict(info))

    # --- integrity: chunks carry crc32c; every zarr.json is covered by a digest written at completion
    def _metadata_documents(self, info: StoreInfo) -> list[str]:
        arrays = [f"{LAYERS_GROUP}/{layer}" for layer in info.layers]
        arrays += [k for k in (INPUTS_ARRAY, MASK_ARRAY, SAMPLE_PATH_ARRAY, SAMPLE_CLASS_ARRAY) if self.has_array(k)]
        return ["zarr.json", f"{LAYERS_GROUP}/zarr.json", *(f"{key}/zarr.json" for key in arrays)]

    def _read_document(self, name: str) -> Any:
        """A zarr.json of this store parsed strictly (a flipped bit in a key is not ignored)."""
        import json

        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store_path = self._group.store_path
        key = f"{store_path.path}/{name}" if store_path.path else name
        raw = sync(store_path.store.get(key, prototype=default_buffer_prototype()))
        if raw is None:
            raise StoreError(f"{self}: metadata file {name} is missing; re-extract with `pipeline.py extract --force`.")
        try:
            return json.loads(raw.to_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"{self}: metadata file {name} is corrupt ({exc}); re-extract with `pipeline.py extract --force`."
            ) from exc

    def _metadata_digests(self, info: StoreInfo) -> dict[str, str]:
        digests = {}
        for name in self._metadata_documents(info):
            if name == "zarr.json":  # the root document as it will be once ``info`` is written
                document = self._read_document(name)
                document.setdefault("attributes", {})[ATTRS_KEY] = asdict(info)
            else:
                document = self._read_document(name)
            digests[name] = document_digest(document)
        return digests

    def _verify_integrity(self) -> None:
        """Check a complete store's metadata documents against the digests recorded at completion."""
        try:
            info = self.info
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(f"{self}: its simtorch attributes are corrupt ({exc}); re-extract with --force.") from exc
        if not info.complete:
            return
        if not info.integrity:
            raise StoreError(f"{self} is marked complete but carries no metadata digests; it was not finished by "
                             "`pipeline.py extract` (or its attributes were edited). Re-extract it with --force.")
        names = self._metadata_documents(info)
        bad = sorted(n for n in set(names) | set(info.integrity)
                     if n not in info.integrity or n not in names
                     or document_digest(self._read_document(n)) != info.integrity[n])
        if bad:
            raise StoreError(
                f"{self}: metadata {', '.join(bad)} does not match the digest recorded when the store was "
                "completed (corrupt or edited); re-extract the store with `pipeline.py extract --force`."
            )

    def _array(self, key: str):
        """The zarr array ``key``; unreadable metadata becomes a StoreError naming it."""
        try:
            return self._group[key]
        except KeyError:
            raise
        except Exception as exc:
            _raise_if_unreachable(f"{self} (metadata of {key!r})", exc)
            raise StoreError(
                f"{self}: the metadata (zarr.json) of {key!r} cannot be read ({type(exc).__name__}: {exc}); "
                "the store is corrupt. Re-extract it with `pipeline.py extract --force`."
            ) from exc

    def _check_chunks_present(self, key: str, array) -> None:
        """A complete store has every chunk on disk: zarr would read a missing chunk as zeros."""
        if key in self._chunks_checked or not self.info.complete:
            return
        if array.nchunks_initialized != array.nchunks:
            from zarr.core.sync import sync

            n_chunks = array.cdata_shape[0]
            rest = (0,) * (array.ndim - 1)
            missing = [i for i in range(n_chunks)
                       if not sync(array.store.exists(f"{array.store_path.path}/"
                                                      f"{array.metadata.encode_chunk_key((i, *rest))}"))]
            raise StoreError(
                f"{self}: array {key!r} is missing chunk(s) {missing[:8]} of {n_chunks} (deleted chunk files); "
                "re-extract the store with `pipeline.py extract --force`."
            )
        self._chunks_checked.add(key)

    def create_array(self, key: str, shape: tuple[int, ...], dtype: str, chunk_samples: int,
                     dims: list[str] | None = None) -> None:
        """Create (or replace) ``key``; ``dims`` are its ``dimension_names`` (default: ``format.dimension_names``)."""
        self._check_writable()
        self.__dict__.get("_writable", {}).pop(key, None)
        self.__dict__.get("_files", {}).pop(key, None)
        self._group.create_array(
            key,
            shape=shape,
            chunks=(max(1, chunk_samples), *shape[1:]),
            dtype=dtype,
            compressors=chunk_codecs(),
            fill_value=0,
            overwrite=True,
            config={"write_empty_chunks": True},  # every chunk is a file, so a deleted one is detectable
            dimension_names=list(dims) if dims is not None else dimension_names(key, tuple(shape)),
        )

    def write_sample_labels(self, paths: list[str], classes: list[str]) -> None:
        """Write the per-sample file paths and classes of an image folder (1-d string arrays).

        Written by ``extract`` just before the completion marker, whose metadata digests then cover them.
        """
        self._check_writable()
        if len(paths) != len(classes):
            raise ValueError(f"{len(paths)} sample paths but {len(classes)} classes.")
        for key, values in ((SAMPLE_PATH_ARRAY, paths), (SAMPLE_CLASS_ARRAY, classes)):
            array = self._group.create_array(
                key, shape=(len(values),), chunks=(max(1, min(len(values), 2**16)),), dtype=str,
                compressors=chunk_codecs(), fill_value="", overwrite=True, dimension_names=["sample"],
                config={"write_empty_chunks": True},
            )
            array[:] = np.asarray(values, dtype=object)

    def sample_labels(self) -> tuple[list[str], list[str]] | None:
        """(relative file paths, classes) of the samples of an image-folder store; None for other stores."""
        if not (self.has_array(SAMPLE_PATH_ARRAY) and self.has_array(SAMPLE_CLASS_ARRAY)):
            return None
        labels = []
        for key in (SAMPLE_PATH_ARRAY, SAMPLE_CLASS_ARRAY):
            array = self._array(key)
            if array.nchunks_initialized != array.nchunks or array.shape != (self.info.n_samples,):
                raise StoreError(f"{self}: array {key!r} is incomplete or has the wrong length; re-extract the "
                                 "store with `pipeline.py extract --force`.")
            try:
                labels.append([str(v) for v in array[:]])
            except Exception as exc:
                raise StoreError(f"{self}: array {key!r} cannot be read ({type(exc).__name__}: {exc}); re-extract "
                                 "the store with `pipeline.py extract --force`.") from exc
        return labels[0], labels[1]

    def has_array(self, key: str) -> bool:
        try:
            node = self._array(key)
        except KeyError:
            return False
        return hasattr(node, "shape")

    def array_shape(self, key: str) -> tuple[int, ...]:
        if not self.read_only:
            return tuple(self._array(key).shape)
        shapes = self.__dict__.setdefault("_shapes", {})  # read-only: shapes cannot change, ask zarr once
        if key not in shapes:
            shapes[key] = tuple(self._array(key).shape)
        return shapes[key]

    def array_dtype(self, key: str) -> np.dtype:
        return np.dtype(self._array(key).dtype)

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        self._check_writable()
        arrays = self.__dict__.setdefault("_writable", {})  # opened once: each open reads its zarr.json
        if key not in arrays:
            # write_empty_chunks is a runtime setting that zarr does not store with the array: reopened
            # without it, an all-zero chunk (a dead ReLU layer) would not be written, and the complete
            # store would then read as missing that chunk
            arrays[key] = self._group[key].with_config({"write_empty_chunks": True})
        array = arrays[key]
        chunk_files = self._chunk_files(key, array)
        whole = chunk_files.whole_chunks(start, len(block)) if chunk_files is not None else 0
        if whole:  # whole chunks of a local store: encoded and written directly (extract.store.chunk_files)
            chunk_files.write(start, block[:whole])
        if whole < len(block):
            array[start + whole : start + len(block)] = block[whole:]

    def _chunk_files(self, key: str, array) -> ChunkFiles | None:
        """Direct access to the chunk files of ``key`` (``extract.store.chunk_files``), or None: through zarr."""
        found = self.__dict__.setdefault("_files", {})
        if key not in found:
            found[key] = ChunkFiles.of(array)
        return found[key]

    def read(self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        array = self._array(key)
        stop = array.shape[0] if stop is None else stop
        self._check_chunks_present(key, array)
        if out is None:  # rows past the end are left out, as slicing does
            out = np.empty((max(0, min(stop, array.shape[0]) - start), *array.shape[1:]), dtype=np.dtype(array.dtype))
            stop = start + len(out)
        files = self._chunk_files(key, array)
        if files is not None and len(out) == stop - start and files.read(start, out):  # decoded straight into out
            return out
        try:
            from zarr.core.buffer.cpu import NDBuffer  # zarr decodes chunk by chunk into it

            array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
            return out
        except Exception as exc:  # zarr raises codec-specific errors on corrupt chunks
            _raise_if_unreachable(f"{self} (array {key!r}, rows {start}:{stop})", exc)
            raise self._corrupt_chunk_error(key, array, start, stop, exc) from exc

    def _corrupt_chunk_error(self, key: str, array, start: int, stop: int, exc: Exception) -> StoreError:
        """Decode the chunks of rows ``start:stop`` one by one to name the first that fails."""
        rows = array.chunks[0]
        for index in range(start // rows, max(start, stop - 1) // rows + 1):
            lo, hi = index * rows, min(array.shape[0], (index + 1) * rows)
            try:
                array[lo:hi]
            except Exception as chunk_exc:
                what = "checksum mismatch (crc32c)" if "checksum" in str(chunk_exc).lower() else "decoding failed"
                chunk_key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
                return StoreError(
                    f"{self}: array {key!r}, chunk {index} (rows {lo}:{hi}, file {key}/{chunk_key}): {what} "
                    f"({type(chunk_exc).__name__}: {chunk_exc}). The chunk is corrupt; re-extract the store "
                    "with `pipeline.py extract --force`."
                )
        return StoreError(
            f"{self}: array {key!r}, rows {start}:{stop} could not be read ({type(exc).__name__}: {exc}); "
            "re-extract the store with `pipeline.py extract --force`."
        )

    def zarr_array(self, key: str):
        """The underlying ``zarr.Array`` (for dask.array.from_zarr)."""
        return self._group[key]


def _raise_if_unreachable(what: str, exc: BaseException) -> None:
    """Raise a StoreError that says so when ``exc`` is a lost connection to remote storage (not corruption)."""
    message = unreachable_message(what, exc)
    if message is not None:
        raise StoreError(message) from exc


def open_store(store_like: ActivationStore | str | os.PathLike[str], **kwargs: Any) -> ActivationStore:
    """Turn a path, URL or store into an ``ActivationStore`` (read-only by default).

    Raises
    ------
    TypeError
        If ``store_like`` is neither a store nor a path/URL.
    StoreError
        If there is no simtorch store at the path.
    """
    if isinstance(store_like, ActivationStore):
        return store_like
    if isinstance(store_like, (str, Path, os.PathLike)):
        path = str(store_like)
        if "://" not in path and not Path(path).exists():
            raise StoreError(
                f"No store at {path}: check the path, or create it with `pipeline.py extract`."
            )
        return ZarrStore(path, **kwargs)
    raise TypeError(
        f"Expected an ActivationStore, a path or a URL, got {type(store_like).__name__}."
    )
