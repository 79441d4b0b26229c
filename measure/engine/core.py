"""The measure engine: labelled layer × layer matrices for pairs of stores.

For each store and layer the engine obtains the statistic a measure needs
(usually the n × n Gram) once, through ``LayerStatistics`` (memory, then the
persistent cache, then the store), turns it into the measure's per-layer object
once, and reuses it for every pair and every measure that needs it. A pair's
matrix is then one cheap reduction (for kernel measures, one matrix product)
copied to the host once. Stores are read-only and streamed chunk by chunk
(``measure.engine.streaming``); the engine never imports hooks, and the in-memory
API feeds it ``MemoryStore``s.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.globs import matches
from extract.store import ActivationStore, StoreError
from extract.store.reductions import check_reductions, reduce_store

from ..accumulators.cka import choose_route
from ..errors import MeasureError
from ..functional._bilinear import Prepared, PreparedLayers, SharedProducts
from ..functional.gram import PRECISION_CHOICES, resolve_precision
from ..functional.moments import cka_from_moments, pair_moments, unpack_self_moments
from ..registry import get_measure
from ..undefined import undefined_value
from ..validation import check_min_samples
from .config import EngineConfig, default_device
from .layer_statistics import LayerStatistics
from .results import PairResult
from .sketch_streaming import sketch_working_bytes
from .streaming import layer_widths
from .tiles import Row, plan_budget, prepared_bytes, tiled_pair_matrices

__all__ = ["Engine", "EngineConfig", "PairResult", "check_comparable", "default_device", "select_layers"]


def check_comparable(a: ActivationStore, b: ActivationStore) -> None:
    """Raise unless both stores are complete and hold the same samples in the same order."""
    for store in (a, b):
        store.require_complete()
    ia, ib = a.info, b.info
    if ia.n_samples != ib.n_samples or ia.fingerprint != ib.fingerprint:
        raise StoreError(
            f"{a} and {b} were not extracted from the same data ({ia.n_samples} vs {ib.n_samples} samples, "
            f"fingerprints {ia.fingerprint[:23]}… vs {ib.fingerprint[:23]}…); similarity needs the same "
            "inputs in the same order. Re-extract both with the same --data."
        )


def select_layers(store: ActivationStore, patterns: Sequence[str] | None) -> list[str]:
    """Layers of ``store`` matching any of ``patterns`` (names or globs), in capture order."""
    layers = store.layers
    if not patterns:
        return layers
    chosen = [layer for layer in layers if any(matches(p, layer) for p in patterns)]
    if not chosen:
        raise MeasureError(f"--layers {list(patterns)} match no layer of {store}; its layers are {layers}.")
    return chosen


def check_layer_patterns(stores: Sequence[ActivationStore], patterns: Sequence[str] | None) -> None:
    """Raise when a pattern of ``patterns`` matches no layer of any store (a typo, not a choice).

    A pattern may match layers of only some stores (a zoo of several architectures), but one that matches
    nothing anywhere is refused, naming it and listing the layers that exist, as ``extract`` refuses it.
    """
    if not patterns:
        return
    unmatched = [p for p in patterns if not any(matches(p, layer) for s in stores for layer in s.layers)]
    if unmatched:
        existing = list(dict.fromkeys(layer for s in stores for layer in s.layers))
        shown = ", ".join(existing[:40]) + (f", ... ({len(existing)} in all)" if len(existing) > 40 else "")
        raise MeasureError(f"--layers pattern(s) {', '.join(map(repr, unmatched))} match no layer of any store; "
                           f"the layers are: {shown}. Fix or drop the pattern (names or globs such as 'block*').")


class Engine:
    """Obtains per-layer statistics of a set of stores once, then pairs them under each measure.

    Parameters
    ----------
    stores : list of ActivationStore
        Complete stores of the same data.
    config : EngineConfig, optional
        The options (device, layers, memory budget, undefined-value policy, progress callback,
        statistics cache, reductions, precision).
    **options
        The same options as keywords (``Engine(stores, device="cpu", undefined="nan")``),
        instead of ``config``.

    Attributes
    ----------
    stores : list of ActivationStore
        The stores, with the measurement-time reductions applied.
    layers : list of list of str
        The selected layers of each store.
    layer_statistics : LayerStatistics
        Where every statistic comes from (memory, the cache, or the store).
    statistics_computed : int
        Statistics computed so far (not loaded from the cache).
    """

    def __init__(self, stores: Sequence[ActivationStore], *, config: EngineConfig | None = None,
                 **options: Any) -> None:
        config = EngineConfig.of(config, options)
        if config.precision not in PRECISION_CHOICES:
            raise MeasureError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got "
                               f"{config.precision!r}.")
        if not stores:
            raise MeasureError("No stores to measure; pass at least one store.")
        self.config = config
        self.stores = [reduce_store(s, config.reduce) for s in stores]
        for other in self.stores[1:]:
            check_comparable(self.stores[0], other)
        self.stores[0].require_complete()
        self.device = default_device(config.device)
        check_layer_patterns(self.stores, config.layers)
        self.layers = [select_layers(s, config.layers) for s in self.stores]
        self.mixed_reductions = check_reductions(self.stores, self.layers, allow_mixed=config.mixed_reductions)
        for message in self.mixed_reductions:
            warnings.warn(message + " (compared anyway: --mixed-reductions).", stacklevel=2)
        self._progress = config.progress or (lambda message: None)
        self._planned: dict[str, Any] = {}  # measures of this engine's runs, by name (``plan``)
        self._spill: tempfile.TemporaryDirectory | None = None  # a temporary statistics cache (``ensure_cache``)
        self._reported: set[Row] = set()
        self._row_extras: dict[Row, dict[str, Any]] = {}
        self._zoo = False  # whether the current run compares more than two stores (``run``)
        self.layer_statistics = LayerStatistics(self.stores, self.layers, device=self.device,
                                                memory_budget=config.memory_budget, precision=config.precision,
                                                cache=config.cache, progress=self._progress)

    precision = property(lambda self: self.config.precision,
                         doc='How Gram products are formed: "auto", "float64" or "float32" (``gram_precision``).')
    memory_budget = property(lambda self: self.config.memory_budget, doc="Bytes of features held at once.")
    undefined = property(lambda self: self.config.undefined, doc='"raise" or "nan" for undefined values.')
    cache = property(lambda self: self.config.cache, doc="The persistent StatisticsCache, or None.")

    @property
    def statistics_computed(self) -> int:
        """Per-layer statistics computed so far (for tests and reports); loaded ones are not counted."""
        return self.layer_statistics.computed

    # ------------------------------------------------------------------ statistics
    def gram(self, s: int, layer: str, spec: Any = None) -> torch.Tensor:
        """The Gram K = X Xᵀ of ``layer`` of store ``s``, in the precision ``spec`` gets (``gram_precision``)."""
        return self.layer_statistics.get(self.layer_statistics.key("gram", s, layer,
                                                                   precision=self.gram_precision(spec, s)))

    def gram_precision(self, spec: Any, s: int) -> str:
        """The precision of the Grams of store ``s`` for measure ``spec`` (None: a kernel measure).

        The engine's ``precision``, where ``"auto"`` is float32 for a store written in float32 or
        float16 and float64 otherwise, and float64 for measures that need it (``float32_grams``).
        """
        float32_grams = True if spec is None else bool(spec.float32_grams)
        return resolve_precision(self.precision, self.stores[s].info.dtype, float32_grams)

    def gram_keys(self, stores: Iterable[int], spec: Any = None) -> list[Any]:
        """The keys of the Grams of every selected layer of ``stores``, for measure ``spec``."""
        return [self.layer_statistics.key("gram", s, layer, precision=self.gram_precision(spec, s))
                for s in stores for layer in self.layers[s]]

    def statistic(self, spec: Any, s: int, layer: str, options: dict[str, Any]) -> Any:
        """The per-layer statistic ``spec`` needs (Gram, per-batch Grams or features) of ``layer`` of store ``s``."""
        stats = self.layer_statistics
        if spec.statistic == "gram_blocks":
            return stats.get(stats.key("gram_blocks", s, layer, batch_size=options["batch_size"],
                                       precision=self.gram_precision(spec, s)))
        if spec.statistic == "gram":
            return stats.get(stats.key("gram", s, layer, precision=self.gram_precision(spec, s)))
        if spec.statistic == "sketch":
            return stats.get(self.sketch_key(s, layer, options))
        return stats.get(stats.key(spec.statistic, s, layer))

    def sketch_key(self, s: int, layer: str, options: dict[str, Any]) -> Any:
        """The key of the sketch statistic of ``layer`` of store ``s``: its size, width and seed are in it."""
        return self.layer_statistics.key("sketch", s, layer, sketch_size=options["sketch_size"],
                                         width=options["width"], seed=options["seed"])

    def confounder(self) -> torch.Tensor:
        """dCKA's confounder: the Gram of the inputs of the first store that holds them."""
        holder = next((s for s, store in enumerate(self.stores) if store.info.inputs_stored), None)
        if holder is None:
            raise MeasureError(
                "dcka needs the inputs as its confounder, but none of the stores holds them; "
                "re-extract one store without --no-inputs."
            )
        return self.layer_statistics.get(self.layer_statistics.key("confounder", holder))

    def check_precision(self, spec: Any) -> None:
        """Refuse a measure that needs float64 Grams when float32 Grams were asked for explicitly
        (``"auto"`` gives such measures float64 Grams)."""
        if self.precision == "float32" and spec.statistic != "features" and not spec.float32_grams:
            raise MeasureError(
                f"{spec.name} needs float64 Gram products: it uses the Gram's small eigenvalues, which "
                f"precision={self.precision!r} does not resolve. Measure it with --precision float64 "
                "(or auto, the default)."
            )

    # ------------------------------------------------------------------ prepared layers
    def prepared(self, spec: Any, options: dict[str, Any], s: int,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Any]:
        """The measure's per-layer objects for every selected layer of store ``s`` (``out``: see PreparedLayers)."""
        self._check_batch_size(spec, options, s)
        confounder = self.confounder() if spec.needs_confounder else None
        items = []
        for layer in self.layers[s]:
            p = spec.prepare(self.statistic(spec, s, layer, options), confounder=confounder, **options)
            if not getattr(p, "defined", True):
                self._undefined(spec, s, layer, p.reason, stacklevel=2)
            items.append(p)
        return PreparedLayers(items, out=out)  # stacked once: each pair is then a matrix product, no copies

    def _check_batch_size(self, spec: Any, options: dict[str, Any], s: int) -> None:
        if spec.statistic == "gram_blocks":
            b = options["batch_size"]
            n = self.stores[s].n_samples
            if not (isinstance(b, int) and 4 <= b <= n):
                raise MeasureError(f"batch_size must be an integer between 4 and {n}, got {b!r}.")

    def prepare_together(self, spec: Any, options: dict[str, Any],
                         stores: Sequence[int], release: bool = False) -> dict[int, list[Any]]:
        """``prepared`` of each store, stacked into one ``SharedProducts`` multiplied once when the
        measure is bilinear (``Prepared`` items): every pair of these stores is then a slice of it.

        ``release``: forget each store's cached Grams once it is prepared (``LayerStatistics.release``),
        so the Grams of a zoo are not all held at once.
        """
        out: dict[int, list[Any]] = {}
        group: SharedProducts | None = None
        total = sum(len(self.layers[s]) for s in stores)
        for s in stores:
            if spec.statistic == "gram":  # this store's Grams (the cached ones are loaded now, together)
                self.layer_statistics.prefetch(self.gram_keys([s], spec))
            layers = self.prepared(spec, options, s, out=group.block(len(self.layers[s])) if group else None)
            if release:
                self.layer_statistics.release("gram", s)
            if spec.statistic == "sketch":  # a zoo's sketches are not all held: reloaded from the cache
                self.layer_statistics.release("sketch", s)
            if group is None and len(stores) > 1 and layers.stacked:
                group = SharedProducts(total, layers)  # the first store, restacked into the group's rows
                layers = PreparedLayers(list(layers), out=group.block(len(layers)))
            if group is not None:
                group.add(layers)
            out[s] = layers
        if group is not None:
            group.compute()
        return out

    def _undefined(self, spec: Any, s: int, layer: str, reason: str, stacklevel: int) -> None:
        """The engine's undefined-value policy for ``layer`` of store ``s`` (``measure.undefined``)."""
        undefined_value(spec.name, f"layer {layer!r} of {self.stores[s]}", reason, self.undefined,
                        stacklevel=stacklevel + 1)

    # ------------------------------------------------------------------ feature route
    def route(self, spec: Any, options: dict[str, Any], i: int, j: int) -> str:
        """"gram" or "features" for ``spec`` on stores (i, j): the ``route`` option, "auto" by ``choose_route``."""
        if not spec.feature_route:
            return "gram"
        widths = [layer_widths(self.stores[s], self.layers[s]) for s in (i, j)]
        grams_formed = any(other.statistic == "gram" and not other.feature_route
                           and all(self.gram_precision(other, s) == self.gram_precision(spec, s) for s in (i, j))
                           for other in self._planned.values())
        return choose_route(options.get("route", "auto"), self.stores[i].n_samples, *widths, grams_formed)

    def plan(self, measures: Iterable[str]) -> None:
        """Note the measures this engine's runs will compute (``run`` notes its own): linear CKA's ``auto``
        route takes the Grams when another planned measure forms the same Grams anyway."""
        self._planned.update((name, get_measure(name)) for name in measures)

    def _feature_matrix(self, spec: Any, i: int, j: int) -> np.ndarray:
        """The L_i × L_j matrix of a feature-route measure, from each layer's own moments (once per run,
        cached like Grams) and the pair's cross products (once per run, shared by both estimators; the
        debiased one adds the cheap fourth-order cross terms).

        The precision is each store's Gram precision (``"auto"``: float32 products for float32 stores);
        the cross products are float32 when both stores' are.
        """
        if spec.feature_route == "cka_debiased":
            check_min_samples(self.stores[i].n_samples, 4, spec.name, "unbiased HSIC")
        stats = self.layer_statistics
        precisions = tuple(self.gram_precision(spec, s) for s in (i, j))
        selfs = [[unpack_self_moments(stats.get(stats.key("self_moments", s, layer, precision=p)))[1]
                  for layer in self.layers[s]] for s, p in zip((i, j), precisions, strict=True)]
        debiased = spec.feature_route == "cka_debiased"
        cross = {}
        for terms in ("products", "fourth") if debiased else ("products",):
            key = stats.key("cross_moments", (i, j), precisions=precisions, terms=terms)
            cross.update(stats.get(key))
            if self._zoo and (terms == "fourth" or stats.held_bytes("cross_moments") > self.memory_budget // 4):
                stats.drop(key)  # kept for the other estimator of the run only while a quarter of the budget holds them
        moments = pair_moments(self.stores[i].n_samples, *selfs, cross, same=i == j)
        out = cka_from_moments(moments, *(layer_widths(self.stores[s], self.layers[s]) for s in (i, j)),
                               debiased=debiased)
        bad_rows, bad_cols = out[f"{spec.feature_route}_undefined"]
        for s, bad in ((i, bad_rows), (j, bad_cols)):
            for k in bad:
                self._undefined(spec, s, self.layers[s][k],
                                "its self-HSIC is zero (a constant layer) or negative", stacklevel=4)
        return out[spec.feature_route].detach().to("cpu", torch.float64).numpy()

    # ------------------------------------------------------------------ pairs
    def run(self, measures: Iterable[tuple[str, dict[str, Any]]],
            pairs: Sequence[tuple[int, int]], release: bool = True) -> list[PairResult]:
        """Every measure on every pair (i, j) of store indices.

        ``release``: after the last measure that uses Grams, forget the ones the persistent cache
        holds (``LayerStatistics.release``); pass False when a later ``run`` of this engine needs them again.
        """
        results = []
        measures = [(get_measure(name), given) for name, given in measures]
        self.plan(spec.name for spec, _ in measures)
        for spec, _ in measures:
            self.check_precision(spec)
        last_gram = max((k for k, (spec, _) in enumerate(measures) if spec.statistic == "gram"), default=-1)
        # a zoo (more than two stores) holds its statistics within the budget; a single pair holds its own
        self._zoo = len({s for pair in pairs for s in pair}) > 2
        for index, (spec, given) in enumerate(measures):
            options = spec.resolve_options(given)
            if self._zoo and spec.feature_route != "cka_debiased":  # the only measure that reuses them
                for key in self.layer_statistics.held("cross_moments"):
                    self.layer_statistics.drop(key)
            kernel_stores = list(dict.fromkeys(s for i, j in pairs if self.route(spec, options, i, j) == "gram"
                                               for s in (i, j)))
            rows = [Row(s, k) for s in kernel_stores for k in range(len(self.layers[s]))] if self._zoo else []
            # a zoo is measured untiled when its statistics and prepared layers fit the budget together
            # (a prepared layer takes at most two statistics' worth); otherwise in tiles, its statistics
            # written to the cache (a temporary one if the run has none) and held one at a time
            statistic = self._statistic_bytes(spec, options, kernel_stores)
            untiled = not rows or self._fits(spec, options, rows, 3 * statistic)
            if not untiled:
                self.ensure_cache()
            if spec.statistic == "gram":  # every missing Gram, computed in the order used (read ahead); the
                # cached ones are loaded store by store as they are prepared, and after the last measure
                # that needs them released again, so a zoo's Grams are never all held at once
                self.layer_statistics.prefetch(self.gram_keys(kernel_stores, spec), load=False, hold=untiled)
            if not untiled:
                results += self._tiled(spec, options, rows, pairs)
                continue
            prepared = self.prepare_together(spec, options, kernel_stores, release=release and index == last_gram)
            results += [self._pair(spec, options, prepared, i, j) for i, j in pairs]
            del prepared
        return results

    # ------------------------------------------------------------------ tiles (zoos beyond the budget)
    def _transient_bytes(self, spec: Any, options: dict[str, Any], stores: Sequence[int]) -> int:
        """Memory taken while one layer is prepared: its statistic, the kernel's temporaries and the
        prepared layer before it joins its block (four statistics' worth); for a sketch, also the
        hashed features held while one layer is sketched (``sketch_working_bytes``); for dCKA, also its
        confounder Gram, held for the run."""
        if spec.statistic == "sketch":
            n = self.stores[0].n_samples
            widths = [w for s in stores for w in layer_widths(self.stores[s], self.layers[s])] or [0]
            return 4 * self._statistic_bytes(spec, options, stores) + sketch_working_bytes(n, max(widths),
                                                                                           options["width"])
        return (4 + bool(spec.needs_confounder)) * self._statistic_bytes(spec, options, stores)

    def _statistic_bytes(self, spec: Any, options: dict[str, Any], stores: Sequence[int]) -> int:
        """The largest per-layer statistic of ``spec`` over ``stores``, in float64 bytes."""
        n = self.stores[0].n_samples
        if spec.statistic == "gram":
            return 8 * n * n
        if spec.statistic == "gram_blocks":
            return 8 * n * int(options["batch_size"])
        if spec.statistic == "sketch":  # two vectors of sketch_size + 1 (what sketching takes: _transient_bytes)
            return 16 * (int(options["sketch_size"]) + 1)
        widths = [w for s in stores for w in layer_widths(self.stores[s], self.layers[s])] or [0]
        return 8 * n * max(widths)

    def _prepared_bytes(self, spec: Any, options: dict[str, Any], row: Row) -> int:
        """Bytes of one prepared layer (the first row's, measured; at least its statistic's for the
        measures whose prepared size varies from layer to layer)."""
        item = self._prepare_row(spec, options, row, report=False)
        if isinstance(item, Prepared):
            return prepared_bytes(item)  # every layer's vectors have one length
        return max(prepared_bytes(item), self._statistic_bytes(spec, options, [row.s]))

    def _fits(self, spec: Any, options: dict[str, Any], rows: Sequence[Row], row_bytes: int) -> bool:
        """Whether ``rows`` of ``row_bytes`` each, plus the transient memory, fit the memory budget."""
        stores = list(dict.fromkeys(row.s for row in rows))
        return len(rows) * row_bytes + self._transient_bytes(spec, options, stores) <= self.memory_budget

    @property
    def temporary_cache(self) -> bool:
        """Whether the statistics cache is a temporary one of this engine (``ensure_cache``)."""
        return self._spill is not None

    def ensure_cache(self) -> None:
        """A cache to reload statistics from: the configured one, else a temporary one removed with the engine."""
        if self.layer_statistics.cache is not None:
            return
        from .cache import StatisticsCache

        self._spill = tempfile.TemporaryDirectory(prefix="simtorch-statistics-")
        self.layer_statistics.cache = StatisticsCache(Path(self._spill.name) / "cache.zarr")

    def _prepare_row(self, spec: Any, options: dict[str, Any], row: Row, report: bool = True) -> Any:
        """The measure's per-layer object of ``row``; its statistic is released again when the cache holds it."""
        layer = self.layers[row.s][row.k]
        self._check_batch_size(spec, options, row.s)
        confounder = self.confounder() if spec.needs_confounder else None
        key = None
        if spec.statistic == "gram":
            key = self.layer_statistics.key("gram", row.s, layer, precision=self.gram_precision(spec, row.s))
        item = spec.prepare(self.statistic(spec, row.s, layer, options), confounder=confounder, **options)
        if spec.statistic == "sketch":
            key = self.sketch_key(row.s, layer, options)
        if key is not None and report:  # (the probe of ``_prepared_bytes`` keeps it for the untiled run)
            self.layer_statistics.release_key(key)
        if report and not getattr(item, "defined", True) and row not in self._reported:
            self._reported.add(row)
            self._undefined(spec, row.s, layer, item.reason, stacklevel=4)
        if report and getattr(item, "extras", None):
            self._row_extras[row] = dict(item.extras)
        return item

    def _tiled(self, spec: Any, options: dict[str, Any], rows: list[Row],
               pairs: Sequence[tuple[int, int]]) -> list[PairResult]:
        """Every pair of ``pairs`` from tiles of the all-pairs products (``measure.engine.tiles``)."""
        stores = list(dict.fromkeys(row.s for row in rows))
        block = plan_budget(self._prepared_bytes(spec, options, rows[0]),
                            self._transient_bytes(spec, options, stores), self.memory_budget)
        self._reported, self._row_extras = set(), {}
        matrices = tiled_pair_matrices(rows, lambda row: self._prepare_row(spec, options, row), spec.pair_matrix,
                                       pairs, [len(layers) for layers in self.layers], block, self._progress)
        results = []
        for i, j in pairs:
            if self.route(spec, options, i, j) == "features":
                results.append(self._pair(spec, options, {}, i, j))
                continue
            extras: dict[str, Any] = {}
            for side, s in (("rows", i), ("cols", j)):
                per_layer = {layer: self._row_extras[Row(s, k)] for k, layer in enumerate(self.layers[s])
                             if Row(s, k) in self._row_extras}
                if per_layer:
                    extras[side] = per_layer
            if getattr(spec, "approximate", False):
                extras["approximate"] = spec.approximation(options)
            results.append(PairResult(measure=spec.name, options=options, store_a=self.stores[i].name,
                                      store_b=self.stores[j].name, rows=list(self.layers[i]),
                                      cols=list(self.layers[j]), matrix=matrices[i, j], spec=spec, extras=extras))
            self._progress(f"{spec.name} {self.stores[i].name} × {self.stores[j].name}")
        return results

    def _pair(self, spec: Any, options: dict[str, Any], prepared: dict[int, list[Any]], i: int, j: int) -> PairResult:
        """The result of ``spec`` on stores (i, j), from their prepared layers or the feature route."""
        if self.route(spec, options, i, j) == "features":
            matrix, extras = self._feature_matrix(spec, i, j), {"route": "features"}
        else:
            matrix = spec.pair_matrix(prepared[i], prepared[j]).detach().to("cpu", torch.float64).numpy()
            extras = _extras(prepared[i], prepared[j], self.layers[i], self.layers[j])
            if getattr(spec, "approximate", False):
                extras["approximate"] = spec.approximation(options)
        result = PairResult(
            measure=spec.name, options=options, store_a=self.stores[i].name, store_b=self.stores[j].name,
            rows=list(self.layers[i]), cols=list(self.layers[j]), matrix=matrix, spec=spec, extras=extras,
        )
        self._progress(f"{spec.name} {self.stores[i].name} × {self.stores[j].name}")
        return result


def _extras(rows: list[Any], cols: list[Any], row_names: list[str], col_names: list[str]) -> dict[str, Any]:
    """Per-layer by-products (e.g. dCKA's variance explained by the input) keyed by side and layer."""
    out: dict[str, Any] = {}
    for side, items, names in (("rows", rows, row_names), ("cols", cols, col_names)):
        per_layer = {name: dict(p.extras) for name, p in zip(names, items, strict=True) if getattr(p, "extras", None)}
        if per_layer:
            out[side] = per_layer
    return out
