"""``MemoryStore``: a store in memory, filled by the in-memory API from live hooks."""

from __future__ import annotations

import numpy as np

from .base import ActivationStore, copy_into
from .format import StoreInfo

__all__ = ["MemoryStore"]


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

    def array_dtype(self, key: str) -> np.dtype:
        return self._arrays[key].dtype

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        self._check_writable()
        self._arrays[key][start : start + len(block)] = block

    def read(self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return copy_into(out, self._arrays[key][start:stop])
