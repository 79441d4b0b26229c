"""The measure engine: labelled layer × layer matrices for pairs of stores.

For each store and layer the engine computes the statistic a measure needs
(usually the n × n Gram) once, turns it into the measure's per-layer object
once, and reuses it for every pair and every measure that needs it. A pair's
matrix is then one cheap reduction (for kernel measures, one matrix product)
copied to the host once. Stores are read-only and streamed chunk by chunk
(``measure.statistics``); the engine never imports hooks, and the in-memory
API feeds it ``MemoryStore``s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from extract.hooks import _glob_regex
from extract.reductions import check_reductions, reduce_store
from extract.store import ActivationStore, StoreError

from ._checks import MeasureError
from .accumulators.cka import choose_route
from .cache import StatisticsCache
from .functional._bilinear import PreparedLayers, SharedProducts
from .functional.dcka import confounder_gram
from .functional.gram import PRECISIONS
from .registry import MeasureSpec, get_measure
from .statistics import (
    DEFAULT_MEMORY_BUDGET,
    layer_features,
    layer_gram_blocks,
    layer_grams,
    layer_moments,
    layer_widths,
)

__all__ = ["Engine", "PairResult", "check_comparable", "default_device", "select_layers"]


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested``, else CUDA when present, else CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MeasureError(f"Device {requested} was requested but CUDA is not available; use cpu.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PairResult:
    """One measure on one (ordered) pair of stores."""

    measure: str
    options: dict[str, Any]
    store_a: str
    store_b: str
    rows: list[str]
    cols: list[str]
    matrix: np.ndarray
    spec: MeasureSpec
    extras: dict[str, Any] = field(default_factory=dict)
    # permutation p-values / bootstrap bounds (matrices shaped like ``matrix``) and how they were made (measure.stats)
    statistics: dict[str, Any] = field(default_factory=dict)

    def best_matches(self) -> list[tuple[str, str, float]]:
        """For each row layer, the most similar column layer (smallest value for distances)."""
        pick = np.nanargmin if self.spec.kind == "distance" else np.nanargmax
        out = []
        for i, row in enumerate(self.rows):
            values = self.matrix[i]
            if np.all(np.isnan(values)):
                out.append((row, "", float("nan")))
            else:
                j = int(pick(values))
                out.append((row, self.cols[j], float(values[j])))
        return out


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
    chosen = [layer for layer in layers if any(layer == p or _glob_regex(p).fullmatch(layer) for p in patterns)]
    if not chosen:
        raise MeasureError(f"--layers {list(patterns)} match no layer of {store}; its layers are {layers}.")
    return chosen


class Engine:
    """Computes and caches per-layer statistics of a set of stores, then pairs them.

    Parameters
    ----------
    stores : list of ActivationStore
        Complete stores of the same data.
    device : str or torch.device, default=None
        CUDA when present, else CPU.
    layers : list of str, optional
        Name/glob patterns selecting layers (all layers by default).
    memory_budget : int
        Bytes of float64 features held at once while building a Gram.
    undefined : {"raise", "nan"}, default="raise"
        Undefined values (constant layers...) raise, or become NaN with a warning.
    progress : callable(str), optional
        Called with a short description after each unit of work.
    reduce : str, list of str or dict, optional
        Measurement-time per-layer reductions (``extract.reductions``):
        ``"gap"``, ``["block*=pool2"]``, ``"mean"``... applied as layers are
        read; stores are otherwise read with the reductions they record.
    mixed_reductions : bool, default=False
        Compare a layer with the same-named layer of another store even when
        their reductions differ (with a warning); refused by default.
    precision : {"float64", "float32"}, default="float64"
        How Gram products are formed (``measure.functional.gram.linear_gram``):
        float64, or float32 products of column-centred activations with the
        offsets added back in float64 (about 2× faster on CPU). Statistics are
        float64 either way. Measures that need the Gram's small eigenvalues
        (Procrustes, CCA, SVCCA, linreg) refuse float32.
    """

    def __init__(
        self,
        stores: Sequence[ActivationStore],
        *,
        device: str | torch.device | None = None,
        layers: Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        undefined: Literal["raise", "nan"] = "raise",
        progress: Callable[[str], None] | None = None,
        cache: StatisticsCache | None = None,
        reduce: Any = None,
        mixed_reductions: bool = False,
        precision: str = "float64",
    ) -> None:
        if precision not in PRECISIONS:
            raise MeasureError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        self.precision = precision
        if not stores:
            raise MeasureError("No stores to measure; pass at least one store.")
        self.stores = [reduce_store(s, reduce) for s in stores]
        for other in self.stores[1:]:
            check_comparable(self.stores[0], other)
        self.stores[0].require_complete()
        self.device = default_device(device)
        self.layers = [select_layers(s, layers) for s in self.stores]
        self.mixed_reductions = check_reductions(self.stores, self.layers, allow_mixed=mixed_reductions)
        for message in self.mixed_reductions:
            warnings.warn(message + " (compared anyway: --mixed-reductions).", stacklevel=2)
        self.memory_budget = memory_budget
        self.undefined = undefined
        self._progress = progress or (lambda message: None)
        self._grams: dict[tuple[int, str], torch.Tensor] = {}
        self._reloadable: set[tuple[int, str]] = set()  # Grams the persistent cache holds
        self._confounder: torch.Tensor | None = None
        self._moments: dict[tuple[int, int], dict[str, Any]] = {}  # feature-route CKA moments per store pair
        self.statistics_computed = 0  # count of per-layer statistics built (for tests and reports)
        self.cache = cache  # optional persistent StatisticsCache consulted before computing (measure.cache)

    # ------------------------------------------------------------------ statistics
    def gram(self, s: int, layer: str) -> torch.Tensor:
        self.ensure_grams([(s, layer)])
        return self._grams[(s, layer)]

    def ensure_grams(self, keys: Iterable[tuple[int, str]], load: bool = True) -> None:
        """Load or compute the Grams of (store index, layer) ``keys``, in order.

        Cached Grams are loaded (with ``load=False`` only found: ``gram`` loads them when asked);
        the others are computed by ``layer_grams``, which reads the next layer while the current
        one is multiplied, and cached.
        """
        wanted = [key for key in dict.fromkeys(keys) if key not in self._grams]
        hits = [None] * len(wanted)
        if self.cache is not None and wanted:
            def look(key: tuple[int, str]) -> Any:
                store, layer = self.stores[key[0]], key[1]
                if load:
                    return self.cache.get(store, layer, "gram", self.gram_options)
                return self.cache.contains(store, layer, "gram", self.gram_options) or None

            with ThreadPoolExecutor(max_workers=4) as pool:  # Zarr reads and checksums release the GIL
                hits = list(pool.map(look, wanted))
        missing = []
        for key, hit in zip(wanted, hits):
            if hit is None:
                missing.append(key)
                self._reloadable.discard(key)  # found earlier but gone or damaged now: reloadable once rewritten
                continue
            self._reloadable.add(key)
            if load:
                self._grams[key] = torch.from_numpy(hit).to(self.device)
        jobs = [(self.stores[s], layer) for s, layer in missing]
        with ThreadPoolExecutor(max_workers=1) as writer:  # cache writes overlap the next Gram's product
            written = []
            for (s, layer), gram in zip(missing, layer_grams(jobs, self.device, self.memory_budget, self.precision)):
                self.statistics_computed += 1
                if self.cache is not None:
                    written.append(writer.submit(self.cache.put, self.stores[s], layer,
                                                 gram.detach().to("cpu", torch.float64).numpy(), "gram",
                                                 self.gram_options))
                self._grams[(s, layer)] = gram
                self._progress(f"gram {self.stores[s].name}/{layer}")
            for key, future in zip(missing, written):
                if future.result():  # a failed write stops the run here, as it would have inline
                    self._reloadable.add(key)

    def release_grams(self, s: int) -> None:
        """Forget the Grams of store ``s`` that the persistent cache holds (``gram`` reloads them when asked)."""
        for layer in self.layers[s]:
            if (s, layer) in self._reloadable:
                self._grams.pop((s, layer), None)

    @property
    def gram_options(self) -> dict[str, Any] | None:
        """The options that change a Gram, as keyed in the persistent cache (float64 Grams have none)."""
        return {"precision": self.precision} if self.precision != "float64" else None

    def check_precision(self, spec: MeasureSpec) -> None:
        """Refuse a measure that needs float64 Grams when Grams are formed in float32."""
        if self.precision != "float64" and spec.statistic != "features" and not spec.float32_grams:
            raise MeasureError(
                f"{spec.name} needs float64 Gram products: it uses the Gram's small eigenvalues, which "
                f"precision={self.precision!r} does not resolve. Measure it with --precision float64."
            )

    def provide_gram(self, s: int, layer: str, gram: Any) -> None:
        """Use ``gram`` (computed elsewhere, e.g. on a dask worker) as the Gram of layer ``layer`` of store ``s``."""
        self._grams[(s, layer)] = torch.as_tensor(gram, dtype=torch.float64).to(self.device)

    def _cached(self, store: ActivationStore, layer: str | None, kind: str, options: dict[str, Any] | None,
                compute: Callable[[], Any], count: bool = True) -> Any:
        """The statistic from the persistent cache when it holds it, else ``compute()`` (then cached)."""
        if self.cache is not None:
            hit = self.cache.get(store, layer, kind, options)
            if hit is not None:
                value = torch.from_numpy(hit).to(self.device)
                return list(value) if kind == "gram_blocks" else value
        value = compute()
        self.statistics_computed += int(count)
        if self.cache is not None:
            stacked = torch.stack(value) if kind == "gram_blocks" else value
            self.cache.put(store, layer, stacked.detach().to("cpu", torch.float64).numpy(), kind, options)
        return value

    def confounder(self) -> torch.Tensor:
        if self._confounder is None:
            holder = next((s for s in self.stores if s.info.inputs_stored), None)
            if holder is None:
                raise MeasureError(
                    "dcka needs the inputs as its confounder, but none of the stores holds them; "
                    "re-extract one store without --no-inputs."
                )
            self._confounder = self._cached(holder, None, "confounder", None, lambda: confounder_gram(
                layer_features(holder, None, self.device)), count=False)
        return self._confounder

    def _statistic(self, spec: MeasureSpec, s: int, layer: str, options: dict[str, Any]) -> Any:
        if spec.statistic == "gram":
            return self.gram(s, layer)
        if spec.statistic == "gram_blocks":
            b = options["batch_size"]
            return self._cached(self.stores[s], layer, "gram_blocks", {"batch_size": b, **(self.gram_options or {})},
                                lambda: layer_gram_blocks(self.stores[s], layer, b, self.device, self.precision))
        self.statistics_computed += 1
        return layer_features(self.stores[s], layer, self.device)

    def prepared(self, spec: MeasureSpec, options: dict[str, Any], s: int,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Any]:
        """The measure's per-layer objects for every selected layer of store ``s`` (``out``: see PreparedLayers)."""
        if spec.statistic == "gram_blocks":
            b = options["batch_size"]
            n = self.stores[s].n_samples
            if not (isinstance(b, int) and 4 <= b <= n):
                raise MeasureError(f"batch_size must be an integer between 4 and {n}, got {b!r}.")
        confounder = self.confounder() if spec.needs_confounder else None
        items = []
        for layer in self.layers[s]:
            p = spec.prepare(self._statistic(spec, s, layer, options), confounder=confounder, **options)
            if not getattr(p, "defined", True):
                message = f"{spec.name} is undefined for layer {layer!r} of {self.stores[s]}: {p.reason}."
                if self.undefined == "raise":
                    raise MeasureError(message + " Drop the layer with --layers, or pass --undefined nan.")
                warnings.warn(message + " Its row/column is NaN.", stacklevel=2)
            items.append(p)
        return PreparedLayers(items, out=out)  # stacked once: each pair is then a matrix product, no copies

    def prepare_together(self, spec: MeasureSpec, options: dict[str, Any],
                         stores: Sequence[int], release: bool = False) -> dict[int, list[Any]]:
        """``prepared`` of each store, stacked into one ``SharedProducts`` multiplied once when the
        measure is bilinear (``Prepared`` items): every pair of these stores is then a slice of it.

        ``release``: forget each store's cached Grams once it is prepared (``release_grams``), so the
        Grams of a zoo are not all held at once (warm zoo of 9: peak RSS 997 → 694 MiB).
        """
        out: dict[int, list[Any]] = {}
        group: SharedProducts | None = None
        total = sum(len(self.layers[s]) for s in stores)
        for s in stores:
            if spec.statistic == "gram":  # this store's Grams (the cached ones are loaded now, together)
                self.ensure_grams((s, layer) for layer in self.layers[s])
            layers = self.prepared(spec, options, s, out=group.block(len(self.layers[s])) if group else None)
            if release:
                self.release_grams(s)
            if group is None and len(stores) > 1 and layers.stacked:
                group = SharedProducts(total, layers)  # the first store, restacked into the group's rows
                layers = PreparedLayers(list(layers), out=group.block(len(layers)))
            if group is not None:
                group.add(layers)
            out[s] = layers
        if group is not None:
            group.compute()
        return out

    # ------------------------------------------------------------------ feature route
    def route(self, spec: MeasureSpec, options: dict[str, Any], i: int, j: int) -> str:
        """"gram" or "features" for ``spec`` on stores (i, j): the ``route`` option, "auto" by ``choose_route``."""
        if not spec.feature_route:
            return "gram"
        widths = [layer_widths(self.stores[s], self.layers[s]) for s in (i, j)]
        return choose_route(options.get("route", "auto"), self.stores[i].n_samples, *widths)

    def _feature_matrix(self, spec: MeasureSpec, i: int, j: int) -> np.ndarray:
        """The L_i × L_j matrix of a feature-route measure; the moments of (i, j) are streamed once per run."""
        n = self.stores[i].n_samples
        if spec.feature_route == "cka_debiased" and n < 4:
            raise MeasureError(f"{spec.name} needs at least 4 samples (unbiased HSIC); the stores hold {n}.")
        if (i, j) not in self._moments:
            acc = layer_moments(self.stores[i], self.layers[i], self.stores[j], self.layers[j], self.device,
                                self.memory_budget)
            self._moments[(i, j)] = acc.compute()
            self.statistics_computed += 1
            self._progress(f"moments {self.stores[i].name}/{self.stores[j].name}")
        out = self._moments[(i, j)]
        bad_rows, bad_cols = out[f"{spec.feature_route}_undefined"]
        for s, bad in ((i, bad_rows), (j, bad_cols)):
            for k in bad:
                message = (f"{spec.name} is undefined for layer {self.layers[s][k]!r} of {self.stores[s]}: its "
                           "self-HSIC is zero (a constant layer) or negative.")
                if self.undefined == "raise":
                    raise MeasureError(message + " Drop the layer with --layers, or pass --undefined nan.")
                warnings.warn(message + " Its row/column is NaN.", stacklevel=3)
        return out[spec.feature_route].detach().to("cpu", torch.float64).numpy()

    # ------------------------------------------------------------------ pairs
    def run(self, measures: Iterable[tuple[str, dict[str, Any]]],
            pairs: Sequence[tuple[int, int]], release: bool = True) -> list[PairResult]:
        """Every measure on every pair (i, j) of store indices.

        ``release``: after the last measure that uses Grams, forget the ones the persistent cache
        holds (``release_grams``); pass False when a later ``run`` of this engine needs them again.
        """
        results = []
        measures = [(get_measure(name), given) for name, given in measures]
        for spec, _ in measures:
            self.check_precision(spec)
        last_gram = max((k for k, (spec, _) in enumerate(measures) if spec.statistic == "gram"), default=-1)
        for index, (spec, given) in enumerate(measures):
            name = spec.name
            options = spec.resolve_options(given)
            kernel_stores = list(dict.fromkeys(s for i, j in pairs if self.route(spec, options, i, j) == "gram"
                                               for s in (i, j)))
            if spec.statistic == "gram":  # every missing Gram, computed in the order used (read ahead); the
                # cached ones are loaded store by store as they are prepared, and after the last measure
                # that needs them released again, so a zoo's Grams are never all held at once
                self.ensure_grams(((s, layer) for s in kernel_stores for layer in self.layers[s]), load=False)
            cache = self.prepare_together(spec, options, kernel_stores, release=release and index == last_gram)
            for i, j in pairs:
                if self.route(spec, options, i, j) == "features":
                    matrix, extras = self._feature_matrix(spec, i, j), {"route": "features"}
                else:
                    matrix = spec.pair_matrix(cache[i], cache[j]).detach().to("cpu", torch.float64).numpy()
                    extras = _extras(cache[i], cache[j], self.layers[i], self.layers[j])
                results.append(PairResult(
                    measure=name, options=options, store_a=self.stores[i].name, store_b=self.stores[j].name,
                    rows=list(self.layers[i]), cols=list(self.layers[j]), matrix=matrix, spec=spec,
                    extras=extras,
                ))
                self._progress(f"{name} {self.stores[i].name} × {self.stores[j].name}")
            del cache
        return results


def _extras(rows: list[Any], cols: list[Any], row_names: list[str], col_names: list[str]) -> dict[str, Any]:
    """Per-layer by-products (e.g. dCKA's variance explained by the input) keyed by side and layer."""
    out: dict[str, Any] = {}
    for side, items, names in (("rows", rows, row_names), ("cols", cols, col_names)):
        per_layer = {name: dict(p.extras) for name, p in zip(names, items) if getattr(p, "extras", None)}
        if per_layer:
            out[side] = per_layer
    return out
