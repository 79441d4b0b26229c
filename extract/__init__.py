"""simtorch stage one: capture layer activations and write them to Zarr stores."""

__version__ = "0.3.0"

from .hooks import LayerSelectionError, SimilarityModel, resolve_layers  # noqa: E402
from .runner import ExtractResult, extract  # noqa: E402
from .store import ActivationStore, MemoryStore, StoreError, StoreInfo, ZarrStore, open_store  # noqa: E402

__all__ = [
    "ActivationStore",
    "ExtractResult",
    "LayerSelectionError",
    "MemoryStore",
    "SimilarityModel",
    "StoreError",
    "StoreInfo",
    "ZarrStore",
    "extract",
    "open_store",
    "resolve_layers",
]
