"""Per-layer statistics as dask tasks: a threaded local scheduler or a ``dask.distributed`` cluster.

The expensive part of a measure run is one statistic per (store, layer) — for
the Gram route K = X Xᵀ, O(n² p) — and the pairs are cheap reductions over
those statistics. ``compute_grams`` asks the engine's ``LayerStatistics`` which
Grams it will need that neither memory nor the persistent cache holds, and turns
each into one task ``_gram_task(path, layer, ...)``: the task opens the store *by
path or URL on the worker*, chooses its device there (CUDA when the worker has
one), streams the layer with the same ``layer_gram`` the local path uses, and
returns the float64 Gram as a NumPy array. The driver hands the Grams back to
``LayerStatistics.provide`` (which counts them and writes them to the cache, so
there is a single writer), and the pairs are reduced locally exactly as without
dask, so results are identical.

Schedulers: ``scheduler="threads"`` (dask's local threaded scheduler),
``workers=N`` (a ``LocalCluster`` of N single-threaded worker processes
started and stopped here), or ``scheduler="tcp://host:port"`` (an existing
cluster; its workers must be able to import simtorch and read the stores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from extract.dask_jobs import dask_client

from ..errors import MeasureError
from ..registry import get_measure
from .config import default_device
from .core import Engine
from .streaming import layer_gram

__all__ = ["compute_grams", "dask_client"]


def _gram_task(path: str, layer: str, storage_options: dict[str, Any] | None, memory_budget: int,
               device: str | None, reduction: str | None = None, precision: str = "float64") -> np.ndarray:
    """Runs on a worker: open the store by path/URL, pick the worker's device, return K = X Xᵀ (float64).

    ``reduction`` is the layer's effective reduction in the driver's engine (``extract.store.reductions``).
    """
    from extract.store import open_store
    from extract.store.reductions import reduce_store

    store = open_store(path, read_only=True, storage_options=storage_options)
    if reduction is not None:
        store = reduce_store(store, {layer: reduction})
    gram = layer_gram(store, layer, default_device(device), memory_budget, precision)
    return gram.to("cpu").numpy()


def _uses_grams(engine: Engine, name: str, options: dict[str, Any]) -> bool:
    """Whether measure ``name`` reads per-layer Grams for some pair (not only the feature route)."""
    spec = get_measure(name)
    if spec.statistic != "gram":
        return False
    if not getattr(spec, "feature_route", None):
        return True
    resolved = spec.resolve_options(options)
    n = len(engine.stores)
    return any(engine.route(spec, resolved, i, j) == "gram" for i in range(n) for j in range(n))


def compute_grams(engine: Engine, measures: Sequence[tuple[str, dict[str, Any]]], *, client: Any = None,
                  scheduler: str | None = "threads", storage_options: dict[str, Any] | None = None,
                  device: str | None = None, memory_budget: int | None = None) -> int:
    """Compute, as dask tasks, every Gram of ``engine``'s stores that ``measures`` need; returns the task count.

    Grams already in the engine or in its persistent cache are not recomputed (the cached ones are
    loaded and kept for the run, as the task results are).
    Each store must have a ``path`` (a ``ZarrStore``) so that workers can open it.
    ``device`` is passed to the workers (None: each worker picks CUDA when it has it).
    """
    if not any(_uses_grams(engine, name, options) for name, options in measures):
        return 0
    budget = engine.memory_budget if memory_budget is None else memory_budget
    for store in engine.stores:
        if getattr(store, "path", None) is None:
            raise MeasureError(f"{store} has no path; dask workers can only open stores on disk or at a URL.")
    stats = engine.layer_statistics
    todo = stats.missing(key for name, options in measures if _uses_grams(engine, name, options)
                         for key in engine.gram_keys(range(len(engine.stores)), get_measure(name)))
    if not todo:
        return 0
    args = [(str(engine.stores[key.store].path), key.layer, storage_options, budget, device,
             engine.stores[key.store].info.reductions.get(key.layer), dict(key.options)["precision"])
            for key in todo]
    if client is not None:
        futures = [client.submit(_gram_task, *a, pure=False) for a in args]
        grams = client.gather(futures)
    else:
        import dask

        tasks = [dask.delayed(_gram_task, pure=False)(*a) for a in args]
        grams = dask.compute(*tasks, scheduler=scheduler or "threads")
    for key, gram in zip(todo, grams, strict=True):
        stats.provide(key, gram)
    return len(todo)
