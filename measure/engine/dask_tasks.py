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
from .results import PairResult
from .streaming import layer_gram

__all__ = ["compute_grams", "dask_client", "measure_on_cluster"]


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
    keys = list(dict.fromkeys(key for name, options in measures if _uses_grams(engine, name, options)
                              for key in engine.gram_keys(range(len(engine.stores)), get_measure(name))))
    n = engine.stores[0].n_samples
    hold = len(engine.stores) <= 2 or (len(keys) + 4) * 8 * n * n <= engine.memory_budget
    if not hold:  # a zoo's Grams beyond the budget go to the cache (a temporary one if none) as they arrive
        engine.ensure_cache()
    todo = stats.missing(keys, load=hold)
    if not todo:
        return 0
    args = [(str(engine.stores[key.store].path), key.layer, storage_options, budget, device,
             engine.stores[key.store].info.reductions.get(key.layer), dict(key.options)["precision"])
            for key in todo]
    if client is not None:
        from distributed import as_completed

        futures = {client.submit(_gram_task, *a, pure=False): key for a, key in zip(args, todo, strict=True)}
        for future in as_completed(futures):
            stats.provide(futures[future], future.result(), hold=hold)
            future.release()
        return len(todo)
    else:
        import dask

        tasks = [dask.delayed(_gram_task, pure=False)(*a) for a in args]
        grams = dask.compute(*tasks, scheduler=scheduler or "threads")
    for key, gram in zip(todo, grams, strict=True):
        stats.provide(key, gram, hold=hold)
    return len(todo)


def _pairs_task(paths: list[str], storage_options: dict[str, Any] | None, config: dict[str, Any],
                cache_path: str, cache_options: dict[str, Any] | None, planned: list[str], name: str,
                options: dict[str, Any], pairs: list[tuple[int, int]]) -> tuple[list[tuple[Any, dict]], list[str]]:
    """Runs on a worker: one tile of pairs, from the Grams in the statistics cache (read only).

    Returns each pair's matrix and extras, in the order of ``pairs``, and the warnings raised.
    """
    import warnings

    from extract.store import open_store

    from .cache import StatisticsCache
    from .config import EngineConfig

    stores = [open_store(p, read_only=True, storage_options=storage_options) for p in paths]
    cache = StatisticsCache(cache_path, storage_options=cache_options, read_only=True)
    engine = Engine(stores, config=EngineConfig(**config, cache=cache))
    engine.plan(planned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = engine.run([(name, options)], pairs)
    return [(r.matrix, r.extras) for r in results], [str(w.message) for w in caught]


def _groups(engine: Engine, spec: Any, options: dict[str, Any], pairs: Sequence[tuple[int, int]],
            workers: int) -> list[list[int]]:
    """Consecutive groups of stores such that two groups' prepared layers fit the memory budget."""
    from .tiles import Row, plan_budget

    stores = list(dict.fromkeys(s for pair in pairs for s in pair))
    gram = [s for i, j in pairs if engine.route(spec, options, i, j) == "gram" for s in (i, j)]
    if gram:
        layers = max(len(engine.layers[s]) for s in stores)
        row = engine._prepared_bytes(spec, options, Row(gram[0], 0))
        engine.layer_statistics.release("gram", gram[0])  # the probe's Gram: the workers read it from the cache
        transient = engine._transient_bytes(spec, options, stores)
        plan_budget(row, transient, engine.memory_budget)  # the error naming the smallest budget, as locally
        size = max(1, (engine.memory_budget - transient) // (2 * layers * row))
    else:
        size = len(stores)
    size = min(size, max(1, -(-len(stores) // (2 * workers))))  # at least two tasks per worker
    return [stores[k:k + size] for k in range(0, len(stores), size)]


def measure_on_cluster(engine: Engine, client: Any, name: str, options: dict[str, Any],
                       pairs: Sequence[tuple[int, int]], *, storage_options: dict[str, Any] | None = None,
                       planned: Sequence[str] = ()) -> list[PairResult]:
    """``engine.run([(name, options)], pairs)`` with the pairs computed on the cluster, tile by tile.

    The stores are split into consecutive groups, two of which fit the memory budget; each task takes
    the pairs between two groups (or within one) and computes them on a worker, from the Grams that
    ``compute_grams`` put in the statistics cache, with the engine's settings. The driver holds
    neither the statistics nor more than the finished results: a zoo's memory on the driver is its
    result matrices. Values equal the local run's to the tiles' round-off (``measure.engine.tiles``).
    The workers read the cache: a temporary one on the driver's disk serves a ``LocalCluster``; for a
    remote cluster the pairs are computed on the driver unless the run has a cache of its own
    (``--cache`` at a path or URL the workers reach).
    """
    import warnings

    from distributed import as_completed

    spec = get_measure(name)
    resolved = spec.resolve_options(options)
    if (engine.layer_statistics.cache is None or engine.temporary_cache) and not _is_local(client):
        return engine.run([(name, options)], pairs)  # remote workers cannot read a cache on the driver's disk
    engine.ensure_cache()
    cache = engine.layer_statistics.cache
    for store in engine.stores:
        if getattr(store, "path", None) is None:
            raise MeasureError(f"{store} has no path; dask workers can only open stores on disk or at a URL.")
    c = engine.config
    config = {"layers": c.layers, "memory_budget": c.memory_budget, "undefined": c.undefined, "reduce": c.reduce,
              "mixed_reductions": c.mixed_reductions, "precision": c.precision, "device": None}
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    groups = _groups(engine, spec, resolved, pairs, workers)
    group_of = {s: g for g, members in enumerate(groups) for s in members}
    tiles: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in pairs:
        tiles.setdefault(tuple(sorted((group_of[i], group_of[j]))), []).append((i, j))
    futures = {}
    for (a, b), tile_pairs in tiles.items():
        members = list(dict.fromkeys(groups[a] + groups[b]))
        local = {s: k for k, s in enumerate(members)}
        future = client.submit(_pairs_task, [str(engine.stores[s].path) for s in members], storage_options,
                               config, str(cache.path), cache.storage_options, list(planned), name, options,
                               [(local[i], local[j]) for i, j in tile_pairs], pure=False)
        futures[future] = tile_pairs
    done: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}
    messages: list[str] = []
    for future in as_completed(futures):
        values, caught = future.result()
        messages += caught
        for (i, j), value in zip(futures[future], values, strict=True):
            done[i, j] = value
            engine._progress(f"{name} {engine.stores[i].name} × {engine.stores[j].name}")
    for message in dict.fromkeys(messages):
        warnings.warn(message, stacklevel=2)
    return [PairResult(measure=name, options=resolved, store_a=engine.stores[i].name,
                       store_b=engine.stores[j].name, rows=list(engine.layers[i]), cols=list(engine.layers[j]),
                       matrix=done[i, j][0], spec=spec, extras=done[i, j][1]) for i, j in pairs]


def _is_local(client: Any) -> bool:
    """Whether ``client``'s cluster runs on this machine (a ``LocalCluster``)."""
    from distributed import LocalCluster

    return isinstance(getattr(client, "cluster", None), LocalCluster)
