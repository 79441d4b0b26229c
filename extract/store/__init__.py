"""Activation stores: the format, the backends (Zarr, memory), chunk files, remote access and reductions.

``from extract.store import ZarrStore`` and the other names below keep working
as before this package existed; each lives in one module:

- ``format``       names, attributes (``StoreInfo``), codec chain, chunking rule, metadata digests
- ``base``         ``ActivationStore``, the interface of every backend
- ``memory``       ``MemoryStore``
- ``zarr_store``   ``ZarrStore`` and ``open_store``
- ``chunk_files``  whole chunks of a local store read and written directly
- ``remote``       fsspec URLs (s3://, memory://...)
- ``reductions``   per-layer reductions at extraction and ``ReducedStore`` at measurement
- ``summary``      what ``pipeline.py info`` and ``pipeline.py ls`` print
"""

from ..errors import StoreError
from .base import ActivationStore, copy_into
from .chunk_files import ChunkFiles
from .format import (
    ATTRS_KEY,
    DEFAULT_CHUNK_BYTES,
    FORMAT_VERSION,
    INPUTS_ARRAY,
    LAYERS_GROUP,
    MASK_ARRAY,
    StoreInfo,
    chunk_samples,
)
from .memory import MemoryStore
from .zarr_store import ZarrStore, open_store

__all__ = [
    "ATTRS_KEY",
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "INPUTS_ARRAY",
    "LAYERS_GROUP",
    "MASK_ARRAY",
    "ActivationStore",
    "ChunkFiles",
    "MemoryStore",
    "StoreError",
    "StoreInfo",
    "ZarrStore",
    "chunk_samples",
    "copy_into",
    "open_store",
]
