"""Mutual k-nearest-neighbour alignment (Huh, Cheung, Wang & Isola, ICML 2024).

For each sample i, N_k^X(i) is the set of its k nearest other samples under
cosine similarity of the raw (uncentred) features, as in the authors'
platonic-rep code (features L2-normalised, self excluded, a sample with an
all-zero representation having cosine 0 with every other). The measure is

    mKNN(X, Y) = (1/n) Σᵢ |N_k^X(i) ∩ N_k^Y(i)| / k   ∈ [0, 1].

Cosines come from the linear Gram: cos(xᵢ, xⱼ) = Kᵢⱼ / √(Kᵢᵢ Kⱼⱼ). With Aᴷ the
0/1 neighbour-indicator matrix, mKNN = ⟨Aˣ, Aʸ⟩ / (n k), so the per-layer
statistic is vec(A) / √(n k) and the whole layer matrix is one matrix
product. Ties among equal cosines are broken by ``torch.topk``. Symmetric.
Needs all samples at once (an n × n Gram).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MeasureError
from ..validation import as_samples_matrix, check_same_samples
from ._bilinear import Prepared, bilinear_matrix
from .gram import linear_gram

__all__ = ["mutual_knn", "neighbours"]


def neighbours(gram: torch.Tensor, k: int, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (n, k) of each sample's k most cosine-similar other samples, from the linear Gram.

    ``sample_ids`` (bootstrap resamples) marks copies of one sample; a sample's copies are not
    counted among its neighbours, as they would be trivially nearest in every representation.
    """
    n = gram.shape[0]
    norms = torch.diagonal(gram).clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = gram / safe[:, None] / safe[None, :]
    cosine = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cosine, torch.zeros_like(cosine))
    excluded = torch.eye(n, dtype=torch.bool, device=gram.device)
    if sample_ids is not None:
        excluded = sample_ids[:, None] == sample_ids[None, :]
    cosine = cosine.masked_fill(excluded, -math.inf)
    return torch.topk(cosine, k, dim=1).indices


@dataclass
class KNNPrepared(Prepared):
    """vec(A)/√(n k) for the neighbour indicator A of one layer (``left`` is ``right``)."""

    n_samples: int = 0

    def permuted(self, index: torch.Tensor) -> KNNPrepared:
        """The same statistic with samples reordered by the permutation ``index``."""
        n = self.n_samples
        moved = self.left.reshape(n, n)[index][:, index].reshape(-1)
        return KNNPrepared(moved, moved, n_samples=n, extras=self.extras)


def _check_k(k: int, n: int, distinct: int | None = None) -> None:
    limit = (distinct if distinct is not None else n) - 1
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MeasureError(f"k must be a positive integer (neighbours per sample), got {k!r}.")
    if k > limit:
        raise MeasureError(f"k={k} needs more than {k} other samples but there are {limit}; choose k ≤ {limit}.")


def _knn_prepare(gram: torch.Tensor, k: int = 10, sample_ids: torch.Tensor | None = None) -> KNNPrepared:
    """Per-layer statistic: the flattened k-NN indicator matrix scaled by 1/√(n k)."""
    n = gram.shape[0]
    distinct = None if sample_ids is None else int(torch.unique(sample_ids).numel())
    _check_k(k, n, distinct)
    index = neighbours(gram, k, sample_ids)
    indicator = torch.zeros((n, n), dtype=torch.float64, device=gram.device)
    indicator.scatter_(1, index, 1.0)
    vector = indicator.reshape(-1) / math.sqrt(n * k)
    return KNNPrepared(vector, vector, n_samples=n)


def _knn_matrix(rows, cols) -> torch.Tensor:
    """Mutual k-NN for every layer pair (one matrix product)."""
    return bilinear_matrix(rows, cols, clamp=(0.0, 1.0))


def mutual_knn(x, y, k: int = 10) -> float:
    """Mutual k-NN alignment (Huh et al. 2024) of x (n, ...) and y (n, ...) with cosine neighbourhoods.

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    >>> mutual_knn(x, 3 * x, k=5)
    1.0
    """
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    return float(_knn_matrix([_knn_prepare(linear_gram(x), k)], [_knn_prepare(linear_gram(y), k)])[0, 0])
