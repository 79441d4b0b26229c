"""simtorch stage one: capture layer activations and write them to Zarr stores."""

from .lazy_exports import lazy_exports

# public name -> the submodule defining it, imported on first access (``__getattr__`` below)
_LAZY = {
    "__version__": "._version",
    "LayerSelectionError": ".errors",
    "StoreError": ".errors",
    "SimilarityModel": ".hooks",
    "resolve_layers": ".hooks",
    "ExtractOptions": ".options",
    "ExtractResult": ".runner",
    "extract": ".runner",
    "ActivationStore": ".store.base",
    "MemoryStore": ".store.memory",
    "StoreInfo": ".store.format",
    "ZarrStore": ".store.zarr_store",
    "open_store": ".store.zarr_store",
}

__all__ = [
    "ActivationStore",
    "ExtractOptions",
    "ExtractResult",
    "LayerSelectionError",
    "MemoryStore",
    "SimilarityModel",
    "StoreError",
    "StoreInfo",
    "ZarrStore",
    "__version__",
    "extract",
    "open_store",
    "resolve_layers",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
