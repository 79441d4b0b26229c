"""The original simtorch API, on the store engine: one class per measure for a pair of models.

``CKA(sim_model1, sim_model2, device=...).compute(dataloader)`` runs both
models over the loader once, captures their layers into ``MemoryStore``s and
measures them with the same ``Engine`` that ``pipeline.py measure`` uses, so
the matrix is exact over every sample of the loader — equal to ``compare`` on
the concatenated activations — and not an average of per-batch scores. For
linear CKA on the feature route (``route="features"``, or "auto" when the
moments are much smaller than n × n Grams) nothing is stored: each batch goes
from the hooks straight into a ``LinearCKAMatrix`` accumulator, so memory does
not grow with the number of samples.

The classes here (``measure.CKA``, ``measure.Procrustes`` ...) take two models; the measures
they compute are defined in ``measure.measures`` (``measure.measures.cka.CKA`` ...), under the
registry names in each class's ``measure`` attribute.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.batches import confounder_rows, model_input, to_device
from extract.hooks import SimilarityModel
from extract.store import INPUTS_ARRAY, LAYERS_GROUP, MemoryStore, StoreInfo

from .accumulators.cka import LinearCKAMatrix, choose_route
from .engine import Engine, PairResult, default_device
from .errors import MeasureError
from .functional.procrustes import OUTPUTS
from .registry import get_measure
from .undefined import undefined_value
from .validation import check_finite, check_min_samples

__all__ = ["CCA", "CKA", "PWCCA", "RSA", "SVCCA", "DeconfoundedCKA", "DeltaCKA", "LinearRegression", "MutualKNN",
           "Procrustes", "Similarity", "capture"]


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
    return _to_stores(sim_models, _forward_batches(sim_models, dataloader, device), store_inputs)


def _to_stores(sim_models: list[SimilarityModel], batches: Iterable, store_inputs: bool) -> list[MemoryStore]:
    parts: list[dict[str, list[np.ndarray]]] = [{} for _ in sim_models]
    digest = hashlib.sha256()
    n = 0
    for rows, outputs in batches:
        digest.update(rows.tobytes())
        n += len(rows)
        for store_parts, model_outputs in zip(parts, outputs, strict=True):
            for key, tensor in model_outputs.items():
                # float64 activations stay float64 (exact); others are held as float32, as in stores
                kept = tensor if tensor.dtype == torch.float64 else tensor.float()
                store_parts.setdefault(f"{LAYERS_GROUP}/{key}", []).append(kept.cpu().numpy())
            if store_inputs:
                store_parts.setdefault(INPUTS_ARRAY, []).append(rows)
    if n == 0:
        raise ValueError("The dataloader yielded no samples.")
    stores = []
    for store_parts, model in zip(parts, sim_models, strict=True):
        wide = any(blocks[0].dtype == np.float64 for key, blocks in store_parts.items() if key != INPUTS_ARRAY)
        info = StoreInfo(model_name=model.model_name, layers=list(model.layers), n_samples=n,
                         dtype="float64" if wide else "float32",
                         chunk_samples=n, samples_done=n, complete=True, inputs_stored=store_inputs,
                         fingerprint=f"memory:sha256:{digest.hexdigest()}:n={n}")
        store = MemoryStore(info)
        for key, blocks in store_parts.items():
            array = np.concatenate(blocks)
            store.create_array(key, array.shape, str(array.dtype), n)
            store.write(key, 0, array)
        if store_inputs:
            info.input_shape = list(store.array_shape(INPUTS_ARRAY)[1:])
        stores.append(store)
    return stores


def _stream_moments(sim_models: list[SimilarityModel], batches: Iterable) -> tuple[LinearCKAMatrix, int]:
    """Feature route from live hooks: each batch goes straight into one ``LinearCKAMatrix``; nothing is stored."""
    acc = LinearCKAMatrix()
    n = 0
    for _, (out1, out2) in batches:
        xs = [t.reshape(len(t), -1).to(torch.float64) for t in out1.values()]
        ys = [t.reshape(len(t), -1).to(torch.float64) for t in out2.values()]
        for model, name, blocks in ((sim_models[0], "sim_model1", xs), (sim_models[1], "sim_model2", ys)):
            for layer, block in zip(model.layers, blocks, strict=True):
                check_finite(block, f"layer {layer!r} of {name} ({model.model_name})", n)
        acc.update(xs, ys)
        n += len(xs[0])
    if n == 0:
        raise ValueError("The dataloader yielded no samples.")
    return acc, n


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
                 device: str | torch.device | None = None, **options: Any) -> None:
        for i, m in enumerate((sim_model1, sim_model2), start=1):
            if not isinstance(m, SimilarityModel):
                raise TypeError(f"sim_model{i} must be an extract.SimilarityModel, got {type(m).__name__}.")
        self.sim_model1 = sim_model1
        self.sim_model2 = sim_model2
        self.device = device
        self.precision = options.pop("precision", "auto")  # Gram precision (``EngineConfig.precision``)
        self.options = options
        self.sim_matrix: np.ndarray | None = None
        self.result: PairResult | None = None

    def compute(self, dataloader: Iterable) -> np.ndarray:
        """The layer × layer matrix over every sample of ``dataloader`` (rows: sim_model1)."""
        spec = get_measure(self.measure)
        options = spec.resolve_options(self.options)
        device = default_device(self.device)
        models = [self.sim_model1, self.sim_model2]
        batches = _forward_batches(models, dataloader, device)
        if spec.feature_route:
            first = next(batches, None)
            batches = itertools.chain([first] if first is not None else [], batches)
            if first is not None and self._route(spec, options, dataloader, first) == "features":
                self.result = self._from_moments(spec, options, *_stream_moments(models, batches))
                self.sim_matrix = self.result.matrix
                return self.sim_matrix
        stores = _to_stores(models, batches, store_inputs=spec.needs_confounder)
        engine = Engine(stores, device=device, precision=self.precision)
        self.result = engine.run([(self.measure, options)], [(0, 1)])[0]
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
        bad_rows, bad_cols = out[f"{spec.feature_route}_undefined"]
        if bad_rows or bad_cols:
            model, layer = ((self.sim_model1, self.sim_model1.layers[bad_rows[0]]) if bad_rows
                            else (self.sim_model2, self.sim_model2.layers[bad_cols[0]]))
            undefined_value(spec.name, f"layer {layer!r} of {model.model_name!r}",
                            "its self-HSIC is zero (a constant layer) or negative; leave the layer out",
                            advice=("", ""))
        matrix = out[spec.feature_route].detach().to("cpu", torch.float64).numpy()
        return PairResult(measure=spec.name, options=options, store_a=self.sim_model1.model_name,
                          store_b=self.sim_model2.model_name, rows=list(self.sim_model1.layers),
                          cols=list(self.sim_model2.layers), matrix=matrix, spec=spec, extras={"route": "features"})

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
