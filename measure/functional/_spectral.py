"""The spectral basis shared by Procrustes, the CCA family and linear regression.

With Xc = X − 1x̄ᵀ (n × p) and the centred Gram K̃ = H K H = Xc Xcᵀ, the thin
SVD Xc = U S Vᵀ gives K̃ = U S² Uᵀ. One symmetric eigendecomposition of K̃ per
layer therefore yields

- an orthonormal basis Q_X = U_r of the column space of Xc (eigenvectors whose
  eigenvalue is not round-off), the input of CCA, SVCCA and linear regression;
- the eigenvalues λ = S², the input of SVCCA's variance cut and of the
  Procrustes nuclear norm ‖Xcᵀ Yc‖_* = ‖S_X (U_Xᵀ U_Y) S_Y‖_*.

Every pairwise quantity is then a function of the small cross matrix
C = U_Xᵀ U_Y (r_X × r_Y). ``cross_blocks`` computes all of them for an
L_A × L_B grid with one matrix product of the stacked bases.

The eigendecomposition needs the whole n × n Gram at once (O(n³) time, O(n²)
memory); it is done once per layer and reused for every pair.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import MeasureError
from .gram import center_gram

__all__ = ["Spectral", "cross_blocks", "spectral_prepare", "warn_if_forced", "warn_if_saturated"]

# eigenvalues below RANK_RTOL · n · λ_max are round-off (float64 eps ≈ 2.2e-16, with margin)
RANK_RTOL = 1e-14


@dataclass
class Spectral:
    """One layer's centred spectrum.

    Attributes
    ----------
    basis : Tensor of shape (n_samples, rank)
        Orthonormal eigenvectors of H K H with non-negligible eigenvalue, largest first.
    eigenvalues : Tensor of shape (rank,)
        The matching eigenvalues (squared singular values of Xc), descending.
    total : float
        tr(H K H) = ‖Xc‖²_F, the total variance (times n).
    full_rank : int
        The rank before any truncation (SVCCA keeps fewer components).
    projection : Tensor of shape (rank, n_features), optional
        U_rᵀ Xc, kept by PWCCA for its weights.
    output : str
        The summary the pair kernel reports (CCA: "rho" or "r2").
    measure : str
        The measure that prepared it (for warnings).
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    total: float
    full_rank: int
    projection: torch.Tensor | None = None
    output: str = ""
    measure: str = ""
    defined: bool = True
    reason: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.basis.shape[0])

    def permuted(self, index: torch.Tensor) -> Spectral:
        """The statistic of the same layer with samples reordered by ``index`` (a permutation).

        Permuting the samples permutes the rows of U and leaves λ and U_rᵀ Xc unchanged.
        """
        return replace(self, basis=self.basis[index])


# decompositions of live Gram tensors, so that Procrustes, CCA, SVCCA and linreg on one engine run share one
# eigendecomposition per layer: id(gram) -> (weak reference to gram, its version counter, Spectral)
_DECOMPOSED: dict[int, tuple[weakref.ref, int, Spectral]] = {}


def spectral_prepare(gram: torch.Tensor, features: torch.Tensor | None = None) -> Spectral:
    """Eigendecomposition of the centred Gram, keeping the non-negligible part.

    Parameters
    ----------
    gram : Tensor of shape (n_samples, n_samples)
        The linear Gram K = X Xᵀ, float64.
    features : Tensor of shape (n_samples, n_features), optional
        When given, U_rᵀ Xc is kept as ``projection`` (PWCCA's weights need it).

    The result for a given Gram tensor is remembered while that tensor lives (and is not
    modified in place), so every spectral measure of an engine run decomposes each layer once.
    """
    if features is not None:
        return _decompose(gram, features)
    key = id(gram)
    hit = _DECOMPOSED.get(key)
    if hit is not None and hit[0]() is gram and hit[1] == gram._version:
        return replace(hit[2], extras=dict(hit[2].extras))
    spectral = _decompose(gram, None)
    try:
        ref = weakref.ref(gram, lambda _, key=key: _DECOMPOSED.pop(key, None))
    except TypeError:  # not weak-referenceable: no caching
        return spectral
    _DECOMPOSED[key] = (ref, gram._version, spectral)
    return replace(spectral, extras=dict(spectral.extras))


