"""simtorch stage one: capture layer activations and write them to Zarr stores."""

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


def __getattr__(name: str):
    """PEP 562: import the submodule defining ``name`` on first access, so that importing the package is cheap."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
