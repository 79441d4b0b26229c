"""Gram-matrix kernels shared by the kernel measures (CKA family, dCKA, RSA...).

All functions take and return float64 tensors on any device. Nothing here
builds the centering matrix H = I − 11ᵀ/n: H K H is computed from row and
column means in O(n²).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..validation import check_min_samples

__all__ = [
    "PRECISIONS",
    "PRECISION_CHOICES",
    "center_gram",
    "column_means",
    "cross_gram",
    "linear_gram",
    "median",
    "rbf_gram",
    "squared_distances",
    "unbiased_hsic_vectors",
]


SYMMETRIC_BLOCK_ROWS = 256  # see _row_blocks
FLOAT32_FEATURE_BLOCK = 4096
PRECISIONS = ("float64", "float32")  # how a Gram is formed
PRECISION_CHOICES = ("auto", *PRECISIONS)  # what a user may ask for
FLOAT32_DATA = ("float32", "float16", "bfloat16")  # data dtypes the float32 scheme fits under "auto"


def resolve_precision(precision: str, data_dtype: str | torch.dtype, float32_grams: bool = True) -> str:
    """The Gram precision ("float64" or "float32") for data of ``data_dtype`` asked as ``precision``.

    ``"auto"`` is ``"float32"`` (the compensated scheme of ``linear_gram``) for data held in float32,
    float16 or bfloat16, whose own rounding (u = 2⁻²⁴ or coarser) is already of the order of the
    scheme's error, and ``"float64"`` for float64 or integer data, and always for measures that need
    float64 Grams (``float32_grams=False``: they use the Gram's small eigenvalues). An explicit
    ``"float64"`` or ``"float32"`` is returned as given (the engine refuses float32 for those measures).
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}.")
    if precision != "auto":
        return precision
    name = str(data_dtype).removeprefix("torch.")
    return "float32" if float32_grams and name in FLOAT32_DATA else "float64"


def _row_blocks(n: int) -> int:
    """Rows per block of the symmetric product: 256, or 128 when n ≤ 512 (see ``benchmarks/bench_measure.py``)."""
    return SYMMETRIC_BLOCK_ROWS if n > 2 * SYMMETRIC_BLOCK_ROWS else SYMMETRIC_BLOCK_ROWS // 2


