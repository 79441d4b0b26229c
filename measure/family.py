"""Registrations of the measure family beyond CKA, and their model-pair classes.

Registry entries (``measure.MEASURES``), all usable through ``compare``,
``pipeline.py measure --measures`` and the classes below:

===================== ========= =========== ==================== ====================================
name                  statistic symmetric   range                options
===================== ========= =========== ==================== ====================================
procrustes            gram      yes         [0, 1]  similarity
procrustes_euclidean  gram      yes         [0, √2] distance
procrustes_angular    gram      yes         [0, π/2] distance
cca                   gram      yes         [0, 1]               output="rho" | "r2"
svcca                 gram      yes         [0, 1]               variance=0.99, dims=0 (no cap), output
pwcca                 features  no (rows    [0, 1]
                                weight)
linreg                gram      no (rows    [0, 1]
                                predicted)
rsa                   features  yes         [−1, 1]              rdm="correlation" | "euclidean",
                                                                 compare="spearman" | "pearson"
mutual_knn            gram      yes         [0, 1]               k=10
===================== ========= =========== ==================== ====================================

The Procrustes distances are separate entries (kind "distance") because a
registry entry has one kind, which decides how heatmaps are scaled and which
layer counts as the best match.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from extract.hooks import SimilarityModel

from .functional.cca import _cca_matrix, _cca_prepare, _pwcca_matrix, _pwcca_prepare, _svcca_prepare
from .functional.knn import _knn_matrix, _knn_prepare
from .functional.linreg import _linreg_matrix, _linreg_prepare
from .functional.procrustes import OUTPUTS, _procrustes_matrix, _procrustes_prepare
from .functional.rsa import _rsa_matrix, _rsa_prepare
from .registry import MeasureError, MeasureSpec, register
from .similarity import Similarity

__all__ = ["CCA", "PWCCA", "RSA", "SVCCA", "LinearRegression", "MutualKNN", "Procrustes"]

_PROCRUSTES_REF = "Ding et al., NeurIPS 2021; Williams et al., NeurIPS 2021 (orthogonal Procrustes)"

register(MeasureSpec(
    "procrustes", "gram", lambda stat, *, confounder=None: _procrustes_prepare(stat),
    lambda rows, cols: _procrustes_matrix(rows, cols, "similarity"), value_range=(0.0, 1.0),
    reference=_PROCRUSTES_REF + ": ||X^T Y||_* of centred, unit-Frobenius X, Y",
))
register(MeasureSpec(
    "procrustes_euclidean", "gram", lambda stat, *, confounder=None: _procrustes_prepare(stat),
    lambda rows, cols: _procrustes_matrix(rows, cols, "euclidean"), value_range=(0.0, math.sqrt(2.0)),
    kind="distance", reference=_PROCRUSTES_REF + ": sqrt(2 - 2 ||X^T Y||_*)",
))
register(MeasureSpec(
    "procrustes_angular", "gram", lambda stat, *, confounder=None: _procrustes_prepare(stat),
    lambda rows, cols: _procrustes_matrix(rows, cols, "angular"), value_range=(0.0, math.pi / 2),
    kind="distance", reference=_PROCRUSTES_REF + ": arccos ||X^T Y||_*",
))
register(MeasureSpec(
    "cca", "gram", lambda stat, *, confounder=None, output="rho": _cca_prepare(stat, output),
    _cca_matrix, options={"output": "rho"}, value_range=(0.0, 1.0),
    reference="mean canonical correlation (Raghu et al. 2017) or R2_CCA (Kornblith et al., ICML 2019)",
))
register(MeasureSpec(
    "svcca", "gram",
    lambda stat, *, confounder=None, variance=0.99, dims=0, output="rho": _svcca_prepare(stat, variance, dims, output),
    _cca_matrix, options={"variance": 0.99, "dims": 0, "output": "rho"}, value_range=(0.0, 1.0),
    reference="Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017 (SVCCA)",
))
register(MeasureSpec(
    "pwcca", "features", lambda stat, *, confounder=None: _pwcca_prepare(stat), _pwcca_matrix,
    symmetric=False, value_range=(0.0, 1.0),
    reference="Morcos, Raghu & Bengio, NeurIPS 2018 (projection-weighted CCA; weights from the row layer)",
))
register(MeasureSpec(
    "linreg", "gram", lambda stat, *, confounder=None: _linreg_prepare(stat), _linreg_matrix,
    symmetric=False, value_range=(0.0, 1.0),
    reference="Kornblith et al., ICML 2019 (R2 of predicting the row layer from the column layer)",
))
register(MeasureSpec(
    "rsa", "features",
    lambda stat, *, confounder=None, rdm="correlation", compare="spearman", sample_ids=None:
        _rsa_prepare(stat, rdm, compare, sample_ids),
    _rsa_matrix, options={"rdm": "correlation", "compare": "spearman"}, value_range=(-1.0, 1.0),
    reference="Kriegeskorte, Mur & Bandettini 2008 (RSA: correlation of RDM upper triangles)",
))
register(MeasureSpec(
    "mutual_knn", "gram",
    lambda stat, *, confounder=None, k=10, sample_ids=None: _knn_prepare(stat, k, sample_ids),
    _knn_matrix, options={"k": 10}, value_range=(0.0, 1.0), float32_grams=True,
    reference="Huh, Cheung, Wang & Isola, ICML 2024 (mutual k-NN, cosine neighbourhoods)",
))


class Procrustes(Similarity):
    """Orthogonal Procrustes between the layers of two models (Ding et al. 2021; Williams et al. 2021).

    Parameters
    ----------
    sim_model1, sim_model2 : SimilarityModel
    device : str or torch.device, default=None
    output : {"similarity", "euclidean", "angular"}, default="similarity"
        ‖XᵀY‖_* (registry entry ``procrustes``), √(2 − 2‖XᵀY‖_*) (``procrustes_euclidean``)
        or arccos ‖XᵀY‖_* (``procrustes_angular``).
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
