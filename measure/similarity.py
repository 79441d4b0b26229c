"""The original simtorch API, on the store engine: one class per measure for a pair of models.

``CKA(sim_model1, sim_model2, device=...).compute(dataloader)`` runs both
models over the loader once, captures their layers into stores and measures
them with the same ``Engine`` that ``pipeline.py measure`` uses, so the matrix
is exact over every sample of the loader — equal to ``compare`` on the
concatenated activations — and not an average of per-batch scores.

Memory is bounded by ``memory_budget`` (bytes, as ``EngineConfig.memory_budget``):

* the captured activations are held in memory while they fit half of it, the engine
  reading them with the rest; beyond that they are spilled to temporary Zarr stores on
  disk (``measure.spill``), which the engine streams chunk by chunk within the whole
  budget, and which are removed afterwards, after an error too;
* linear CKA on the feature route (``route="features"``, or "auto" when the moments are
  much smaller than n × n Grams) stores nothing: each batch goes from the hooks straight
  into a ``LinearCKAMatrix`` accumulator;
* the per-batch estimator ``cka_minibatch`` stores nothing either: each batch goes into a
  ``MinibatchCKAMatrix`` (``measure.accumulators.minibatch``), memory one batch.

The classes here (``measure.CKA``, ``measure.Procrustes`` ...) take two models; the measures
they compute are defined in ``measure.measures`` (``measure.measures.cka.CKA`` ...), under the
registry names in each class's ``measure`` attribute.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.batches import confounder_rows, model_input, to_device
from extract.hooks import SimilarityModel
from extract.store import MemoryStore

from .accumulators.cka import LinearCKAMatrix, choose_route
from .accumulators.minibatch import MinibatchCKAMatrix
from .engine import Engine, PairResult, default_device
from .engine.streaming import DEFAULT_MEMORY_BUDGET
from .errors import MeasureError
from .functional.gram import resolve_precision
from .functional.procrustes import OUTPUTS
from .registry import get_measure
from .spill import SpillingCapture
from .undefined import undefined_value
from .validation import check_finite, check_min_samples

__all__ = ["CCA", "CKA", "PWCCA", "RSA", "SVCCA", "DeconfoundedCKA", "DeltaCKA", "LinearRegression", "MinibatchCKA",
           "MutualKNN", "Procrustes", "Similarity", "capture"]


def _forward_batches(sim_models: list[SimilarityModel], dataloader: Iterable,
                     device: torch.device) -> Iterator[tuple[np.ndarray, list[dict[str, torch.Tensor]]]]:
    """Per batch of ``dataloader``: the flattened inputs and each model's captured layer outputs (on device)."""
    from tqdm.auto import tqdm

    for model in sim_models:
        model.model.to(device)
    with torch.inference_mode(), ExitStack() as hooks:
        for m in sim_models:
            hooks.enter_context(m.hooked())
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        for batch in tqdm(dataloader, total=total, desc="forward", leave=False):
            inputs = model_input(batch)
            outputs = [model.forward(to_device(inputs, device)) for model in sim_models]
            yield confounder_rows(inputs), outputs


def capture(sim_models: list[SimilarityModel], dataloader: Iterable, device: torch.device,
            store_inputs: bool = True) -> list[MemoryStore]:
    """Run every model over ``dataloader`` once and return one complete ``MemoryStore`` per model."""
    with _to_stores(sim_models, _forward_batches(sim_models, dataloader, device), store_inputs, None) as captured:
        return captured.finish()


def _held(tensor: torch.Tensor) -> torch.Tensor:
    """A captured output in the dtype a store holds it: float64 stays float64, the rest becomes float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A captured output as the host array a store holds; a view into a larger output (a tuple's slice, one
    token of a sequence) is copied, so that the bytes held are the bytes counted."""
    kept = _held(tensor)
    if kept.untyped_storage().nbytes() > kept.nbytes:
        kept = kept.clone(memory_format=torch.contiguous_format)
    return kept.cpu().numpy()


@contextmanager
def _to_stores(sim_models: list[SimilarityModel], batches: Iterable, store_inputs: bool,
               hold_bytes: int | None) -> Iterator[SpillingCapture]:
    """Every batch captured into a ``SpillingCapture`` (in memory up to ``hold_bytes``, None: no bound, then on
    disk); ``finish()`` gives the stores, valid inside the ``with`` block, whose exit removes any spilled ones."""
    with SpillingCapture([m.model_name for m in sim_models], hold_bytes, store_inputs) as captured:
        for rows, outputs in batches:
            captured.add(rows, [{key: _host_array(t) for key, t in out.items()} for out in outputs])
        yield captured


