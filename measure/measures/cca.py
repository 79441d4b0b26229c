"""Canonical correlation analysis: mean CCA, SVCCA and PWCCA (kernels: ``measure.functional.cca``).

The canonical correlations ρ₁ ≥ ρ₂ ≥ … of X and Y are the singular values of Q_Xᵀ Q_Y, with
Q_X, Q_Y orthonormal bases of the centred columns; m = min(rank Xc, rank Yc) of them. When the
two ranks add up past n − 1 the correlations are forced towards 1 (a warning says so).
"""

from __future__ import annotations

from typing import Any

import torch

from ..functional._spectral import Spectral
from ..functional.cca import CCA_OUTPUTS, _cca_matrix, _cca_prepare, _pwcca_matrix, _pwcca_prepare, _svcca_prepare
from .base import Measure, Option

__all__ = ["CCA", "PWCCA", "SVCCA"]

OUTPUT = Option("rho", CCA_OUTPUTS,
                "{name} must be 'rho' (mean canonical correlation) or 'r2' (R²_CCA), got {value!r}.")


class CCA(Measure):
    """Mean canonical correlation ρ̄ = (1/m) Σ ρᵢ, or R²_CCA = (1/m) Σ ρᵢ² (``output="r2"``).

    Invariant to any invertible linear map and translation of either representation.
    Kornblith et al. divide R²_CCA by the smaller width; this divides by the smaller rank.

    Parameters
    ----------
    output : {"rho", "r2"}, default="rho"

    References
    ----------
    Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017 (ρ̄); Kornblith, Norouzi, Lee &
    Hinton, ICML 2019 (R²_CCA).
    """

    name = "cca"
    order = 40
    statistic = "gram"
    options = {"output": OUTPUT}
    value_range = (0.0, 1.0)
    invariances = frozenset({"orthogonal", "isotropic_scaling", "translation", "invertible_linear"})
    reference = "mean canonical correlation (Raghu et al. 2017) or R2_CCA (Kornblith et al., ICML 2019)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, output: str = "rho") -> Spectral:
        return _cca_prepare(statistic, output)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _cca_matrix(rows, cols)


class SVCCA(Measure):
    """SVCCA: CCA (as ``CCA``) of each layer's leading principal components.

    Each layer keeps its fewest leading principal directions explaining ``variance`` of its
    variance (at most ``dims``). Invariant to orthogonal transforms, isotropic scaling and
    translation; not to other invertible linear maps, which change the principal components.

    Parameters
    ----------
    variance : float, default=0.99
        Share of each layer's variance the kept components explain, in (0, 1].
    dims : int, default=0
        At most this many components per layer (0: no cap).
    output : {"rho", "r2"}, default="rho"

    References
    ----------
    Raghu, Gilmer, Yosinski & Sohl-Dickstein, "SVCCA: Singular Vector Canonical Correlation
    Analysis for Deep Learning Dynamics and Interpretability", NeurIPS 2017.
    """

    name = "svcca"
    order = 41
    statistic = "gram"
    options = {
        "variance": Option(0.99, lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= 1,
                           "{name} must be a share in (0, 1], for example 0.99; got {value!r}."),
        "dims": Option(0, lambda d: d is None or (not isinstance(d, bool) and isinstance(d, int) and d >= 0),
                       "{name} must be a positive integer, or 0 for no cap; got {value!r}."),
        "output": OUTPUT,
    }
    value_range = (0.0, 1.0)
    invariances = frozenset({"orthogonal", "isotropic_scaling", "translation"})
    reference = "Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017 (SVCCA)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, variance: float = 0.99,
                dims: int | None = 0, output: str = "rho") -> Spectral:
        return _svcca_prepare(statistic, variance, dims, output)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _cca_matrix(rows, cols)


class PWCCA(Measure):
    """Projection-weighted CCA: Σ αᵢ ρᵢ / Σ αᵢ with weights from the row (first) layer.

    αᵢ = Σⱼ |⟨hᵢ, xⱼ⟩|, hᵢ the i-th canonical variable of X and xⱼ its j-th centred neuron, so
    PWCCA(X, Y) ≠ PWCCA(Y, X). The weights are ℓ1 norms over X's neurons, hence it is invariant
    to isotropic scaling and translation but not to orthogonal transforms of X.

    References
    ----------
    Morcos, Raghu & Bengio, "Insights on representational similarity in neural networks with
    canonical correlation", NeurIPS 2018.
    """

    name = "pwcca"
    order = 42
    statistic = "features"
    symmetric = False
    value_range = (0.0, 1.0)
    invariances = frozenset({"isotropic_scaling", "translation"})
    reference = "Morcos, Raghu & Bengio, NeurIPS 2018 (projection-weighted CCA; weights from the row layer)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None) -> Spectral:
        return _pwcca_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _pwcca_matrix(rows, cols)
