"""Canonical correlation analysis: mean CCA, R²_CCA, SVCCA and PWCCA.

The canonical correlations ρ₁ ≥ ρ₂ ≥ … of X (n × p) and Y (n × q) are the
singular values of Q_Xᵀ Q_Y, with Q_X, Q_Y orthonormal bases of the centred
columns Xc, Yc. Here Q_X is read off the eigendecomposition of the centred
Gram H K H (``_spectral``), so all layer pairs share one per-layer
decomposition. With m = min(rank Xc, rank Yc) correlations:

- ``cca``: ρ̄ = (1/m) Σ ρᵢ (Raghu et al. 2017's summary), or with output="r2"
  R²_CCA = (1/m) Σ ρᵢ² = ‖Q_Yᵀ Q_X‖²_F / m (Kornblith et al. 2019, who divide
  by the smaller width p₁; we divide by the smaller rank so that
  rank-deficient layers are not penalised). Symmetric.
- ``svcca`` (Raghu et al., NeurIPS 2017): first keep the fewest leading
  principal components explaining ``variance`` (default 0.99) of each layer's
  variance, at most ``dims``; then CCA as above. Symmetric.
- ``pwcca`` (Morcos, Raghu & Bengio, NeurIPS 2018): Σ αᵢ ρᵢ / Σ αᵢ with
  αᵢ = Σⱼ |⟨hᵢ, xⱼ⟩|, hᵢ = Q_X aᵢ the i-th canonical variable of X (aᵢ the
  left singular vectors of Q_Xᵀ Q_Y) and xⱼ the j-th centred neuron of X.
  The weights come from the *first* argument: pwcca(x, y) ≠ pwcca(y, x).
  The weights need the neurons, so PWCCA uses the features, not just the Gram.

CCA is invariant to any invertible linear map of either side (SVCCA only to
orthogonal maps and isotropic scaling, which keep its principal components;
PWCCA only to isotropic scaling of the weighting side, whose neurons it sums
over). All of them are pulled toward 1 whenever the two layers' ranks add up past n − 1
(their spans then share r_X + r_Y − (n − 1) dimensions whatever the data; a
layer with as many features as samples makes every correlation 1): a warning
says so; use SVCCA or cap the dimensions (``svcca(dims=k)``) in that regime.

Every measure here needs all samples at once (an n × n eigendecomposition,
O(n³) time, O(n²) memory per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..errors import MeasureError
from ..validation import as_samples_matrix, check_same_samples
from ._spectral import Spectral, cross_blocks, spectral_prepare, truncate, warn_if_forced
from .gram import linear_gram

__all__ = ["cca", "pwcca", "svcca"]

CCA_OUTPUTS = ("rho", "r2")


def _check_output(output: str) -> None:
    if output not in CCA_OUTPUTS:
        raise MeasureError(f"output must be 'rho' (mean canonical correlation) or 'r2' (R²_CCA), got {output!r}.")


def _check_variance(variance: float, dims: int | None) -> None:
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
        raise MeasureError(f"variance must be a share in (0, 1], for example 0.99; got {variance!r}.")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 0):
        raise MeasureError(f"dims must be a positive integer, or 0 for no cap; got {dims!r}.")


def _cca_prepare(gram: torch.Tensor, output: str = "rho") -> Spectral:
    """Per-layer statistic: an orthonormal basis of the centred columns (from H K H)."""
    _check_output(output)
    spectral = spectral_prepare(gram)
    spectral.output, spectral.measure = output, "cca"
    return spectral


def _svcca_prepare(gram: torch.Tensor, variance: float = 0.99, dims: int | None = 0,
                   output: str = "rho") -> Spectral:
    """Per-layer statistic: the leading principal directions explaining ``variance``, at most ``dims`` (0: all)."""
    _check_output(output)
    _check_variance(variance, dims)
    spectral = truncate(spectral_prepare(gram), variance, dims)
    spectral.output, spectral.measure = output, "svcca"
    return spectral


def _pwcca_prepare(features: torch.Tensor) -> Spectral:
    """Per-layer statistic: the basis and U_rᵀ Xc (r × p), which PWCCA's weights need."""
    features = features.reshape(len(features), -1).to(torch.float64)
    spectral = spectral_prepare(features @ features.T, features)
    spectral.measure = "pwcca"
    return spectral


def _correlations(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(cross).clamp(0.0, 1.0)


def _mean_rho(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    return _correlations(a, b, cross).mean()


def _mean_rho2(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    return (_correlations(a, b, cross) ** 2).mean()


def _pwcca_pair(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    left, rho, _ = torch.linalg.svd(cross, full_matrices=False)
    weights = (left.T @ a.projection).abs().sum(dim=1)
    return (weights * rho.clamp(0.0, 1.0)).sum() / weights.sum()


def _cca_matrix(rows: Sequence[Spectral], cols: Sequence[Spectral], output: str | None = None) -> torch.Tensor:
    """ρ̄ (or R²_CCA, as recorded by ``prepare`` unless ``output`` is given) for every layer pair."""
    if output is None:
        output = next((p.output for p in rows if p.output), "rho")
    warn_if_forced(rows, cols)
    return cross_blocks(rows, cols, _mean_rho2 if output == "r2" else _mean_rho)


def _pwcca_matrix(rows: Sequence[Spectral], cols: Sequence[Spectral]) -> torch.Tensor:
    """PWCCA for every layer pair, the weights taken from the row layer."""
    warn_if_forced(rows, cols)
    return cross_blocks(rows, cols, _pwcca_pair)


def _inputs(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    return x, y


def cca(x, y, output: Literal["rho", "r2"] = "rho") -> float:
    """Mean canonical correlation ρ̄ (or R²_CCA) between x (n, ...) and y (n, ...).

    Parameters
    ----------
    x, y : Tensor or ndarray of shape (n_samples, ...)
    output : {"rho", "r2"}, default="rho"
        The mean of the canonical correlations, or the mean of their squares.

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    >>> round(cca(x, x @ torch.randn(4, 4, generator=g, dtype=torch.float64) + 3), 8)
    1.0
    """
    x, y = _inputs(x, y)
    return float(_cca_matrix([_cca_prepare(linear_gram(x), output)], [_cca_prepare(linear_gram(y), output)],
                             output)[0, 0])


def svcca(x, y, variance: float = 0.99, dims: int | None = 0, output: Literal["rho", "r2"] = "rho") -> float:
    """SVCCA (Raghu et al. 2017): CCA of the principal components explaining ``variance``, at most ``dims``.

    Parameters
    ----------
    x, y : Tensor or ndarray of shape (n_samples, ...)
    variance : float, default=0.99
        Share of each layer's variance the kept principal components must explain.
    dims : int, default=0
        At most this many components per layer (0: no cap).
    output : {"rho", "r2"}, default="rho"
    """
    x, y = _inputs(x, y)
    px = _svcca_prepare(linear_gram(x), variance, dims, output)
    py = _svcca_prepare(linear_gram(y), variance, dims, output)
    return float(_cca_matrix([px], [py], output)[0, 0])


def pwcca(x, y) -> float:
    """Projection-weighted CCA (Morcos et al. 2018); the weights come from ``x``, so it is asymmetric."""
    x, y = _inputs(x, y)
    return float(_pwcca_matrix([_pwcca_prepare(x)], [_pwcca_prepare(y)])[0, 0])