def _flat_blocks(sim_models: list[SimilarityModel], outputs: list[dict[str, torch.Tensor]], offset: int,
                 dtype: torch.dtype | None = None) -> list[list[torch.Tensor]]:
    """Each model's layer outputs of one batch as (rows, features) blocks on their device, checked for NaN/Inf;
    in ``dtype``, or (None) in the dtype a store would hold them."""
    sides = []
    for k, (model, out) in enumerate(zip(sim_models, outputs, strict=True), start=1):
        blocks = [t.reshape(len(t), -1) for t in out.values()]
        blocks = [_held(b) if dtype is None else b.to(dtype) for b in blocks]
        for layer, block in zip(model.layers, blocks, strict=True):
            check_finite(block, f"layer {layer!r} of sim_model{k} ({model.model_name})", offset)
        sides.append(blocks)
    return sides


def _stream_moments(sim_models: list[SimilarityModel], batches: Iterable) -> tuple[LinearCKAMatrix, int]:
    """Feature route from live hooks: each batch goes straight into one ``LinearCKAMatrix``; nothing is stored."""
    acc = LinearCKAMatrix()
    n = 0
    for _, outputs in batches:
        xs, ys = _flat_blocks(sim_models, outputs, n, torch.float64)
        acc.update(xs, ys)
        n += len(xs[0])
    if n == 0:
        raise ValueError("The dataloader yielded no samples.")
    return acc, n


def _stream_minibatches(sim_models: list[SimilarityModel], batches: Iterable, batch_size: int, precision: str,
                        float32_grams: bool) -> MinibatchCKAMatrix:
    """Minibatch CKA from live hooks: each batch goes straight into one ``MinibatchCKAMatrix``; nothing is stored.

    Each side's Grams take the precision the engine gives a store of that model (``Engine.gram_precision``):
    ``precision``, where "auto" is float64 when a layer is float64 and float32 otherwise.
    """
    acc = None
    n = 0
    for _, outputs in batches:
        xs, ys = _flat_blocks(sim_models, outputs, n)
        if acc is None:
            dtypes = ["float64" if any(b.dtype == torch.float64 for b in side) else "float32" for side in (xs, ys)]
            acc = MinibatchCKAMatrix(batch_size=batch_size, precision=tuple(
                resolve_precision(precision, dtype, float32_grams) for dtype in dtypes))
        acc.update(xs, ys)
        n += len(xs[0])
    if acc is None:
        raise ValueError("The dataloader yielded no samples.")
    return acc


