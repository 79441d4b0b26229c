"""``LayerStatistics``: the one way the engine gets "statistic S of layer L of store K".

Every statistic a measure needs is asked for by a ``StatisticKey`` (kind, store, layer, options)
and comes from the first place that has it:

1. memory — statistics of a *held* kind stay in memory once obtained;
2. the persistent cache (``measure.engine.cache``) for the kinds it keeps, checked there;
3. computation from the store (``measure.engine.streaming``), or a value handed in by a dask
   task (``provide``); the result is counted in ``computed`` and written to the cache.

Held statistics that the cache can give back are dropped after their last use (``release``)
and reloaded if asked for again, so the Grams of a zoo are never all in memory at once. The
kinds and how each is kept:

=============  =====================================================  ====  =====  =======
kind           what                                                   held  cache  counted
=============  =====================================================  ====  =====  =======
gram           K = X Xᵀ of a layer (n × n, float64)                   yes   yes    yes
gram_blocks    Grams of consecutive batches (``batch_size`` option)   no    yes    yes
confounder     dCKA's Gram of the stored inputs                       yes   yes    no
features       the (n_samples, n_features) matrix itself              no    no     yes
self_moments   a layer's own feature-route moments (its shift, Σz,    yes   yes    yes
               ZᵀZ, the fourth-order sums; ``layer_self_moments``)
cross_moments  the cross moments of every layer pair of two stores   yes   no     yes
               (``pair_cross_moments``; the store is a pair; the
               ``terms`` option: "products" or, for the debiased
               estimator only, "fourth")
sketch         a fixed-size sketch of the centred Gram (two vectors  yes   yes    yes
               of ``sketch_size`` numbers; ``width``, ``seed``:
               ``measure.engine.sketch_streaming.layer_sketch``)
=============  =====================================================  ====  =====  =======
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from extract.store import ActivationStore

from ..functional.dcka import confounder_gram
from ..functional.gram import resolve_precision
from .cache import StatisticsCache
from .feature_streaming import layer_self_moments, pair_cross_moments
from .sketch_streaming import layer_sketch
from .streaming import layer_features, layer_gram_blocks, layer_grams

__all__ = ["KINDS", "Kind", "LayerStatistics", "StatisticKey"]

LOOKUP_THREADS = 4  # cache reads and checksums release the GIL


@dataclass(frozen=True)
class Kind:
    """How one kind of statistic is kept.

    Attributes
    ----------
    held : bool
        Kept in memory once obtained (until ``release``, when the cache can give it back).
    cached : bool
        Read from and written to the persistent cache.
    counted : bool
        A computation counts in ``LayerStatistics.computed``.
    precision_keyed : bool
        Formed with the engine's Gram precision, which is then part of its cache key.
    stacked : bool
        A list of equal-shape tensors, cached as one stacked array.
    announced : bool
        A computation is reported to the ``progress`` callback ("gram store/layer").
    """

    held: bool
    cached: bool
    counted: bool
    precision_keyed: bool = False
    stacked: bool = False
    announced: bool = False


KINDS: dict[str, Kind] = {
    "gram": Kind(held=True, cached=True, counted=True, precision_keyed=True, announced=True),
    "gram_blocks": Kind(held=False, cached=True, counted=True, precision_keyed=True, stacked=True),
    "confounder": Kind(held=True, cached=True, counted=False),
    "features": Kind(held=False, cached=False, counted=True),
    "self_moments": Kind(held=True, cached=True, counted=True, precision_keyed=True, announced=True),
    "cross_moments": Kind(held=True, cached=False, counted=True, announced=True),
    "sketch": Kind(held=True, cached=True, counted=True, announced=True),
}


@dataclass(frozen=True)
class StatisticKey:
    """Which statistic: its ``kind``, the ``store`` index (a pair of indices for ``cross_moments``),
    the ``layer`` (None: the stored inputs, or all selected layers) and the options that change it."""

    kind: str
    store: int | tuple[int, int]
    layer: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, store: int | tuple[int, int], layer: str | None = None, **options: Any) -> StatisticKey:
        if kind not in KINDS:
            raise ValueError(f"Unknown statistic kind {kind!r}; known kinds: {', '.join(KINDS)}.")
        return cls(kind, store, layer, tuple(sorted(options.items())))


class LayerStatistics:
    """Per-layer statistics of a set of stores: memory → persistent cache → compute, released after last use.

    Parameters
    ----------
    stores : list of ActivationStore
    layers : list of list of str
        The selected layers of each store (``cross_moments`` covers all of them).
    device : torch.device
    memory_budget : int
        Bytes of float64 features held at once while building a Gram.
    precision : {"auto", "float64", "float32"}
        How Gram products are formed (``measure.engine.streaming.layer_gram``) when a key does not
        say: ``"auto"`` resolves per store (``measure.functional.gram.resolve_precision``). A Gram
        key always carries its resolved precision, so Grams of both precisions can be held at once.
    cache : StatisticsCache, optional
    progress : callable(str), optional
        Called after each announced computation.

    Attributes
    ----------
    computed : int
        Statistics computed (here or by dask tasks), not loaded: the work the cache did not save.
    reused : int
        Distinct counted statistics loaded from the persistent cache (a reload after ``release`` is not
        counted again): the work the cache saved.
    inputs : dict
        ``{"computed": int, "reused": int}`` for the statistics of kinds that are not counted (dCKA's
        Gram of the stored inputs), kept apart so that ``computed`` and ``reused`` count layers only.
    """

    def __init__(self, stores: Sequence[ActivationStore], layers: Sequence[Sequence[str]], *,
                 device: torch.device, memory_budget: int, precision: str = "float64",
                 cache: StatisticsCache | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.stores = stores
        self.layers = layers
        self.device = device
        self.memory_budget = memory_budget
        self.precision = precision
        self.cache = cache
        self._progress = progress or (lambda message: None)
        self.computed = 0
        self.reused = 0
        self.inputs = {"computed": 0, "reused": 0}
        self._loaded: set[StatisticKey] = set()  # keys loaded from the cache at least once (``reused``)
        self._held: dict[StatisticKey, Any] = {}
        self._reloadable: set[StatisticKey] = set()  # held statistics the persistent cache holds too

    # ------------------------------------------------------------------ asking
    def key(self, kind: str, store: int | tuple[int, int], layer: str | None = None, **options: Any) -> StatisticKey:
        """The key of a statistic (see ``StatisticKey``); a Gram's carries its resolved ``precision``."""
        if KINDS.get(kind) is not None and KINDS[kind].precision_keyed:
            options["precision"] = resolve_precision(options.get("precision", self.precision),
                                                     self.stores[store].info.dtype)
        return StatisticKey.of(kind, store, layer, **options)

    def get(self, key: StatisticKey) -> Any:
        """The statistic ``key``: from memory, else from the cache, else computed (then cached)."""
        if key in self._held:
            return self._held[key]
        return self._obtain([key])[0][key]

    def prefetch(self, keys: Iterable[StatisticKey], load: bool = True, hold: bool = True) -> None:
        """Obtain the held statistics ``keys`` together, in order.

        The cache is consulted on several threads; what it lacks is computed in order, Grams by
        ``layer_grams``, which reads the next layer while the current one is multiplied, and
        written to the cache on a background thread. ``load=False`` only notes which ones the
        cache holds (``get`` loads them when asked). ``hold=False`` (with a cache) keeps none of
        the computed ones in memory once written, so a zoo's Grams are computed one at a time
        (``get`` reloads them): at most two are held, one being written while the next is formed.
        """
        self._obtain(keys, load=load, hold=hold)

    def missing(self, keys: Iterable[StatisticKey], load: bool = True) -> list[StatisticKey]:
        """Of ``keys``, those neither in memory nor in the cache (the others are loaded and kept, or with
        ``load=False`` only noted as in the cache, for ``get`` to load when asked).

        For work done elsewhere: the dask driver computes the missing ones as tasks and hands
        them in with ``provide``.
        """
        return self._obtain(keys, load=load, compute=False, keep=load)[1]

    def provide(self, key: StatisticKey, value: Any, hold: bool = True) -> None:
        """Use ``value``, computed elsewhere (a dask worker), as the statistic ``key``: counted, cached and
        kept (``hold=False`` with a cache: only cached, and reloaded by ``get`` when asked for)."""
        cached = self.cache is not None and KINDS[key.kind].cached
        if hold or not cached:
            self._hold(key, torch.as_tensor(value, dtype=torch.float64).to(self.device))
        self._count(key)
        if cached and self._write(key, np.asarray(value, dtype=np.float64)) and not hold:
            self._reloadable.add(key)

    def release(self, kind: str, store: int) -> None:
        """Forget the held ``kind`` statistics of ``store`` that the cache holds (``get`` reloads them)."""
        for key in [k for k in self._held if k.kind == kind and k.store == store and k in self._reloadable]:
            del self._held[key]

    def release_key(self, key: StatisticKey) -> None:
        """Forget the held statistic ``key`` when the cache holds it (``get`` reloads it)."""
        if key in self._reloadable:
            self._held.pop(key, None)

    def drop(self, key: StatisticKey) -> None:
        """Forget the held statistic ``key`` (computed again if asked for again)."""
        self._held.pop(key, None)

    def held_bytes(self, kind: str) -> int:
        """Bytes of the tensors held for statistics of ``kind``."""
        def size(value: Any) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, dict):
                return sum(size(v) for v in value.values())
            if isinstance(value, (list, tuple)):
                return sum(size(v) for v in value)
            return 0
        return sum(size(value) for key, value in self._held.items() if key.kind == kind)

    def held(self, kind: str | None = None) -> list[StatisticKey]:
        """The keys of the statistics in memory (of ``kind``, or all)."""
        return [key for key in self._held if kind is None or key.kind == kind]

    # ------------------------------------------------------------------ the one path
    def _obtain(self, keys: Iterable[StatisticKey], *, load: bool = True, compute: bool = True,
                keep: bool = False, hold: bool = True) -> tuple[dict[StatisticKey, Any], list[StatisticKey]]:
        """Memory → cache → compute for ``keys``: (the values obtained now, the keys left to compute).

        ``compute=False`` leaves the missing ones to the caller; ``keep``: what the cache gave is
        kept until the end (never released), as statistics handed in by ``provide`` are.
        """
        wanted = [key for key in dict.fromkeys(keys) if key not in self._held]
        got: dict[StatisticKey, Any] = {}
        missing = []
        for key, hit in zip(wanted, self._lookup(wanted, load), strict=True):
            if hit is None:
                missing.append(key)
                self._reloadable.discard(key)  # found earlier but gone or damaged now: reloadable once rewritten
                continue
            if KINDS[key.kind].held and not keep:
                self._reloadable.add(key)
            if load:
                got[key] = self._hold(key, self._from_array(key, hit))
                self._count_reused(key)
        if not compute:
            return got, missing
        with ThreadPoolExecutor(max_workers=1) as writer:  # cache writes overlap the next statistic's computation
            written: list[tuple[StatisticKey, Future]] = []
            for key, value in self._compute(missing):
                self._count(key)
                cached = self.cache is not None and KINDS[key.kind].cached
                if cached:
                    if not hold and written:  # one write in flight: the Grams are not piled up in memory
                        self._finish_write(*written.pop())
                    written.append((key, writer.submit(self._write, key, self._to_array(key, value))))
                if hold or not cached:
                    got[key] = self._hold(key, value)
                del value
                if KINDS[key.kind].announced:
                    self._progress(f"{key.kind} {self._describe(key)}")
            for key, future in written:
                self._finish_write(key, future)
        return got, []

    def _finish_write(self, key: StatisticKey, future: Future) -> None:
        """Wait for a cache write; a held kind is then reloadable (a failed write stops the run here)."""
        if future.result() and KINDS[key.kind].held:
            self._reloadable.add(key)


    def _lookup(self, keys: list[StatisticKey], load: bool) -> list[Any]:
        """Per key: the cached array (``load``), True when the cache holds it (not ``load``), else None."""
        if self.cache is None or not keys:
            return [None] * len(keys)

        def look(key: StatisticKey) -> Any:
            if not KINDS[key.kind].cached:
                return None
            args = (self._store(key), key.layer, key.kind, self._cache_options(key))
            # a statistic that is not held is loaded to be used now, even when only noting was asked
            if load or not KINDS[key.kind].held:
                return self.cache.get(*args)
            return self.cache.contains(*args) or None

        if len(keys) == 1:
            return [look(keys[0])]
        with ThreadPoolExecutor(max_workers=LOOKUP_THREADS) as pool:
            return list(pool.map(look, keys))

    def _compute(self, keys: list[StatisticKey]) -> Iterator[tuple[StatisticKey, Any]]:
        """(key, value) for each of ``keys`` in order; consecutive Grams read ahead (``layer_grams``)."""
        for (kind, precision), group in itertools.groupby(keys, key=lambda k: (k.kind, _precision(k))):
            group = list(group)
            if kind == "gram":
                jobs = [(self._store(k), k.layer) for k in group]
                yield from zip(group, layer_grams(jobs, self.device, self.memory_budget, precision), strict=True)
            else:
                for key in group:
                    yield key, self._compute_one(key)

    def _compute_one(self, key: StatisticKey) -> Any:
        if key.kind == "gram_blocks":
            batch_size = dict(key.options)["batch_size"]
            return layer_gram_blocks(self._store(key), key.layer, batch_size, self.device, _precision(key))
        if key.kind == "confounder":
            return confounder_gram(layer_features(self._store(key), None, self.device))
        if key.kind == "features":
            return layer_features(self._store(key), key.layer, self.device)
        if key.kind == "self_moments":
            return layer_self_moments(self._store(key), key.layer, self.device, _precision(key), self.memory_budget)
        if key.kind == "sketch":
            options = dict(key.options)
            return layer_sketch(self._store(key), key.layer, self.device, self.memory_budget,
                                options["sketch_size"], options["width"], options["seed"])
        if key.kind == "cross_moments":
            pair, options = key.store, dict(key.options)
            precisions = options["precisions"]
            selfs = tuple([self.get(self.key("self_moments", s, layer, precision=p)) for layer in self.layers[s]]
                          for s, p in zip(pair, precisions, strict=True))
            return pair_cross_moments(tuple(self.stores[s] for s in pair), tuple(self.layers[s] for s in pair),
                                      selfs, precisions, self.device, self.memory_budget, options["terms"])
        raise ValueError(f"Statistics of kind {key.kind!r} are computed by layer_grams, not one by one.")

    # ------------------------------------------------------------------ helpers
    def _store(self, key: StatisticKey) -> ActivationStore:
        return self.stores[key.store]

    def _describe(self, key: StatisticKey) -> str:
        if key.kind == "cross_moments":
            return "/".join(self.stores[s].name for s in key.store)
        return f"{self._store(key).name}/{key.layer}"

    def _cache_options(self, key: StatisticKey) -> dict[str, Any] | None:
        """The options keyed in the persistent cache: the statistic's own, then the Gram precision
        (float64 Grams are keyed without one)."""
        options = {k: v for k, v in key.options if k != "precision"}
        if KINDS[key.kind].precision_keyed and _precision(key) != "float64":
            options["precision"] = _precision(key)
        return options or None

    def _hold(self, key: StatisticKey, value: Any) -> Any:
        if KINDS[key.kind].held:
            self._held[key] = value
        return value

    def _count(self, key: StatisticKey) -> None:
        if KINDS[key.kind].counted:
            self.computed += 1
        else:
            self.inputs["computed"] += 1

    def _count_reused(self, key: StatisticKey) -> None:
        if key in self._loaded:
            return
        self._loaded.add(key)
        if KINDS[key.kind].counted:
            self.reused += 1
        else:
            self.inputs["reused"] += 1

    def _write(self, key: StatisticKey, array: np.ndarray) -> bool:
        return self.cache.put(self._store(key), key.layer, array, key.kind, self._cache_options(key))

    def _to_array(self, key: StatisticKey, value: Any) -> np.ndarray:
        stacked = torch.stack(value) if KINDS[key.kind].stacked else value
        return stacked.detach().to("cpu", torch.float64).numpy()

    def _from_array(self, key: StatisticKey, array: np.ndarray) -> Any:
        value = torch.from_numpy(array).to(self.device)
        return list(value) if KINDS[key.kind].stacked else value


def _precision(key: StatisticKey) -> str:
    """The Gram precision a key carries ("float64" for kinds that have none)."""
    return dict(key.options).get("precision", "float64")
