"""Representational similarity analysis (Kriegeskorte, Mur & Bandettini, 2008).

Each layer gives a representational dissimilarity matrix (RDM) over samples:

- ``rdm="correlation"``: Dᵢⱼ = 1 − Pearson(xᵢ, xⱼ), the correlation across the
  features of samples i and j (each sample centred over its own features);
- ``rdm="euclidean"``: Dᵢⱼ = ‖xᵢ − xⱼ‖₂ (not squared).

Two RDMs are compared over their upper triangles (i < j) by the Spearman rank
correlation (``compare="spearman"``, ties given average ranks) or the Pearson
correlation. The per-layer statistic is the upper triangle, ranked if needed,
centred and scaled to unit norm, so every layer pair is one inner product and
the whole layer matrix is one matrix product. Symmetric, in [−1, 1].

Needs all samples at once: the RDM is n × n (the per-layer statistic is the
features, from which the RDM is built once and the features dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MeasureError
from ..validation import as_samples_matrix, check_min_samples, check_same_samples
from ._bilinear import Prepared, bilinear_matrix
from .gram import squared_distances

__all__ = ["RDMS", "COMPARISONS", "average_ranks", "dissimilarity_matrix", "rsa"]

RDMS = ("correlation", "euclidean")
COMPARISONS = ("spearman", "pearson")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..m of a 1-D tensor, tied values sharing their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(average[inverse])
    ranks[order] = average[inverse]
    return ranks


def dissimilarity_matrix(x: torch.Tensor, kind: str = "correlation") -> torch.Tensor:
    """The n × n RDM of x (n_samples, n_features): 1 − Pearson correlation or Euclidean distance."""
    x = x.reshape(len(x), -1).to(torch.float64)
    if kind == "correlation":
        if x.shape[1] < 2:
            raise MeasureError("rdm='correlation' needs at least 2 features per sample; use rdm='euclidean'.")
        xr = x - x.mean(dim=1, keepdim=True)
        norms = xr.norm(dim=1)
        if bool((norms <= 1e-12 * norms.max().clamp_min(1e-300)).any()):
            raise _ConstantSample(int((norms <= 1e-12 * norms.max().clamp_min(1e-300)).sum()))
        xr = xr / norms[:, None]
        return 1 - xr @ xr.T
    if kind == "euclidean":
        return squared_distances(x @ x.T).sqrt()
    raise MeasureError(f"rdm must be one of {RDMS}, got {kind!r}.")


class _ConstantSample(MeasureError):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} sample(s) have the same value in every feature, so their correlation "
                         "distance is undefined; use rdm='euclidean'")
        self.count = count


@dataclass
class RSAPrepared(Prepared):
    """The standardised upper triangle of one layer's RDM (``left`` is ``right``)."""

    n_samples: int = 0

    def permuted(self, index: torch.Tensor) -> RSAPrepared:
        """The same statistic with samples reordered by the permutation ``index``."""
        if not self.defined:
            return self
        n = self.n_samples
        iu = torch.triu_indices(n, n, 1, device=self.left.device)
        full = torch.zeros((n, n), dtype=self.left.dtype, device=self.left.device)
        full[iu[0], iu[1]] = self.left
        full = full + full.T
        moved = full[index][:, index][iu[0], iu[1]]
        return RSAPrepared(moved, moved, n_samples=n, extras=self.extras)


def _rsa_prepare(features: torch.Tensor, rdm: str = "correlation", compare: str = "spearman",
                 sample_ids: torch.Tensor | None = None) -> RSAPrepared:
    """Per-layer statistic: the RDM's upper triangle, ranked (Spearman) or not, centred, unit norm.

    ``sample_ids`` (bootstrap resamples) marks copies of one sample; pairs of copies are left
    out of the upper triangle, as their zero dissimilarity says nothing about the representation.
    """
    if compare not in COMPARISONS:
        raise MeasureError(f"compare must be one of {COMPARISONS}, got {compare!r}.")
    if rdm not in RDMS:
        raise MeasureError(f"rdm must be one of {RDMS}, got {rdm!r}.")
    n = len(features)
    check_min_samples(n, 3, "rsa", "2 dissimilarities")
    iu = torch.triu_indices(n, n, 1, device=features.device)
    empty = torch.zeros(iu.shape[1], dtype=torch.float64, device=features.device)
    try:
        matrix = dissimilarity_matrix(features, rdm)
    except _ConstantSample as exc:
        return RSAPrepared(empty, empty, defined=False, reason=str(exc), n_samples=n)
    values = matrix[iu[0], iu[1]]
    if sample_ids is not None:
        values = values[sample_ids[iu[0]] != sample_ids[iu[1]]]
    if compare == "spearman":
        values = average_ranks(values)
    values = values - values.mean()
    norm = values.norm()
    if not float(norm) > 1e-12 * float(values.abs().max().clamp_min(1e-300)) * values.numel() ** 0.5:
        return RSAPrepared(values, values, defined=False, n_samples=n,
                           reason="the RDM is constant (all samples equally dissimilar)")
    values = values / norm
    return RSAPrepared(values, values, n_samples=n if sample_ids is None else 0)


def _rsa_matrix(rows, cols) -> torch.Tensor:
    """Correlation of the (ranked) upper triangles for every layer pair."""
    return bilinear_matrix(rows, cols, clamp=(-1.0, 1.0))


def rsa(x, y, rdm: str = "correlation", compare: str = "spearman") -> float:
    """RSA between x (n, ...) and y (n, ...): correlation of their RDMs' upper triangles.

    Parameters
    ----------
    x, y : Tensor or ndarray of shape (n_samples, ...)
    rdm : {"correlation", "euclidean"}, default="correlation"
        1 − Pearson correlation between samples, or Euclidean distance.
    compare : {"spearman", "pearson"}, default="spearman"

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    >>> round(rsa(x, 2 * x + 1, rdm="euclidean"), 12)
    1.0
    """
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    px, py = _rsa_prepare(x, rdm, compare), _rsa_prepare(y, rdm, compare)
    for label, p in (("x", px), ("y", py)):
        if not p.defined:
            raise MeasureError(f"rsa is undefined for {label}: {p.reason}.")
    return float(_rsa_matrix([px], [py])[0, 0])