def _decompose(gram: torch.Tensor, features: torch.Tensor | None) -> Spectral:
    n = gram.shape[0]
    if n < 2:
        raise MeasureError(f"These measures need at least 2 samples, got {n}.")
    centered = center_gram(gram)
    centered = (centered + centered.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(centered)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    total = float(torch.trace(centered))
    top = float(eigenvalues[0]) if n else 0.0
    keep = eigenvalues > RANK_RTOL * n * max(top, 0.0)
    if not top > 1e-12 * float(torch.trace(gram).abs()) or not bool(keep.any()):
        empty = torch.zeros((n, 0), dtype=gram.dtype, device=gram.device)
        return Spectral(empty, eigenvalues[:0], 0.0, 0, defined=False,
                        reason="the layer is constant over samples (zero centred variance)")
    basis, values = eigenvectors[:, keep], eigenvalues[keep]
    projection = None
    if features is not None:
        xc = features - features.mean(dim=0, keepdim=True)
        projection = basis.T @ xc
    return Spectral(basis, values, total, int(keep.sum()), projection, extras={"rank": int(keep.sum())})


def truncate(spectral: Spectral, variance: float = 1.0, dims: int | None = None) -> Spectral:
    """Keep the fewest leading components explaining ``variance`` of the total, at most ``dims`` (0: no cap)."""
    if not spectral.defined:
        return spectral
    share = torch.cumsum(spectral.eigenvalues, 0) / spectral.total
    k = int(torch.searchsorted(share, torch.tensor(variance * (1 - 1e-12), dtype=share.dtype,
                                                   device=share.device))) + 1
    k = min(k, spectral.rank)
    if dims:
        k = min(k, dims)
    projection = None if spectral.projection is None else spectral.projection[:k]
    extras = {**spectral.extras, "kept": k, "variance_kept": float(share[k - 1])}
    return replace(spectral, basis=spectral.basis[:, :k], eigenvalues=spectral.eigenvalues[:k],
                   projection=projection, extras=extras)


def warn_if_saturated(spectral: Spectral, measure: str, stacklevel: int = 3) -> None:
    """Warn when a layer's basis spans the whole centred sample space (every correlation is then 1)."""
    n = spectral.n_samples
    if spectral.defined and spectral.rank >= n - 1:
        if measure == "linreg":
            consequence = ("so it predicts any other layer exactly: linreg(other, this layer) = 1 whatever the "
                           "data. Reduce its dimension first (pooling, or PCA to k well below the sample count)")
        else:
            consequence = (f"so every canonical direction of the other layer is matched exactly and {measure} ≈ 1 "
                           "whatever the data. Use svcca (keeps 99 % of the variance) or cap the dimensions with "
                           "svcca(dims=k) for k well below the sample count")
        warnings.warn(
            f"{measure}: a layer has {spectral.rank} independent centred features for {n} samples "
            f"(features ≥ samples − 1), {consequence}, or measure on more samples.",
            stacklevel=stacklevel,
        )


def warn_if_forced(rows: Sequence[Spectral], cols: Sequence[Spectral], stacklevel: int = 3) -> None:
    """Warn when two layers' ranks add up past n − 1: their spans then share dimensions by necessity.

    Two subspaces of the (n − 1)-dimensional centred sample space with dimensions r_A and r_B
    intersect in at least r_A + r_B − (n − 1) dimensions, so at least that many canonical
    correlations are 1 whatever the data.
    """
    worst, pair = 0, None
    for a in rows:
        for b in cols:
            if a.defined and b.defined:
                forced = a.rank + b.rank - (a.n_samples - 1)
                if forced > worst:
                    worst, pair = forced, (a, b)
    if pair is None:
        return
    a, b = pair
    measure = a.measure or "cca"
    warnings.warn(
        f"{measure}: layers with {a.rank} and {b.rank} independent centred features over {a.n_samples} samples "
        f"(features ≥ samples when added up) share at least {worst} dimensions by necessity, so at least {worst} "
        f"canonical correlations are 1 whatever the data and {measure} is pulled toward 1. Use svcca (keeps 99 % "
        "of the variance) or cap the dimensions with svcca(dims=k) so that twice k stays well below the sample "
        "count, or measure on more samples.",
        stacklevel=stacklevel,
    )


def cross_blocks(rows: Sequence[Spectral], cols: Sequence[Spectral],
                 reduce: Callable[[Spectral, Spectral, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """M[i, j] = reduce(rows[i], cols[j], U_iᵀ U_j), all cross matrices from one matrix product; NaN where undefined."""
    ref = next((p.basis for p in (*rows, *cols)), None)
    out = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64,
                     device=ref.device if ref is not None else None)
    ok_rows = [i for i, p in enumerate(rows) if p.defined]
    ok_cols = [j for j, p in enumerate(cols) if p.defined]
    if not ok_rows or not ok_cols:
        return out
    left = torch.cat([rows[i].basis for i in ok_rows], dim=1)
    right = torch.cat([cols[j].basis for j in ok_cols], dim=1)
    if left.shape[0] != right.shape[0]:
        raise MeasureError(f"The two layers hold {left.shape[0]} and {right.shape[0]} samples; "
                           "they must hold the same samples in the same order.")
    product = left.T @ right
    row_starts = [0]
    for i in ok_rows:
        row_starts.append(row_starts[-1] + rows[i].rank)
    col_starts = [0]
    for j in ok_cols:
        col_starts.append(col_starts[-1] + cols[j].rank)
    values = []
    for a, i in enumerate(ok_rows):
        for b, j in enumerate(ok_cols):
            block = product[row_starts[a]:row_starts[a + 1], col_starts[b]:col_starts[b + 1]]
            values.append(reduce(rows[i], cols[j], block))
    grid = torch.stack(values).reshape(len(ok_rows), len(ok_cols))
    out[torch.tensor(ok_rows, device=out.device)[:, None], torch.tensor(ok_cols, device=out.device)[None, :]] = grid
    return out
