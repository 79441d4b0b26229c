"""Linear-regression R² between representations (Kornblith et al., ICML 2019, section 4).

R²_LR(X ← Y) = ‖Q_Yᵀ Xc‖²_F / ‖Xc‖²_F is the share of X's centred variance that
a least-squares linear fit from Y explains, Q_Y an orthonormal basis of Yc.
With H K_X H = U_X Λ_X U_Xᵀ this is Σₖ λₖ ‖Q_Yᵀ uₖ‖² / tr(H K_X H), a function of
the cross matrix U_Xᵀ Q_Y (``_spectral``), so it comes from the layers' Grams.

Asymmetric: ``linreg(x, y)`` predicts x from y; in a layer matrix, row layer
i is predicted from column layer j. R² ≈ 1 whenever the predictor has at least
as many features as samples (a warning says so). Needs all samples at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..validation import as_samples_matrix, check_same_samples
from ._spectral import Spectral, cross_blocks, spectral_prepare, warn_if_saturated
from .gram import linear_gram

__all__ = ["linreg"]


def _linreg_prepare(gram: torch.Tensor) -> Spectral:
    """Per-layer statistic: eigenvectors and eigenvalues of the centred Gram."""
    spectral = spectral_prepare(gram)
    warn_if_saturated(spectral, "linreg", stacklevel=4)
    return spectral


def _r2(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    explained = (a.eigenvalues * (cross**2).sum(dim=1)).sum() / a.total
    return explained.clamp(0.0, 1.0)


def _linreg_matrix(rows: Sequence[Spectral], cols: Sequence[Spectral]) -> torch.Tensor:
    """M[i, j] = R² of predicting row layer i from column layer j."""
    return cross_blocks(rows, cols, _r2)


def linreg(x, y) -> float:
    """R² of the least-squares linear prediction of x (n, ...) from y (n, ...), both centred.

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> y = torch.randn(50, 6, generator=g, dtype=torch.float64)
    >>> round(linreg(y[:, :2] @ torch.randn(2, 3, generator=g, dtype=torch.float64), y), 8)
    1.0
    """
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    return float(_linreg_matrix([_linreg_prepare(linear_gram(x))], [_linreg_prepare(linear_gram(y))])[0, 0])
