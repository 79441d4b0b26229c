"""Centered kernel alignment: linear, debiased, RBF and minibatch.

Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network
Representations Revisited", ICML 2019; unbiased HSIC from Song et al., JMLR
2012; the minibatch estimator from Nguyen, Raghu & Kornblith, ICLR 2021.

Each measure has a ``_<name>_prepare(gram, ...)`` kernel that turns one
layer's linear Gram K = X Xᵀ (float64, n × n) into a ``Prepared`` statistic,
and a public function ``<name>(x, y)`` on arrays of shape (n_samples, ...).
The store engine and the in-memory API call the same kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import as_samples_matrix, check_same_samples
from ._bilinear import Prepared, bilinear_matrix, normalized
from .gram import center_gram, linear_gram, rbf_gram, unbiased_hsic_vectors

__all__ = ["cka", "cka_debiased", "cka_minibatch", "cka_rbf"]


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
    n = gram.shape[0]
    if n < 4:
        raise ValueError(f"cka_debiased needs at least 4 samples (unbiased HSIC), got {n}.")
    v, w = unbiased_hsic_vectors(gram)
    return normalized(v, w, torch.dot(gram.reshape(-1), gram.reshape(-1)) / n**2, "unbiased HSIC(K, K)")


def _cka_rbf_prepare(gram: torch.Tensor, threshold: float = 0.4) -> Prepared:
    """RBF CKA statistic: biased CKA of the RBF Grams (bandwidth as in ``rbf_gram``)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}.")
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
    parts = [unbiased_hsic_vectors(block) for block in blocks]
    v = torch.cat([p[0] for p in parts])
    w = torch.cat([p[1] for p in parts])
    scale = sum(torch.dot(b.reshape(-1), b.reshape(-1)) / b.shape[0] ** 2 for b in blocks)
    return normalized(v, w, scale, "summed unbiased HSIC(K, K)")


def batch_grams(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Gram matrices of consecutive batches of ``batch_size`` rows; a final partial batch is dropped."""
    n_batches = len(x) // batch_size
    return [linear_gram(x[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def _pair(x, y, prepare, **kwargs) -> float:
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    px, py = prepare(linear_gram(x), **kwargs), prepare(linear_gram(y), **kwargs)
    return float(bilinear_matrix([px], [py])[0, 0])


def cka(x, y) -> float:
    """Linear CKA (biased HSIC) between x (n, ...) and y (n, ...), exact over all samples.

    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    >>> round(cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]), 12)
    1.0
    """
    return _pair(x, y, _cka_prepare)


def cka_debiased(x, y) -> float:
    """Linear CKA with Song et al.'s unbiased HSIC; ≈ 0 for independent data. Needs n ≥ 4."""
    return _pair(x, y, _cka_debiased_prepare)


def cka_rbf(x, y, threshold: float = 0.4) -> float:
    """RBF-kernel CKA, σ² = threshold² · median squared distance (Kornblith et al. 2019)."""
    return _pair(x, y, _cka_rbf_prepare, threshold=threshold)


def cka_minibatch(x, y, batch_size: int) -> float:
    """Nguyen et al.'s minibatch CKA over consecutive batches of ``batch_size`` samples."""
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    px = _cka_minibatch_prepare(batch_grams(x, batch_size))
    py = _cka_minibatch_prepare(batch_grams(y, batch_size))
    return float(bilinear_matrix([px], [py])[0, 0])
