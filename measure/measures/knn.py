"""Mutual k-nearest-neighbour alignment (kernels: ``measure.functional.knn``)."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.knn import KNNPrepared, _knn_matrix, _knn_prepare
from .base import Measure, Option

__all__ = ["MutualKNN"]


class MutualKNN(Measure):
    """Mutual k-NN: the mean share of each sample's k nearest neighbours that both representations agree on.

        mKNN(X, Y) = (1/n) Σᵢ |N_k^X(i) ∩ N_k^Y(i)| / k,

    N_k^X(i) the k other samples with the largest cosine similarity to xᵢ, on the raw
    (uncentred) features as in the authors' code. Cosines make it invariant to orthogonal
    transforms and isotropic scaling, not to translation.

    Parameters
    ----------
    k : int, default=10
        Neighbours per sample, at most n − 1.

    References
    ----------
    Huh, Cheung, Wang & Isola, "The Platonic Representation Hypothesis", ICML 2024.
    """

    name = "mutual_knn"
    order = 70
    statistic = "gram"
    options = {"k": Option(10, lambda k: not isinstance(k, bool) and isinstance(k, int) and k >= 1,
                           "{name} must be a positive integer (neighbours per sample), got {value!r}.")}
    value_range = (0.0, 1.0)
    invariances = frozenset({"orthogonal", "isotropic_scaling"})
    float32_grams = True
    reference = "Huh, Cheung, Wang & Isola, ICML 2024 (mutual k-NN, cosine neighbourhoods)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, k: int = 10,
                sample_ids: torch.Tensor | None = None) -> KNNPrepared:
        return _knn_prepare(statistic, k, sample_ids)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _knn_matrix(rows, cols)