class Similarity:
    """Base of the model-pair classes: ``compute(dataloader)`` then ``plot_similarity()``.

    Parameters
    ----------
    sim_model1, sim_model2 : SimilarityModel
    device : str or torch.device, default=None
        Where models run and measures are computed (CUDA when present).
    precision : {"auto", "float64", "float32"}, default="auto"
        How Gram products are formed (``measure.engine.EngineConfig``): ``"auto"`` takes the
        compensated float32 scheme for float32/float16 activations, float64 for float64 ones
        and for the measures that need float64 Grams.
    memory_budget : int, default=1 GiB
        Bytes of activations held at once (``EngineConfig.memory_budget``): captured
        activations stay in memory while they fit half of it and are spilled to a temporary
        store on disk beyond that (removed afterwards); the engine reads them within the rest,
        or within all of it once spilled. Per-batch estimators (``cka_minibatch``) and the
        feature route hold one batch whatever the budget. Grams (n × n per layer) and the
        models come on top.
    **options
        Options of the measure (see ``measure.MEASURES[name].options``).

    Attributes
    ----------
    sim_matrix : ndarray of shape (n_layers1, n_layers2)
        The last computed matrix; rows are layers of ``sim_model1``.
    result : PairResult
        The matrix with its layer names and per-layer extras.
    """

    measure = "cka"
    similarity_name = "CKA"

    def __init__(self, sim_model1: SimilarityModel, sim_model2: SimilarityModel,
                 device: str | torch.device | None = None, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 **options: Any) -> None:
        for i, m in enumerate((sim_model1, sim_model2), start=1):
            if not isinstance(m, SimilarityModel):
                raise TypeError(f"sim_model{i} must be an extract.SimilarityModel, got {type(m).__name__}.")
        self.sim_model1 = sim_model1
        self.sim_model2 = sim_model2
        self.device = device
        self.memory_budget = memory_budget
        self.precision = options.pop("precision", "auto")  # Gram precision (``EngineConfig.precision``)
        self.options = options
        self.sim_matrix: np.ndarray | None = None
        self.result: PairResult | None = None

    def compute(self, dataloader: Iterable) -> np.ndarray:
        """The layer × layer matrix over every sample of ``dataloader`` (rows: sim_model1)."""
        spec = get_measure(self.measure)
        options = spec.resolve_options(self.options)
        budget = self.memory_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise MeasureError(f"memory_budget must be a positive number of bytes (for example 2**30 for 1 GiB), "
                               f"got {budget!r}.")
        device = default_device(self.device)
        models = [self.sim_model1, self.sim_model2]
        batches = _forward_batches(models, dataloader, device)
        if spec.statistic == "gram_blocks":  # a per-batch estimator: each batch is used, then dropped
            acc = _stream_minibatches(models, batches, options["batch_size"], self.precision, spec.float32_grams)
            self.result = self._from_batches(spec, options, acc)
            self.sim_matrix = self.result.matrix
            return self.sim_matrix
        if spec.feature_route:
            first = next(batches, None)
            batches = itertools.chain([first] if first is not None else [], batches)
            if first is not None and self._route(spec, options, dataloader, first) == "features":
                self.result = self._from_moments(spec, options, *_stream_moments(models, batches))
                self.sim_matrix = self.result.matrix
                return self.sim_matrix
        with _to_stores(models, batches, spec.needs_confounder, budget // 2) as captured:
            stores = captured.finish()
            engine = Engine(stores, device=device, precision=self.precision,
                            memory_budget=budget - captured.held_bytes)
            self.result = engine.run([(self.measure, options)], [(0, 1)])[0]
            del stores, engine
        self.sim_matrix = self.result.matrix
        return self.sim_matrix

    @staticmethod
    def _route(spec, options: dict[str, Any], dataloader: Iterable, first) -> str:
        """The ``route`` option; "auto" decides from the loader's sample count and the first batch's widths."""
        if options.get("route", "auto") != "auto":
            return options["route"]
        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            return "gram"  # n unknown up front: keep the activations (exact either way)
        widths = [[int(np.prod(t.shape[1:])) for t in out.values()] for out in first[1]]
        return choose_route("auto", len(dataset), *widths)

    def _from_moments(self, spec, options: dict[str, Any], acc: LinearCKAMatrix, n: int) -> PairResult:
        if spec.feature_route == "cka_debiased":
            check_min_samples(n, 4, spec.name, "unbiased HSIC")
        out = acc.compute()
        reason = "its self-HSIC is zero (a constant layer) or negative; leave the layer out"
        bad_rows, bad_cols = out[f"{spec.feature_route}_undefined"]
        self._raise_undefined(spec, [(k, reason) for k in bad_rows], [(k, reason) for k in bad_cols])
        return self._pair_result(spec, options, out[spec.feature_route], {"route": "features"})

    def _from_batches(self, spec, options: dict[str, Any], acc: MinibatchCKAMatrix) -> PairResult:
        out = acc.compute()
        self._raise_undefined(spec, *out["undefined"])
        return self._pair_result(spec, options, out[spec.name], {})

    def _raise_undefined(self, spec, rows: list[tuple[int, str]], cols: list[tuple[int, str]]) -> None:
        """Raise naming the first undefined layer, a row (layer of sim_model1) before a column."""
        if rows or cols:
            model, (k, reason) = (self.sim_model1, rows[0]) if rows else (self.sim_model2, cols[0])
            undefined_value(spec.name, f"layer {model.layers[k]!r} of {model.model_name!r}", reason, advice=("", ""))

    def _pair_result(self, spec, options: dict[str, Any], matrix: torch.Tensor, extras: dict[str, Any]) -> PairResult:
        return PairResult(measure=spec.name, options=options, store_a=self.sim_model1.model_name,
                          store_b=self.sim_model2.model_name, rows=list(self.sim_model1.layers),
                          cols=list(self.sim_model2.layers), matrix=matrix.detach().to("cpu", torch.float64).numpy(),
                          spec=spec, extras=extras)

    def plot_similarity(self, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
                        savefig: bool = False, save_path: str | os.PathLike[str] = "output",
                        plot_cmap: str = "magma", ax=None):
        """Heatmap with layer names on both axes and the model names in the title; returns the Axes.

        With ``savefig=True`` the figure is saved as ``save_path/<title>.png``
        (``save_path`` may also name a ``.png``/``.pdf``/``.svg`` file).
        """
        from .report.heatmaps import plot_matrix

        if self.result is None:
            raise RuntimeError("Nothing to plot yet: call compute(dataloader) first.")
        title = title or f"{self.similarity_name}: {self.sim_model1.model_name} vs {self.sim_model2.model_name}"
        lo, hi = self.result.spec.value_range
        ax = plot_matrix(self.result.matrix, self.result.rows, self.result.cols, title=title,
                         xlabel=xlabel or self.sim_model2.model_name, ylabel=ylabel or self.sim_model1.model_name,
                         value_range=(lo, hi), cmap=plot_cmap, ax=ax)
        if savefig:
            target = Path(save_path)
            if target.suffix.lower() not in (".png", ".pdf", ".svg"):
                target = target / ("_".join(title.split()).replace("/", "_").replace(":", "") + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            ax.figure.savefig(target)
        return ax


class CKA(Similarity):
    """Linear CKA (Kornblith et al. 2019) between the layers of two models; ``unbiased=True``: debiased.

    The measures themselves are ``measure.measures.cka.CKA`` (``cka``) and ``DebiasedCKA`` (``cka_debiased``).
    """

    def __init__(self, sim_model1: SimilarityModel, sim_model2: SimilarityModel,
                 device: str | torch.device | None = None, unbiased: bool = False, **options: Any) -> None:
        super().__init__(sim_model1, sim_model2, device, **options)
        self.measure = "cka_debiased" if unbiased else "cka"
        self.similarity_name = "Debiased CKA" if unbiased else "CKA"


class DeconfoundedCKA(Similarity):
    """Deconfounded CKA (Cui et al. 2022), the loader's inputs being the confounder.

    ``remove_negative_eig=True`` (simtorch 0.2.1's name) projects the residual
    Grams onto the PSD cone.
    """

    measure = "dcka"
    similarity_name = "dCKA"

    def __init__(self, sim_model1: SimilarityModel, sim_model2: SimilarityModel,
                 device: str | torch.device | None = None, remove_negative_eig: bool = False,
                 **options: Any) -> None:
        options.setdefault("psd", remove_negative_eig)
        super().__init__(sim_model1, sim_model2, device, **options)


DeltaCKA = DeconfoundedCKA


class Procrustes(Similarity):
    """Orthogonal Procrustes between the layers of two models (Ding et al. 2021; Williams et al. 2021).

    Parameters
    ----------
    sim_model1, sim_model2 : SimilarityModel
    device : str or torch.device, default=None
    output : {"similarity", "euclidean", "angular"}, default="similarity"
        ‖XᵀY‖_* (registry entry ``procrustes``), √(2 − 2‖XᵀY‖_*) (``procrustes_euclidean``)
        or arccos ‖XᵀY‖_* (``procrustes_angular``); the measures are the classes of
        ``measure.measures.procrustes``.
    """

    measure = "procrustes"
    similarity_name = "Procrustes"

    def __init__(self, sim_model1: SimilarityModel, sim_model2: SimilarityModel,
                 device: str | torch.device | None = None, output: str = "similarity", **options: Any) -> None:
        super().__init__(sim_model1, sim_model2, device, **options)
        if output not in OUTPUTS:
            raise MeasureError(f"output must be one of {OUTPUTS}, got {output!r}.")
        if output != "similarity":
            self.measure = f"procrustes_{output}"
            self.similarity_name = f"Procrustes {output} distance"


class MinibatchCKA(Similarity):
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021): unbiased HSIC summed over batches of ``batch_size``.

    Streamed: each batch of activations is used as the hooks produce it and dropped, so memory is one
    batch whatever the loader's length. Batches are ``batch_size`` consecutive samples, regrouped from the
    loader's own batches; a last partial batch is left out. The measure is ``measure.measures.cka.MinibatchCKA``.
    """

    measure = "cka_minibatch"
    similarity_name = "Minibatch CKA"


class CCA(Similarity):
    """Mean canonical correlation ρ̄ (``output="r2"``: R²_CCA); ≈ 1 when features ≥ samples (a warning says so)."""

    measure = "cca"
    similarity_name = "CCA"


class SVCCA(Similarity):
    """SVCCA (Raghu et al. 2017); options ``variance`` (0.99), ``dims`` (0: no cap), ``output``."""

    measure = "svcca"
    similarity_name = "SVCCA"


class PWCCA(Similarity):
    """Projection-weighted CCA (Morcos et al. 2018); the weights come from ``sim_model1``'s layers."""

    measure = "pwcca"
    similarity_name = "PWCCA"


class LinearRegression(Similarity):
    """R² of predicting each layer of ``sim_model1`` (rows) from each layer of ``sim_model2`` (columns)."""

    measure = "linreg"
    similarity_name = "Linear regression R²"


class RSA(Similarity):
    """RSA (Kriegeskorte et al. 2008); options ``rdm`` ("correlation"/"euclidean"), ``compare`` (spearman/pearson)."""

    measure = "rsa"
    similarity_name = "RSA"


class MutualKNN(Similarity):
    """Mutual k-NN alignment (Huh et al. 2024), cosine neighbourhoods; option ``k`` (10)."""

    measure = "mutual_knn"
    similarity_name = "Mutual k-NN"
