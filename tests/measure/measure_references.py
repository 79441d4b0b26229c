"""Direct float64 NumPy (and SciPy) transcriptions of every measure's formula (DESIGN.md §4).

The references build the centring matrix H explicitly and follow the papers' formulas literally;
the library never forms H, streams its statistics and uses other algebra, so agreement to 1e-9 is
evidence that both are right. ``REFERENCES`` maps each registered measure name to its reference;
the contract test (``test_measure_contract.py``) fails for a registered measure missing here.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from scipy.spatial.distance import pdist

EPS = np.finfo(np.float64).eps


def _h(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0)


# ----------------------------------------------------------------------------- CKA family
def ref_hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """Biased HSIC, Kornblith et al. 2019: tr(HKH HLH) / (n − 1)²."""
    h = _h(len(k))
    return float(np.trace(h @ k @ h @ h @ l_ @ h)) / (len(k) - 1) ** 2


def ref_cka_kernel(k: np.ndarray, l_: np.ndarray) -> float:
    return ref_hsic(k, l_) / np.sqrt(ref_hsic(k, k) * ref_hsic(l_, l_))


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    return ref_cka_kernel(x @ x.T, y @ y.T)


def ref_hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (JMLR 2012) eq. 5, with K̂, L̂ the Grams with zeroed diagonals."""
    n = len(k)
    kh, lh = k.copy(), l_.copy()
    np.fill_diagonal(kh, 0)
    np.fill_diagonal(lh, 0)
    one = np.ones(n)
    trace = np.trace(kh @ lh)
    sums = (one @ kh @ one) * (one @ lh @ one) / ((n - 1) * (n - 2))
    cross = 2 / (n - 2) * (one @ kh @ lh @ one)
    return float(trace + sums - cross) / (n * (n - 3))


def ref_cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    # HSIC₁ of a linear kernel is translation invariant: evaluate it on column-centred features so the
    # reference itself does not lose digits to the uncentred Gram's large entries
    x, y = _center(x), _center(y)
    k, l_ = x @ x.T, y @ y.T
    return ref_hsic_unbiased(k, l_) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l_, l_))


def ref_rbf(x: np.ndarray, threshold: float) -> np.ndarray:
    """exp(−‖xi − xj‖² / (2σ²)), σ² = threshold² · median of all n² squared distances (diagonal included)."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    sigma2 = threshold**2 * np.median(d2)
    return np.exp(-d2 / (2 * sigma2))


def ref_cka_rbf(x, y, threshold=0.4):
    return ref_cka_kernel(ref_rbf(x, threshold), ref_rbf(y, threshold))


def ref_cka_minibatch(x, y, batch_size):
    """Nguyen et al. 2021: Σ_t HSIC₁(K_t, L_t) / √(Σ_t HSIC₁(K_t, K_t) Σ_t HSIC₁(L_t, L_t)), full batches only."""
    kk = ll = kl = 0.0
    for t in range(len(x) // batch_size):
        xb, yb = x[t * batch_size:(t + 1) * batch_size], y[t * batch_size:(t + 1) * batch_size]
        xb, yb = _center(xb), _center(yb)
        k, l_ = xb @ xb.T, yb @ yb.T
        kk += ref_hsic_unbiased(k, k)
        ll += ref_hsic_unbiased(l_, l_)
        kl += ref_hsic_unbiased(k, l_)
    return kl / np.sqrt(kk * ll)


def unit_gram(a: np.ndarray) -> np.ndarray:
    """Gram of the column-centred, unit-Frobenius matrix."""
    ac = _center(a)
    ac = ac / np.linalg.norm(ac)
    return ac @ ac.T


def ref_dcka(x, y, z, psd=False):
    """Cui et al. 2022: regress vec(K) on [1, vec(K₀)] by least squares, linear CKA of the residuals."""
    k0 = unit_gram(z)
    design = np.stack([np.ones(k0.size), k0.ravel()], axis=1)
    residuals = []
    for a in (x, y):
        k = unit_gram(a)
        coef, *_ = np.linalg.lstsq(design, k.ravel(), rcond=None)
        r = (k.ravel() - design @ coef).reshape(k.shape)
        if psd:
            w, v = np.linalg.eigh(r)
            r = (v * np.clip(w, 0, None)) @ v.T
        residuals.append(r)
    return ref_cka_kernel(*residuals)


# ----------------------------------------------------------------------------- Procrustes, CCA, regression
def _basis(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the centred columns: QR when full column rank, else the SVD's left vectors."""
    xc = _center(x)
    n, p = xc.shape
    if p < n - 1:
        return np.linalg.qr(xc)[0]
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, s > s.max() * max(n, p) * EPS * 10]


def ref_procrustes(x, y):
    """Ding et al. 2021: ‖XᵀY‖_* of centred, unit-Frobenius, zero-padded X and Y."""
    xc, yc = _center(x), _center(y)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    width = max(xc.shape[1], yc.shape[1])
    xp = np.pad(xc, ((0, 0), (0, width - xc.shape[1])))
    yp = np.pad(yc, ((0, 0), (0, width - yc.shape[1])))
    return np.linalg.svd(xp.T @ yp, compute_uv=False).sum()


def ref_procrustes_euclidean(x, y):
    """Williams et al. 2021: √(2 − 2‖XᵀY‖_*)."""
    return float(np.sqrt(max(0.0, 2 - 2 * min(1.0, ref_procrustes(x, y)))))


def ref_procrustes_angular(x, y):
    """Williams et al. 2021: arccos ‖XᵀY‖_*."""
    return float(np.arccos(np.clip(ref_procrustes(x, y), -1.0, 1.0)))


