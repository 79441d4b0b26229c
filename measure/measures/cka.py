"""Centered kernel alignment: linear, debiased, RBF and minibatch (kernels: ``measure.functional.cka``).

These are the measure definitions behind ``compare(x, y, "cka")`` and ``pipeline.py measure``.
``measure.CKA`` is another class: the model-pair API (``measure.similarity.CKA``), which runs two
models over a loader and measures them with these definitions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..functional._bilinear import Prepared, bilinear_matrix
from ..functional.cka import _cka_debiased_prepare, _cka_minibatch_prepare, _cka_prepare, _cka_rbf_prepare
from .base import Measure, Option

__all__ = ["CKA", "DebiasedCKA", "MinibatchCKA", "RBFCKA"]

ROUTE = Option("auto", ("auto", "gram", "features"),
               "Option {name} of {measure!r} must be 'auto', 'gram' or 'features', got {value!r}.")
_KERNEL_INVARIANCES = frozenset({"orthogonal", "isotropic_scaling", "translation"})


class CKA(Measure):
    """Linear CKA with the biased HSIC (Kornblith et al. 2019).

    With Xc, Yc the column-centred representations (n_samples, p) and (n_samples, q),

        CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) = ⟨HKH, HLH⟩ / (‖HKH‖_F ‖HLH‖_F),

    K = X Xᵀ, L = Y Yᵀ. Invariant to orthogonal transforms, isotropic scaling and translation,
    not to other invertible linear maps.

    Parameters
    ----------
    route : {"auto", "gram", "features"}, default="auto"
        Gram route (n × n Grams) or feature route (moments of the features, p² + q² + pq
        numbers); the same value. "auto" chooses by size (``measure.accumulators.choose_route``).

    References
    ----------
    Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019.
    """

    name = "cka"
    order = 10
    statistic = "gram"
    options = {"route": ROUTE}
    value_range = (0.0, 1.0)
    invariances = _KERNEL_INVARIANCES
    feature_route = "cka"
    float32_grams = True
    reference = "Kornblith et al., ICML 2019 (linear kernel, biased HSIC)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, route: str = "auto") -> Prepared:
        return _cka_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols)


class DebiasedCKA(Measure):
    """Linear CKA with the unbiased HSIC of Song et al. (2012): ≈ 0 for independent data.

        CKA₁(X, Y) = HSIC₁(K, L) / √(HSIC₁(K, K) HSIC₁(L, L)),

    HSIC₁ = [tr(K̂L̂) + 1ᵀK̂1 1ᵀL̂1 / ((n−1)(n−2)) − 2/(n−2) 1ᵀK̂L̂1] / (n(n−3)) with K̂ the linear
    Gram with zeroed diagonal. Needs n ≥ 4; can be negative. Invariant to orthogonal
    transforms, isotropic scaling and translation.

    Parameters
    ----------
    route : {"auto", "gram", "features"}, default="auto"
        As for ``CKA``.

    References
    ----------
    Kornblith et al., ICML 2019; Song, Smola, Gretton, Bedo & Borgwardt, "Feature Selection via
    Dependence Maximization", JMLR 2012.
    """

    name = "cka_debiased"
    order = 11
    statistic = "gram"
    options = {"route": ROUTE}
    invariances = _KERNEL_INVARIANCES
    feature_route = "cka_debiased"
    float32_grams = True
    reference = "Kornblith et al., ICML 2019 with the unbiased HSIC of Song et al., JMLR 2012"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, route: str = "auto") -> Prepared:
        return _cka_debiased_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols, clamp=None)


class RBFCKA(Measure):
    """CKA of RBF kernels (Kornblith et al. 2019), biased HSIC.

        K_ij = exp(−‖xᵢ − xⱼ‖² / (2σ²)),   σ² = threshold² · median over all n² of ‖xᵢ − xⱼ‖²,

    then CKA(K, L) = ⟨HKH, HLH⟩ / (‖HKH‖_F ‖HLH‖_F). Distances and the median-distance bandwidth
    make it invariant to orthogonal transforms, isotropic scaling and translation.

    Parameters
    ----------
    threshold : float, default=0.4
        Bandwidth relative to the median distance (> 0).

    References
    ----------
    Kornblith, Norouzi, Lee & Hinton, ICML 2019 (section 3, RBF kernel).
    """

    name = "cka_rbf"
    order = 12
    statistic = "gram"
    options = {"threshold": Option(0.4, lambda v: v > 0, "{name} must be positive, got {value!r}.")}
    value_range = (0.0, 1.0)
    invariances = _KERNEL_INVARIANCES
    float32_grams = True
    reference = "Kornblith et al., ICML 2019 (RBF kernel, sigma^2 = threshold^2 * median squared distance)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, threshold: float = 0.4) -> Prepared:
        return _cka_rbf_prepare(statistic, threshold)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols)


class MinibatchCKA(Measure):
    """Minibatch linear CKA (Nguyen et al. 2021): unbiased HSIC summed over equal-size batches.

        CKA_mb = Σₜ HSIC₁(Kₜ, Lₜ) / √(Σₜ HSIC₁(Kₜ, Kₜ) · Σₜ HSIC₁(Lₜ, Lₜ)),

    Kₜ the linear Gram of the t-th batch of consecutive samples (a last partial batch is left
    out). Not the mean of per-batch CKA values. Invariant to orthogonal transforms, isotropic
    scaling and translation.

    Parameters
    ----------
    batch_size : int
        Required; at least 4 and at most the number of samples.

    References
    ----------
    Nguyen, Raghu & Kornblith, "Do Wide and Deep Networks Learn the Same Things?", ICLR 2021.
    """

    name = "cka_minibatch"
    order = 13
    statistic = "gram_blocks"
    options = {"batch_size": Option(None, lambda b: not isinstance(b, bool) and isinstance(b, int) and b >= 4,
                                    "{name} must be an integer ≥ 4 (unbiased HSIC needs 4 samples), got {value!r}.")}
    invariances = _KERNEL_INVARIANCES
    float32_grams = True
    reference = "Nguyen, Raghu & Kornblith, ICLR 2021 (unbiased HSIC summed over batches)"

    @classmethod
    def prepare(cls, statistic: list[torch.Tensor], *, confounder: Any = None,
                batch_size: int | None = None) -> Prepared:
        return _cka_minibatch_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols, clamp=None)
