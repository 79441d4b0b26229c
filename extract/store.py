"""Activation stores: the on-disk contract between ``extract`` and ``measure``.

A store holds one model run over one dataset. On disk it is a plain Zarr v3
group that ``zarr.open_group`` and ``dask.array.from_zarr`` read without
simtorch::

    model.zarr/
      zarr.json               root attributes under the key "simtorch" (below)
      layers/<layer name>     float32 (or float16), shape (n_samples, *per_sample_shape)
      inputs                  the flattened inputs, shape (n_samples, n_input_features),
                              dCKA's confounder (absent with store_inputs=False)
      mask                    uint8 (n_samples, n_tokens), the attention mask of text inputs
                              (only for token inputs; see extract.reductions)

Every array is chunked along the sample axis only, with one chunk length per
store, and encoded ``bytes -> blosc(lz4, shuffle) -> crc32c`` so that a flipped
bit is caught on read. The root attributes (``StoreInfo``) record the model,
its weights digest, the layers in capture order, the storage dtype, the sample
count, the dataset fingerprint, library versions, the number of samples known
to be durable (``samples_done``) and the completion marker ``complete``.

Storage backends only move arrays and attributes; the extraction logic lives in
``extract.runner`` and never touches Zarr directly.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "ActivationStore",
    "MemoryStore",
    "StoreError",
    "StoreInfo",
    "ZarrStore",
    "open_store",
]

FORMAT_VERSION = 1
ATTRS_KEY = "simtorch"
LAYERS_GROUP = "layers"
INPUTS_ARRAY = "inputs"
MASK_ARRAY = "mask"


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupt, or not a simtorch store."""


@dataclass
class StoreInfo:
    """The attributes every store carries (JSON-serialisable)."""

    model_name: str
    model_spec: str = ""
    weights_digest: str = ""
    layers: list[str] = field(default_factory=list)
    dtype: str = "float32"
    n_samples: int = 0
    chunk_samples: int = 0
    samples_done: int = 0
    fingerprint: str = ""
    complete: bool = False
    inputs_stored: bool = True
    input_shape: list[int] = field(default_factory=list)
    chunk_digests: list[str] = field(default_factory=list)
    reductions: dict[str, str] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreInfo:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ActivationStore(ABC):
    """Where per-layer activations live: arrays of shape (n_samples, ...).

    Subclasses implement storage only. ``read_only`` stores refuse every write
    through ``_check_writable``.
    """

    def __init__(self, *, read_only: bool = False) -> None:
        self.read_only = read_only

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self} is open read-only; open it with read_only=False to write.")

    # --- attributes -------------------------------------------------
    @property
    @abstractmethod
    def info(self) -> StoreInfo: ...

    @abstractmethod
    def write_info(self, info: StoreInfo) -> None: ...

    # --- arrays -------------------------------------------------------
    @abstractmethod
    def create_array(self, key: str, shape: tuple[int, ...], dtype: str, chunk_samples: int) -> None:
        """Create (or replace) the array ``key`` ("layers/<name>" or "inputs")."""

    @abstractmethod
    def has_array(self, key: str) -> bool: ...

    @abstractmethod
    def array_shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def write(self, key: str, start: int, block: np.ndarray) -> None:
        """Write ``block`` at rows ``start:start + len(block)``."""

    @abstractmethod
    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of array ``key`` as a NumPy array."""

    # --- conveniences shared by every backend -------------------------
    @property
    def name(self) -> str:
        return self.info.model_name

    @property
    def layers(self) -> list[str]:
        return list(self.info.layers)

    @property
    def n_samples(self) -> int:
        return self.info.n_samples

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-sample shape of ``layer`` (without the sample axis)."""
        self._check_layer(layer)
        return self.array_shape(f"{LAYERS_GROUP}/{layer}")[1:]

    def read_layer(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        self._check_layer(layer)
        return self.read(f"{LAYERS_GROUP}/{layer}", start, stop)

    def read_inputs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        if not self.has_array(INPUTS_ARRAY):
            raise StoreError(
                f"{self} holds no inputs, which dCKA needs as its confounder; "
                "re-extract without --no-inputs, or pass confounder= explicitly."
            )
        return self.read(INPUTS_ARRAY, start, stop)

    def _check_layer(self, layer: str) -> None:
        if layer not in self.info.layers:
            raise StoreError(
                f"{self} has no layer {layer!r}; its layers are {self.info.layers}."
            )

    def require_complete(self) -> None:
        """Raise unless the store carries its completion marker."""
        info = self.info
        if not info.complete:
            raise StoreError(
                f"{self} is incomplete ({info.samples_done} of {info.n_samples} samples written); "
                "rerun the same `pipeline.py extract` command to finish it."
            )


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
        self._info: StoreInfo | None = None
        if not create and ATTRS_KEY not in self._group.attrs:
            raise StoreError(
                f"{self.path} is a Zarr group but not a simtorch store (no '{ATTRS_KEY}' attributes); "
                "point at a store written by `pipeline.py extract`."
            )

    def __repr__(self) -> str:
        return f"store {self.path}"

    @property
    def info(self) -> StoreInfo:
        if self._info is None:
            self._info = StoreInfo.from_dict(dict(self._group.attrs[ATTRS_KEY]))
        return self._info

    def write_info(self, info: StoreInfo) -> None:
        self._check_writable()
        self._group.attrs[ATTRS_KEY] = asdict(info)
        self._info = StoreInfo.from_dict(asdict(info))

    def create_array(self, key: str, shape: tuple[int, ...], dtype: str, chunk_samples: int) -> None:
        from zarr.codecs import BloscCodec, Crc32cCodec

        self._check_writable()
        self._group.create_array(
            key,
            shape=shape,
            chunks=(max(1, chunk_samples), *shape[1:]),
            dtype=dtype,
            compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
            fill_value=0,
            overwrite=True,
        )

    def has_array(self, key: str) -> bool:
        try:
            node = self._group[key]
        except KeyError:
            return False
        return hasattr(node, "shape")

    def array_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._group[key].shape)

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        self._check_writable()
        self._group[key][start : start + len(block)] = block

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        array = self._group[key]
        stop = array.shape[0] if stop is None else stop
        try:
            return np.asarray(array[start:stop])
        except Exception as exc:  # zarr raises codec-specific errors on corrupt chunks
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


class MemoryStore(ActivationStore):
    """A store in memory: what the in-memory API (``CKA.compute``) fills from live hooks."""

    def __init__(self, info: StoreInfo | None = None) -> None:
        super().__init__(read_only=False)
        self._info = info if info is not None else StoreInfo(model_name="memory")
        self._arrays: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"in-memory store {self._info.model_name!r}"

    @property
    def info(self) -> StoreInfo:
        return self._info

    def write_info(self, info: StoreInfo) -> None:
        self._check_writable()
        self._info = info

    def create_array(self, key: str, shape: tuple[int, ...], dtype: str, chunk_samples: int) -> None:
        self._check_writable()
        self._arrays[key] = np.zeros(shape, dtype=dtype)

    def has_array(self, key: str) -> bool:
        return key in self._arrays

    def array_shape(self, key: str) -> tuple[int, ...]:
        return self._arrays[key].shape

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        self._check_writable()
        self._arrays[key][start : start + len(block)] = block

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._arrays[key][start:stop]


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