def _symmetric_product(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """X Xᵀ in the dtype of X from the upper row blocks only.

    K is symmetric, which a plain matmul does not exploit: for n > 128 the rows
    are cut in blocks of 256 (128 when n ≤ 512) and only the blocks K[a, b] with
    a ≤ b are multiplied (about half the flops for large n), the others are
    their transposes. The result is exactly symmetric.

    With ``out`` (the float64 sum of the float32 scheme) the upper row blocks,
    diagonal blocks whole, are added into ``out`` and the lower ones left alone:
    the caller mirrors the upper triangle once at the end (``_mirror_upper``), so
    no second n × n matrix is held and the transposed writes happen once, not per
    call. The result is the same, bit for bit, as symmetrising every call.
    """
    n = len(x)
    rows = _row_blocks(n)
    if n <= rows:
        return x @ x.T if out is None else out.add_(x @ x.T)
    accumulate = out is not None
    if out is None:
        out = torch.empty((n, n), dtype=x.dtype, device=x.device)
    for a0 in range(0, n, rows):
        a1 = min(n, a0 + rows)
        upper = x[a0:a1] @ x[a0:].T  # K[a, b] for every b ≥ a, in one product
        if accumulate:  # the whole diagonal block: its upper triangle is mirrored once, by _mirror_upper
            out[a0:a1, a0:] += upper
            continue
        diagonal = upper[:, : a1 - a0]
        out[a0:a1, a0:a1] = torch.triu(diagonal) + torch.triu(diagonal, 1).T
        out[a0:a1, a1:] = upper[:, a1 - a0:]
        out[a1:, a0:a1] = upper[:, a1 - a0:].T
    return out


def _mirror_upper(gram: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle that ``_symmetric_product(x, out=gram)`` summed onto the lower one:
    the upper blocks onto the lower blocks, and within each diagonal block its upper triangle."""
    n = len(gram)
    rows = _row_blocks(n)
    if n > rows:
        for a0 in range(0, n, rows):
            a1 = min(n, a0 + rows)
            diagonal = gram[a0:a1, a0:a1]
            gram[a0:a1, a0:a1] = torch.triu(diagonal) + torch.triu(diagonal, 1).T
            gram[a1:, a0:a1] = gram[a0:a1, a1:].T
    return gram


def _float64_matvec(x: torch.Tensor, v: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """X v in float64 for float32 X, converting 128 rows at a time (so the converted copy stays in the CPU cache)."""
    return torch.cat([x[i:i + rows].to(torch.float64) @ v for i in range(0, len(x), rows)])


_matmul_precision_lock = threading.Lock()
_matmul_precision_state = {"depth": 0, "saved": "highest"}


@contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Full float32 products while inside: TF32 / bfloat16 shortcuts (``torch.set_float32_matmul_precision``
    "high" or "medium", set for training) would cost the float32 scheme its accuracy, so they are off here.

    The setting is process-wide, so threads share one count: the first in saves and raises it, the last
    out restores it (Gram tasks run on several threads under dask's threaded scheduler).
    """
    with _matmul_precision_lock:
        state = _matmul_precision_state
        if state["depth"] == 0:
            state["saved"] = torch.get_float32_matmul_precision()
            if state["saved"] != "highest":
                torch.set_float32_matmul_precision("highest")
        state["depth"] += 1
    try:
        yield
    finally:
        with _matmul_precision_lock:
            state["depth"] -= 1
            if state["depth"] == 0 and state["saved"] != "highest":
                torch.set_float32_matmul_precision(state["saved"])


def _shifted_float32_product(xa: torch.Tensor, xb: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """X_a X_bᵀ (X_b = X_a when ``xb`` is None) in float64, from float32 products of shifted rows.

    With a shift c (rounded to float32; the column means keep the shifted values
    small), X' = X − 1cᵀ and r = X'c, the identity

        X_a X_bᵀ = X'_a X'_bᵀ + r_a 1ᵀ + 1 r_bᵀ + cᵀc

    is exact. X' is formed once, rounded to float32 (for float32 inputs the
    subtraction is a single correctly rounded float32 operation), and X'_a X'_bᵀ
    is multiplied in float32 over blocks of 4096 features, each block's product
    added to a float64 sum. Shifting first removes the large common offset that
    makes a plain float32 X Xᵀ lose digits when activations have a large mean
    (ReLU layers). The error is that of float32 dot products of centred values
    over 4096 terms, about 1e-7 of the largest |X'_a X'_bᵀ| entry. The offsets r
    and cᵀc are float64 products of the same float32 X'.
    """
    same = xb is None
    xb = xa if same else xb
    shift32 = shift.to(torch.float32)
    shift64 = shift32.to(torch.float64)
    gram = torch.zeros((len(xa), len(xb)), dtype=torch.float64, device=xa.device)
    ra = torch.zeros(len(xa), dtype=torch.float64, device=xa.device)
    rb = ra if same else torch.zeros(len(xb), dtype=torch.float64, device=xa.device)

    # one shifted block per operand, reused for every feature block (fresh ones cost page faults)
    width = min(FLOAT32_FEATURE_BLOCK, xa.shape[1])
    buffer_a = torch.empty((len(xa), width), dtype=torch.float32, device=xa.device)
    buffer_b = buffer_a if same else torch.empty((len(xb), width), dtype=torch.float32, device=xa.device)

    def shifted(x: torch.Tensor, a: int, buffer: torch.Tensor) -> torch.Tensor:
        block, c = x[:, a:a + FLOAT32_FEATURE_BLOCK], shift32[a:a + FLOAT32_FEATURE_BLOCK]
        out = buffer[:, : block.shape[1]]
        if block.dtype == torch.float32:
            return torch.sub(block, c, out=out)
        return out.copy_(block.to(torch.float64) - c.to(torch.float64))

    with _ieee_float32_matmul():
        for a in range(0, xa.shape[1], FLOAT32_FEATURE_BLOCK):
            c = shift64[a:a + FLOAT32_FEATURE_BLOCK]
            block_a = shifted(xa, a, buffer_a)
            ra += _float64_matvec(block_a, c)
            if same:
                _symmetric_product(block_a, out=gram)
            else:
                block_b = shifted(xb, a, buffer_b)
                rb += _float64_matvec(block_b, c)
                gram += block_a @ block_b.T
    if same:
        _mirror_upper(gram)
    constant = shift64 @ shift64
    for i in range(0, len(gram), SYMMETRIC_BLOCK_ROWS):  # in place, by row blocks: no second n × n matrix
        rows = gram[i:i + SYMMETRIC_BLOCK_ROWS]
        rows.add_(ra[i:i + SYMMETRIC_BLOCK_ROWS, None] + rb[None, :]).add_(constant)
    if same and len(gram) <= SYMMETRIC_BLOCK_ROWS // 2:  # a plain product (small n) is not exactly symmetric
        gram = (gram + gram.T) / 2
    return gram  # otherwise exactly symmetric: r_i + r_j = r_j + r_i, and the block products are


def cross_gram(xa: torch.Tensor, xb: torch.Tensor, precision: str = "float64",
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """X_a X_bᵀ in float64, the off-diagonal block of an out-of-core Gram (see ``linear_gram``).

    ``shift`` (float32 precision only) must be the same for every block of one
    Gram; the column means of ``xa`` by default.
    """
    _check_precision(precision)
    xa, xb = xa.reshape(len(xa), -1), xb.reshape(len(xb), -1)
    if precision == "float32":
        return _shifted_float32_product(xa, xb, column_means(xa) if shift is None else shift)
    return xa.to(torch.float64) @ xb.to(torch.float64).T


def column_means(x: torch.Tensor) -> torch.Tensor:
    """Column means, in one matrix-vector product (any shift keeps the identity exact; means keep it small).

    Summed in float32 at least (a float16 sum of many rows overflows).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with _ieee_float32_matmul():  # the shift of the float32 scheme: the same whatever the matmul setting
        return torch.ones(len(x), dtype=dtype, device=x.device) @ x.to(dtype) / len(x)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")


def linear_gram(x: torch.Tensor, precision: str = "float64", shift: torch.Tensor | None = None) -> torch.Tensor:
    r"""K = X Xᵀ for X of shape (n_samples, n_features), returned in float64.

    ``precision="float64"`` (the default here) multiplies in float64.
    ``precision="float32"`` multiplies the shifted X' = X − 1cᵀ in float32 (c the column means,
    rounded to float32) over blocks of B = 4096 features, sums the block products in float64 and
    adds the exact offsets back in float64 (``_shifted_float32_product``): about twice as fast on
    CPUs and far more on most GPUs. ``shift`` (float32 only) replaces the column means as c.
    ``resolve_precision`` chooses between the two for ``precision="auto"``, the default of the
    engine, ``compare`` and ``CKA``: float32 for float32/float16 data, float64 otherwise.

    Error bound. Let u = 2⁻²⁴, H = I − 11ᵀ/n, X̃ = X − 1cᵀ and B' = min(B, n_features).
    Rounding X̃ to float32 changes each entry by at most u|X̃ᵢₖ|, and a float32 dot product of
    B' terms errs by at most γ_B' = B'u / (1 − B'u) times Σₖ|aₖbₖ| (Higham, *Accuracy and Stability
    of Numerical Algorithms*, 2002, §3.1); the float64 sums and offsets add O(2⁻⁵³). The offset terms
    r1ᵀ, 1rᵀ and cᵀc are removed exactly by centring, so the centred Gram K̃ = HKH every kernel
    measure uses satisfies, to first order in u,

    .. math::

        \frac{\lVert \Delta \tilde K \rVert_F}{\lVert \tilde K \rVert_F}
        \le \varepsilon_K = (B' + 2)\,u\,\frac{\operatorname{tr} \tilde K}{\lVert \tilde K \rVert_F}
        \le (B' + 2)\,u\,\sqrt{\operatorname{rank} \tilde K},

    independent of the mean of X (which is why the shift is taken) and of the column scales. For
    linear CKA, CKA(K, L) = ⟨K̃, L̃⟩ / (‖K̃‖_F ‖L̃‖_F), the first-order change is
    ⟨ΔK̃/‖K̃‖_F, L̂ − CKA·K̂⟩ with K̂, L̂ the normalised Grams, hence

    .. math::

        |\Delta \mathrm{CKA}| \le \sqrt{1 - \mathrm{CKA}^2}\,(\varepsilon_K + \varepsilon_L).

    This worst case assumes every rounding error has the same sign; with independent rounding
    errors the factor B' + 2 becomes O(√B') (Higham & Mary, SIAM J. Sci. Comput. 41, 2019), and
    blocked, fused-multiply-add BLAS kernels stay below that. The float32 rounding of the data
    itself (float32 activations, or the model run in float32) already perturbs K̃ by
    ≈ 2u·tr K̃ / ‖K̃‖_F relative, so the scheme adds an error of the order of the data's own. It
    does not resolve the Gram's small eigenvalues (errors of ε_K‖K̃‖_F in absolute terms), so the
    measures that whiten or take square roots of the Gram (``float32_grams = False``) use float64.
    """
    _check_precision(precision)
    x = x.reshape(len(x), -1)
    if precision == "float32":
        return _shifted_float32_product(x, None, column_means(x) if shift is None else shift)
    return _symmetric_product(x.to(torch.float64))


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H for symmetric K, via row/column means: K − 1mᵀ − m1ᵀ + m̄."""
    row_means = gram.mean(dim=0)
    centered = gram - row_means[None, :]  # one n × n result, finished in place (no temporaries)
    return centered.sub_(row_means[:, None]).add_(row_means.mean())


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


def unbiased_hsic_vectors(gram: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors v(K), w(K) with ⟨v(K), w(L)⟩ = HSIC₁(K, L), Song et al. (JMLR 2012) eq. 5.

    With K̂ the Gram with zeroed diagonal, u = K̂1 and s = 1ᵀK̂1,

        HSIC₁ = [tr(K̂L̂) + s_K s_L / ((n−1)(n−2)) − 2/(n−2) · u_Kᵀu_L] / (n(n−3)),

    so v = [vec K̂, s, u] and w = [vec K̂, s/((n−1)(n−2)), −2/(n−2) · u] / (n(n−3)).
    The estimator is bilinear, hence one matrix product gives every layer pair,
    and sums over minibatches are concatenations. Needs n ≥ 4. ``inplace``: zero the diagonal of
    ``gram`` itself (a matrix the caller made for this) instead of a copy's.
    """
    n = gram.shape[0]
    check_min_samples(n, 4, "Unbiased HSIC")
    k_hat = gram if inplace else gram.clone()
    k_hat.fill_diagonal_(0)
    u = k_hat.sum(dim=1)
    s = u.sum().reshape(1)
    scale = 1.0 / (n * (n - 3))
    v = torch.cat([k_hat.reshape(-1), s, u])
    w = torch.cat([k_hat.reshape(-1), s / ((n - 1) * (n - 2)), u * (-2.0 / (n - 2))]).mul_(scale)
    return v, w
