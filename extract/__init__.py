"""simtorch stage one: capture layer activations and write them to Zarr stores."""

from ._version import __version__
from .errors import LayerSelectionError, StoreError
from .hooks import SimilarityModel, resolve_layers
from .options import ExtractOptions
from .runner import ExtractResult, extract
from .store import ActivationStore, MemoryStore, StoreInfo, ZarrStore, open_store

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