def ref_cca_rhos(x, y):
    """Canonical correlations: singular values of Q_Xᵀ Q_Y."""
    qx, qy = _basis(x), _basis(y)
    return np.linalg.svd(qx.T @ qy, compute_uv=False)[: min(qx.shape[1], qy.shape[1])]


def ref_cca(x, y, output="rho"):
    """Mean canonical correlation ρ̄ (Raghu et al. 2017), or R²_CCA = ‖Q_Yᵀ Q_X‖²_F / p_X."""
    if output == "r2":
        qx, qy = _basis(x), _basis(y)
        return np.sum((qy.T @ qx) ** 2) / qx.shape[1]
    return ref_cca_rhos(x, y).mean()


def ref_svcca(x, y, variance=0.99):
    """Raghu et al. 2017: CCA of the top principal components explaining ``variance`` of each layer."""
    def reduce(a):
        u, s, _ = np.linalg.svd(_center(a), full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(share, variance)) + 1
        return u[:, :k] * s[:k]

    return ref_cca_rhos(reduce(x), reduce(y)).mean()


def ref_pwcca(x, y):
    """Morcos et al. 2018: ρ weighted by αᵢ = Σⱼ |⟨hᵢ, xⱼ⟩|, hᵢ the canonical variables of x."""
    qx, qy = _basis(x), _basis(y)
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ a
    alpha = np.abs(h.T @ _center(x)).sum(axis=1)
    return np.sum(alpha * rho) / np.sum(alpha)


def ref_linreg(x, y):
    """R² of the least-squares fit of centred x from centred y."""
    xc, yc = _center(x), _center(y)
    coef = np.linalg.lstsq(yc, xc, rcond=None)[0]
    return 1 - np.sum((xc - yc @ coef) ** 2) / np.sum(xc**2)


# ----------------------------------------------------------------------------- RSA, k-NN
def ref_rsa(x, y, rdm="correlation", compare="spearman"):
    """Kriegeskorte et al. 2008: Spearman (or Pearson) correlation of the RDMs' upper triangles."""
    dx, dy = pdist(x, rdm), pdist(y, rdm)
    test = scipy.stats.spearmanr if compare == "spearman" else scipy.stats.pearsonr
    return test(dx, dy)[0]


def ref_mutual_knn(x, y, k=10):
    """Huh et al. 2024: mean |N_k^X(i) ∩ N_k^Y(i)| / k over samples, cosine neighbourhoods."""
    def knn(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]

    nx, ny = knn(x), knn(y)
    return np.mean([len(set(nx[i]) & set(ny[i])) / k for i in range(len(x))])


def ref_sketch_vectors(x, sketch_size=65536, width=2048, seed=0):
    """φ₁, φ₂ of ``measure.functional.sketch`` by their definitions: dense hashing matrices S_c (p × d, one ±1
    per row; none when p ≤ d), Z̃_c = H X S_c, and the CountSketch of the n × n matrix Z̃_c Z̃_cᵀ with bucket
    h₁(i) + h₂(i') mod s and sign σ₁(i) σ₂(i'), summed entry by entry. The random draws are the library's
    (``sample_hashes``, ``feature_hashes``); the algebra is this file's own."""
    from measure.functional.sketch import feature_hashes, sample_hashes

    n, p = x.shape
    buckets, signs = (a.numpy() for a in sample_hashes(n, sketch_size, seed))
    bucket = (buckets[0][:, None] + buckets[1][None, :]) % sketch_size
    sign = signs[0][:, None] * signs[1][None, :]
    phis = []
    for copy in (0, 1):
        if p > width:
            hb, hs = (a.numpy() for a in feature_hashes(0, p, width, seed, copy))
            s_matrix = np.zeros((p, width))
            s_matrix[np.arange(p), hb] = hs
            z = _h(n) @ x @ s_matrix
        else:
            z = _h(n) @ x
        phi = np.zeros(sketch_size)
        np.add.at(phi, bucket.ravel(), (sign * (z @ z.T)).ravel())
        phis.append(phi)
    return phis


def ref_cka_sketch(x, y, sketch_size=65536, width=2048, seed=0):
    """½(⟨φ₁(X), φ₂(Y)⟩ + ⟨φ₂(X), φ₁(Y)⟩) / √(⟨φ₁(X), φ₂(X)⟩ ⟨φ₁(Y), φ₂(Y)⟩), clamped to [0, 1]."""
    a1, a2 = ref_sketch_vectors(np.asarray(x, np.float64), sketch_size, width, seed)
    b1, b2 = ref_sketch_vectors(np.asarray(y, np.float64), sketch_size, width, seed)
    value = 0.5 * (a1 @ b2 + a2 @ b1) / np.sqrt((a1 @ a2) * (b1 @ b2))
    return float(np.clip(value, 0.0, 1.0))


REFERENCES = {
    "cka": ref_cka,
    "cka_debiased": ref_cka_debiased,
    "cka_rbf": ref_cka_rbf,
    "cka_sketch": ref_cka_sketch,
    "cka_minibatch": ref_cka_minibatch,
    "dcka": ref_dcka,
    "procrustes": ref_procrustes,
    "procrustes_euclidean": ref_procrustes_euclidean,
    "procrustes_angular": ref_procrustes_angular,
    "cca": ref_cca,
    "svcca": ref_svcca,
    "pwcca": ref_pwcca,
    "linreg": ref_linreg,
    "rsa": ref_rsa,
    "mutual_knn": ref_mutual_knn,
}
"""Measure name -> float64 reference ``f(x, y, [z,] **options)``; dcka's takes the inputs z third."""

REQUIRED_OPTIONS = {"cka_minibatch": {"batch_size": 8}}
"""Options a measure has no default for, as the contract test passes them."""
