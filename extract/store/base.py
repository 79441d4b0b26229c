"""``ActivationStore``: the interface every store backend implements (arrays and attributes only)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import StoreError
from .format import INPUTS_ARRAY, LAYERS_GROUP, StoreInfo

__all__ = ["ActivationStore", "copy_into"]


def copy_into(out: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``rows`` itself without ``out``; otherwise ``rows`` copied into ``out`` (``ActivationStore.read``)."""
    if out is None:
        return rows
    out[...] = rows
    return out


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
    def array_dtype(self, key: str) -> np.dtype:
        """The dtype ``read`` returns for ``key``."""

    @abstractmethod
    def write(self, key: str, start: int, block: np.ndarray) -> None:
        """Write ``block`` at rows ``start:start + len(block)``."""

    @abstractmethod
    def read(self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of array ``key`` as a NumPy array.

        With ``out`` (C-contiguous, shape ``(stop - start, *row_shape)``, the array's dtype) the rows are
        decoded into it and ``out`` is returned: no second copy of a large read is allocated.
        """

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

    def array_key(self, layer: str | None) -> str:
        """The array that holds ``layer`` (``None``: the stored inputs), refusing one the store lacks."""
        if layer is None:
            if not self.has_array(INPUTS_ARRAY):
                raise StoreError(
                    f"{self} holds no inputs, which dCKA needs as its confounder; "
                    "re-extract without --no-inputs, or pass confounder= explicitly."
                )
            return INPUTS_ARRAY
        if layer not in self.info.layers:
            raise StoreError(f"{self} has no layer {layer!r}; its layers are {self.info.layers}.")
        return f"{LAYERS_GROUP}/{layer}"

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-sample shape of ``layer`` (without the sample axis)."""
        return self.array_shape(self.array_key(layer))[1:]

    def read_layer(self, layer: str, start: int = 0, stop: int | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        return self.read(self.array_key(layer), start, stop, out)

    def read_inputs(self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self.read(self.array_key(None), start, stop, out)

    def sample_labels(self) -> tuple[list[str], list[str]] | None:
        """(relative file paths, classes) of the samples when the data was an image folder, else None."""
        return None

    def require_complete(self) -> None:
        """Raise unless the store carries its completion marker."""
        info = self.info
        if not info.complete:
            raise StoreError(
                f"{self} is incomplete ({info.samples_done} of {info.n_samples} samples written); "
                "rerun the same `pipeline.py extract` command to finish it."
            )
