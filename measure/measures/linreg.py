"""Linear-regression R² between representations (kernels: ``measure.functional.linreg``)."""

from __future__ import annotations

from typing import Any

import torch

from ..functional._spectral import Spectral
from ..functional.linreg import _linreg_matrix, _linreg_prepare
from .base import Measure

__all__ = ["LinearRegression"]


class LinearRegression(Measure):
    """R² of the least-squares linear prediction of the row layer X from the column layer Y.

        R²(X ← Y) = ‖Q_Yᵀ Xc‖²_F / ‖Xc‖²_F,

    Q_Y an orthonormal basis of the centred Yc. Asymmetric. Invariant to orthogonal transforms,
    isotropic scaling and translation of either side (to any invertible linear map of the
    predictor Y only). ≈ 1 whenever Y has at least as many features as samples (a warning says so).

    References
    ----------
    Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited",
    ICML 2019 (section 4).
    """

    name = "linreg"
    order = 50
    statistic = "gram"
    symmetric = False
    value_range = (0.0, 1.0)
    invariances = frozenset({"orthogonal", "isotropic_scaling", "translation"})
    reference = "Kornblith et al., ICML 2019 (R2 of predicting the row layer from the column layer)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None) -> Spectral:
        return _linreg_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _linreg_matrix(rows, cols)
