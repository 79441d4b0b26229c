"""``EngineConfig``: the options of a measure run, in one small object, and the device they name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import MeasureError
from .streaming import DEFAULT_MEMORY_BUDGET

if TYPE_CHECKING:
    from .cache import StatisticsCache

__all__ = ["EngineConfig", "default_device"]


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested``, else CUDA when present, else CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MeasureError(f"Device {requested} was requested but CUDA is not available; use cpu.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EngineConfig:
    """How an ``Engine`` reads, computes and reports layer statistics.

    ``Engine(stores, config=EngineConfig(...))`` and ``Engine(stores, **options)`` are the same;
    ``pipeline.py measure`` builds one from its flags (``measure.cli``).

    Parameters
    ----------
    device : str or torch.device, default=None
        CUDA when present, else CPU.
    layers : list of str, optional
        Name/glob patterns selecting layers (all layers by default).
    memory_budget : int, default=1 GiB
        Bytes of float64 features held at once while building a Gram.
    undefined : {"raise", "nan"}, default="raise"
        Undefined values (constant layers...) raise, or become NaN with a warning
        (``measure.undefined``).
    progress : callable(str), optional
        Called with a short description after each unit of work.
    cache : StatisticsCache, optional
        Persistent statistics cache consulted before computing (``measure.engine.cache``).
    reduce : str, list of str or dict, optional
        Measurement-time per-layer reductions (``extract.store.reductions``):
        ``"gap"``, ``["block*=pool2"]``, ``"mean"``... applied as layers are
        read; stores are otherwise read with the reductions they record.
    mixed_reductions : bool, default=False
        Compare a layer with the same-named layer of another store even when
        their reductions differ (with a warning); refused by default.
    precision : {"auto", "float64", "float32"}, default="auto"
        How Gram products are formed (``measure.functional.gram.linear_gram``, whose docstring
        gives the error bound): float64, or float32 products of column-centred activations with
        the offsets added back in float64 (about 2× faster on CPU). ``"auto"`` takes float32 for
        stores written in float32 or float16 (``StoreInfo.dtype``) and float64 for float64 stores,
        and float64 always for the measures that need the Gram's small eigenvalues (Procrustes,
        CCA, SVCCA, linreg: ``float32_grams = False``); an explicit ``"float32"`` refuses those.
        Statistics are float64 either way.
    """

    device: str | torch.device | None = None
    layers: Sequence[str] | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    undefined: Literal["raise", "nan"] = "raise"
    progress: Callable[[str], None] | None = None
    cache: StatisticsCache | None = None
    reduce: Any = None
    mixed_reductions: bool = False
    precision: str = "auto"

    @classmethod
    def of(cls, config: EngineConfig | None, options: dict[str, Any]) -> EngineConfig:
        """``config``, or one built from keyword ``options``; both at once is an error naming the options."""
        if config is None:
            return cls(**options)
        if options:
            raise TypeError(f"Pass the engine's options either as config= or as keywords, not both; got config= "
                            f"and {', '.join(sorted(options))}.")
        return config
