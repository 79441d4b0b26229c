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

from ..lazy_exports import lazy_exports

# public name -> the submodule defining it, imported on first access (``__getattr__`` below)
_LAZY = {
    "StoreError": "..errors",
    "ActivationStore": ".base",
    "copy_into": ".base",
    "ChunkFiles": ".chunk_files",
    "ATTRS_KEY": ".format",
    "DEFAULT_CHUNK_BYTES": ".format",
    "FORMAT_VERSION": ".format",
    "INPUTS_ARRAY": ".format",
    "LAYERS_GROUP": ".format",
    "MASK_ARRAY": ".format",
    "StoreInfo": ".format",
    "chunk_samples": ".format",
    "MemoryStore": ".memory",
    "ZarrStore": ".zarr_store",
    "open_store": ".zarr_store",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
