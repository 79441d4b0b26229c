"""The measure engine: per-layer statistics of stores, obtained once, paired under each measure.

``Engine`` (``core``) runs measures on pairs of stores with the options of an ``EngineConfig``
(``config``); ``LayerStatistics`` (``layer_statistics``) is the one way it gets a layer's
statistic — memory, then the persistent cache (``cache``), then the store, streamed chunk by
chunk (``streaming``), or on dask workers (``dask_tasks``).
"""

from .config import EngineConfig, default_device
from .core import Engine, check_comparable, select_layers
from .results import PairResult

__all__ = ["Engine", "EngineConfig", "PairResult", "check_comparable", "default_device", "select_layers"]
