"""Centered kernel alignment: linear, debiased, RBF and minibatch.

Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network
Representations Revisited", ICML 2019; unbiased HSIC from Song et al., JMLR
2012; the minibatch estimator from Nguyen, Raghu & Kornblith, ICLR 2021.

Each measure has a ``_<name>_prepare(gram, ...)`` kernel that turns one
layer's linear Gram K = X Xᵀ (float64, n × n) into a ``Prepared`` statistic;
the classes of ``measure.measures.cka`` pair them, and ``measure.compare``
(``measure.cka(x, y)`` ...) runs them on arrays. The feature route (linear CKA
from moments of the features instead of n × n Grams) is in ``moments.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MeasureError
from ..validation import check_min_samples
from ._bilinear import CANCELLATION_RTOL, UNDEFINED_RTOL, Prepared, normalized
from .gram import center_gram, linear_gram, rbf_gram, unbiased_hsic_vectors

__all__ = ["batch_grams"]


def _cka_prepare(gram: torch.Tensor) -> Prepared:
    """Biased linear CKA statistic: vec(K̃) / ‖K̃‖_F with K̃ = H K H.

    CKA(K, L) = ⟨K̃, L̃⟩ / (‖K̃‖_F ‖L̃‖_F) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F).
    """
    centered = center_gram(gram).reshape(-1)
    return normalized(centered, centered, torch.dot(gram.reshape(-1), gram.reshape(-1)), "‖HKH‖²")


def _cka_debiased_prepare(gram: torch.Tensor) -> Prepared:
    """Debiased linear CKA statistic: HSIC₁(K, L) / √(HSIC₁(K, K) HSIC₁(L, L)).

    HSIC₁ is Song et al.'s unbiased estimator (see ``unbiased_hsic_vectors``),
    which needs n ≥ 4. HSIC₁(K, K) can be ≤ 0 for small n; the value is then
    undefined and reported as such.
    """
    check_min_samples(gram.shape[0], 4, "cka_debiased", "unbiased HSIC")
    # HSIC₁ of a linear kernel is translation invariant and H K H = Xc Xcᵀ, so the centred Gram gives
    # the same value while avoiding the cancellation of large uncentred entries (activations with a mean).
    centered = center_gram(gram)
    scale = _debiased_scale(gram, centered)
    v, w = unbiased_hsic_vectors(centered, inplace=True)  # the centred Gram is this function's own
    return normalized(v, w, scale, "unbiased HSIC(K, K)", zero_reason=_SINGLE_SAMPLE)


_SINGLE_SAMPLE = "the layer is constant, or differs from a constant in a single sample"


def _debiased_scale(gram: torch.Tensor, centered: torch.Tensor) -> torch.Tensor:
    """Magnitude for ``normalized``'s threshold: ‖K‖²/n² for a constant layer (second-order round-off of
    the centring), and ‖HKH‖²/n² · CANCELLATION_RTOL / UNDEFINED_RTOL for the first-order round-off of HSIC₁."""
    n = gram.shape[0]
    raw, cen = (torch.dot(m.reshape(-1), m.reshape(-1)) for m in (gram, centered))  # ‖K‖², ‖HKH‖², no copies
    return torch.maximum(raw, cen * (CANCELLATION_RTOL / UNDEFINED_RTOL)) / n**2


def _cka_rbf_prepare(gram: torch.Tensor, threshold: float = 0.4) -> Prepared:
    """RBF CKA statistic: biased CKA of the RBF Grams (bandwidth as in ``rbf_gram``)."""
    if not threshold > 0:
        raise MeasureError(f"threshold must be positive, got {threshold!r}.")
    kernel = rbf_gram(gram, threshold)
    if not torch.isfinite(kernel).all():  # median distance 0: more than half the samples coincide
        empty = torch.zeros(gram.numel(), dtype=gram.dtype, device=gram.device)
        return Prepared(empty, empty, defined=False,
                        reason="the median pairwise distance is zero (most samples are identical)")
    centered = center_gram(kernel).reshape(-1)
    return normalized(centered, centered, torch.tensor(float(gram.shape[0]) ** 2), "‖H K_rbf H‖²")


def _cka_minibatch_prepare(blocks: Sequence[torch.Tensor]) -> Prepared:
    """Minibatch CKA statistic (Nguyen et al. 2021): unbiased HSIC summed over equal-size batches.

    CKA_mb = Σₜ HSIC₁(Kₜ, Lₜ) / √(Σₜ HSIC₁(Kₜ, Kₜ) · Σₜ HSIC₁(Lₜ, Lₜ)), with Kₜ the
    Gram of batch t. Because HSIC₁ is bilinear, the sums are inner products of
    the concatenated per-batch vectors. This is *not* the mean of per-batch CKA
    values, which is biased and depends on the batch size.
    """
    centered = [center_gram(block) for block in blocks]  # see _cka_debiased_prepare
    parts = [unbiased_hsic_vectors(c) for c in centered]
    v = torch.cat([p[0] for p in parts])
    w = torch.cat([p[1] for p in parts])
    scale = sum(_debiased_scale(b, c) for b, c in zip(blocks, centered, strict=True))
    return normalized(v, w, scale, "summed unbiased HSIC(K, K)", zero_reason=_SINGLE_SAMPLE)


def batch_grams(x: torch.Tensor, batch_size: int, precision: str = "float64") -> list[torch.Tensor]:
    """Gram matrices of consecutive batches of ``batch_size`` rows; a final partial batch is dropped.

    ``precision`` as in ``linear_gram`` (float32: each batch shifted by its own column means).

    >>> x = torch.arange(10.0, dtype=torch.float64).reshape(5, 2)
    >>> [tuple(g.shape) for g in batch_grams(x, 2)]
    [(2, 2), (2, 2)]
    """
    n_batches = len(x) // batch_size
    return [linear_gram(x[i * batch_size:(i + 1) * batch_size], precision) for i in range(n_batches)]
