"""Gram-matrix kernels shared by the kernel measures (CKA family, dCKA, RSA...).

All functions take and return float64 tensors on any device. Nothing here
builds the centering matrix H = I − 11ᵀ/n: H K H is computed from row and
column means in O(n²).
"""

from __future__ import annotations

import torch

__all__ = [
    "center_gram",
    "linear_gram",
    "median",
    "rbf_gram",
    "squared_distances",
    "unbiased_hsic_vectors",
]


SYMMETRIC_BLOCK_ROWS = 512


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """K = X Xᵀ for X of shape (n_samples, n_features), in float64.

    K is symmetric, which a plain matmul does not exploit: for n > 512 the rows
    are cut in blocks of 512 and only the blocks K[a, b] with a ≤ b are
    multiplied (about half the flops for large n), the others are their
    transposes. The result is exactly symmetric.
    """
    x = x.reshape(len(x), -1).to(torch.float64)
    n = len(x)
    if n <= SYMMETRIC_BLOCK_ROWS:
        return x @ x.T
    gram = torch.empty((n, n), dtype=torch.float64, device=x.device)
    starts = range(0, n, SYMMETRIC_BLOCK_ROWS)
    for a0 in starts:
        a1 = min(n, a0 + SYMMETRIC_BLOCK_ROWS)
        upper = x[a0:a1] @ x[a0:].T  # K[a, b] for every b ≥ a, in one product
        diagonal = upper[:, : a1 - a0]
        gram[a0:a1, a0:a1] = torch.triu(diagonal) + torch.triu(diagonal, 1).T
        gram[a0:a1, a1:] = upper[:, a1 - a0:]
        gram[a1:, a0:a1] = upper[:, a1 - a0:].T
    return gram


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H for symmetric K, via row/column means: K − 1mᵀ − m1ᵀ + m̄."""
    row_means = gram.mean(dim=0)
    return gram - row_means[None, :] - row_means[:, None] + row_means.mean()


def squared_distances(gram: torch.Tensor) -> torch.Tensor:
    """‖xᵢ − xⱼ‖² = Kᵢᵢ + Kⱼⱼ − 2Kᵢⱼ from a linear Gram, clipped at 0 against round-off."""
    diag = torch.diagonal(gram)
    return (diag[:, None] + diag[None, :] - 2 * gram).clamp_min_(0)


def median(values: torch.Tensor) -> torch.Tensor:
    """Median of all entries, averaging the two middle values when their count is even (as NumPy)."""
    flat = values.reshape(-1)
    k = flat.numel()
    upper = torch.kthvalue(flat, k // 2 + 1).values
    if k % 2:
        return upper
    return (torch.kthvalue(flat, k // 2).values + upper) / 2


def rbf_gram(gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """RBF Gram exp(−‖xᵢ − xⱼ‖² / (2σ²)) with σ² = threshold² · median of all n² squared distances.

    Kornblith et al. (ICML 2019) bandwidth: the median is taken over the full
    n × n matrix of squared distances, zero diagonal included, as in their code.
    """
    dist = squared_distances(gram)
    sigma2 = threshold**2 * median(dist)
    return torch.exp(-dist / (2 * sigma2))


def unbiased_hsic_vectors(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors v(K), w(K) with ⟨v(K), w(L)⟩ = HSIC₁(K, L), Song et al. (JMLR 2012) eq. 5.

    With K̂ the Gram with zeroed diagonal, u = K̂1 and s = 1ᵀK̂1,

        HSIC₁ = [tr(K̂L̂) + s_K s_L / ((n−1)(n−2)) − 2/(n−2) · u_Kᵀu_L] / (n(n−3)),

    so v = [vec K̂, s, u] and w = [vec K̂, s/((n−1)(n−2)), −2/(n−2) · u] / (n(n−3)).
    The estimator is bilinear, hence one matrix product gives every layer pair,
    and sums over minibatches are concatenations. Needs n ≥ 4.
    """
    n = gram.shape[0]
    if n < 4:
        raise ValueError(f"Unbiased HSIC needs at least 4 samples, got {n}.")
    k_hat = gram.clone()
    k_hat.fill_diagonal_(0)
    u = k_hat.sum(dim=1)
    s = u.sum().reshape(1)
    scale = 1.0 / (n * (n - 3))
    v = torch.cat([k_hat.reshape(-1), s, u])
    w = torch.cat([k_hat.reshape(-1), s / ((n - 1) * (n - 2)), u * (-2.0 / (n - 2))]) * scale
    return v, w
