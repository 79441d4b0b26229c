"""Linear CKA, biased and debiased, from additive moments of the features (the feature route).

Kornblith et al., ICML 2019 (linear CKA) with Song et al.'s unbiased HSIC (JMLR 2012),
computed without n × n Grams; ``measure.accumulators.LinearCKAMatrix`` streams the moments.
The Gram-route kernels of the same measures are in ``cka.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._bilinear import UNDEFINED_RTOL

__all__ = ["MOMENT_NAMES"]

# Linear CKA, biased and debiased, from additive moments of the features instead of n × n Grams.
# With z = x − c (a fixed shift; both estimators are translation invariant), a = ‖z‖², w = y − d,
# b = ‖w‖², the moments of a chunk are sums over its samples. For layers X_1..X_LA (widths p_i,
# concatenated into P columns) and Y_1..Y_LB (widths q_j, Q columns):
#
#   n, sx = Σz (P), sy = Σw (Q), gx = ⊕ vec(Z_iᵀZ_i), gy = ⊕ vec(W_jᵀW_j),
#   ax = Σa (L_A), aax = Σa² (L_A), axx = Σ a_i z_i (P), and the same for y,
#   c = ZᵀW (P × Q), bx = Σ b_j z (P × L_B), ay = Σ a_i w (Q × L_A), ab = Σ a_i b_j (L_A × L_B).
#
# Every moment is a sum over samples, so chunk updates and merges are additions.

MOMENT_NAMES = ("n", "sx", "sy", "gx", "gy", "ax", "ay_", "aax", "bby", "axx", "byy", "c", "bx", "ay", "ab")


def _segment_matrix(sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Indicator matrix E (Σ sizes × len(sizes)) with E[k, i] = 1 when column k belongs to layer i."""
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                  torch.as_tensor(list(sizes), device=device))
    return torch.nn.functional.one_hot(ids, len(sizes)).to(dtype)


def _self_moments(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(s, g, a_sum, aa_sum, ax_sum, a) of shifted float64 blocks z_i (n × p_i): a_i = ‖z_i‖² per sample."""
    a = torch.stack([(z * z).sum(dim=1) for z in blocks], dim=1)  # (n, L)
    s = torch.cat([z.sum(dim=0) for z in blocks])
    g = torch.cat([(z.T @ z).reshape(-1) for z in blocks])
    axx = torch.cat([z.T @ a[:, i] for i, z in enumerate(blocks)])
    return s, g, a.sum(dim=0), (a * a).sum(dim=0), axx, a


def _cka_moments_update(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moments of one chunk: ``xs`` (layers of A) and ``ys`` (layers of B), shifted float64 (n × width) blocks.

    Returns a dict keyed by ``MOMENT_NAMES``; adding the dicts of two chunks gives the dict of both.
    """
    n = len(xs[0])
    sx, gx, ax, aax, axx, a = _self_moments(xs)
    sy, gy, by, bby, byy, b = _self_moments(ys)
    z = torch.cat(list(xs), dim=1) if len(xs) > 1 else xs[0]
    w = torch.cat(list(ys), dim=1) if len(ys) > 1 else ys[0]
    return {
        "n": torch.tensor(float(n), dtype=torch.float64, device=z.device),
        "sx": sx, "sy": sy, "gx": gx, "gy": gy, "ax": ax, "ay_": by, "aax": aax, "bby": bby, "axx": axx,
        "byy": byy, "c": z.T @ w, "bx": z.T @ b, "ay": w.T @ a, "ab": a.T @ b,
    }


def _block_norms(g: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split the concatenated vec(Z_iᵀZ_i) back into the p_i × p_i blocks."""
    out, start = [], 0
    for p in sizes:
        out.append(g[start:start + p * p].reshape(p, p))
        start += p * p
    return out


def _self_hsic(m: dict[str, torch.Tensor], side: str, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Per-layer (biased numerator, unbiased HSIC₁, Frobenius² of the uncentred Gram) of one side."""
    n = m["n"]
    s, g, a_sum, aa_sum, ax_sum = ((m["sx"], m["gx"], m["ax"], m["aax"], m["axx"]) if side == "x"
                                   else (m["sy"], m["gy"], m["ay_"], m["bby"], m["byy"]))
    biased, unbiased, scale = [], [], []
    start = 0
    for i, (gi, p) in enumerate(zip(_block_norms(g, sizes), sizes, strict=True)):
        si, axi = s[start:start + p], ax_sum[start:start + p]
        start += p
        centered = gi - torch.outer(si, si) / n
        biased.append((centered * centered).sum())
        trace = (gi * gi).sum() - aa_sum[i]
        total = si @ si - a_sum[i]
        u = si @ (gi @ si) - 2 * (si @ axi) + aa_sum[i]
        unbiased.append((trace + total * total / ((n - 1) * (n - 2)) - 2 * u / (n - 2)) / (n * (n - 3)))
        scale.append((gi * gi).sum())
    return torch.stack(biased), torch.stack(unbiased), torch.stack(scale)


def _cka_moments_compute(m: dict[str, torch.Tensor], sizes_x: Sequence[int],
                         sizes_y: Sequence[int]) -> dict[str, torch.Tensor]:
    """Biased and debiased linear CKA matrices (L_A × L_B) from the moments of all samples.

    Biased: HSIC ∝ ‖Xcᵀ Yc‖²_F with Xcᵀ Yc = Zᵀ W − (Σz)(Σw)ᵀ / n (the (n−1)² cancels in CKA).
    Debiased: Song et al.'s HSIC₁ with tr(K̂L̂) = ‖ZᵀW‖²_F − Σ a b, 1ᵀK̂1 = ‖Σz‖² − Σ a and
    1ᵀK̂L̂1 = (Σz)ᵀ ZᵀW (Σw) − (Σz)ᵀ Σ b z − (Σw)ᵀ Σ a w + Σ a b.

    Returns a dict with ``biased``/``debiased`` (L_A × L_B) and, per side, the self-statistics
    ``{biased,debiased,scale}_{x,y}`` used to decide where the value is undefined.
    """
    n = m["n"]
    dtype, device = m["c"].dtype, m["c"].device
    ex, ey = _segment_matrix(sizes_x, dtype, device), _segment_matrix(sizes_y, dtype, device)
    sx, sy, c = m["sx"], m["sy"], m["c"]
    centered = c - torch.outer(sx, sy) / n
    biased = ex.T @ (centered * centered) @ ey
    trace = ex.T @ (c * c) @ ey - m["ab"]
    total_x = ex.T @ (sx * sx) - m["ax"]
    total_y = ey.T @ (sy * sy) - m["ay_"]
    u = (ex.T @ (sx[:, None] * c * sy[None, :]) @ ey - ex.T @ (sx[:, None] * m["bx"])
         - (ey.T @ (sy[:, None] * m["ay"])).T + m["ab"])
    debiased = (trace + torch.outer(total_x, total_y) / ((n - 1) * (n - 2)) - 2 * u / (n - 2)) / (n * (n - 3))
    bx_, ux_, kx_ = _self_hsic(m, "x", sizes_x)
    by_, uy_, ky_ = _self_hsic(m, "y", sizes_y)
    return {"biased": biased, "debiased": debiased, "biased_x": bx_, "biased_y": by_, "debiased_x": ux_,
            "debiased_y": uy_, "scale_x": kx_, "scale_y": ky_}


def _cka_from_hsic(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor, scale_x: torch.Tensor,
                   scale_y: torch.Tensor, clamp: tuple[float, float] | None) -> tuple[torch.Tensor, list, list]:
    """cross / √(self_x ⊗ self_y), NaN where a self-HSIC is not clearly positive (≤ UNDEFINED_RTOL · scale).

    Returns the matrix and the indices of undefined rows and columns (one host sync for the masks).
    """
    ok_x, ok_y = self_x > UNDEFINED_RTOL * scale_x, self_y > UNDEFINED_RTOL * scale_y
    root_x = torch.sqrt(torch.where(ok_x, self_x, torch.ones_like(self_x)))
    root_y = torch.sqrt(torch.where(ok_y, self_y, torch.ones_like(self_y)))
    matrix = cross / torch.outer(root_x, root_y)
    if clamp is not None:
        matrix = matrix.clamp(*clamp)
    matrix = torch.where(torch.outer(ok_x, ok_y), matrix, torch.full_like(matrix, float("nan")))
    masks = torch.cat([ok_x, ok_y]).cpu().tolist()
    bad_x = [i for i, ok in enumerate(masks[:len(self_x)]) if not ok]
    bad_y = [j for j, ok in enumerate(masks[len(self_x):]) if not ok]
    return matrix, bad_x, bad_y


def _cka_moments_reshift(m: dict[str, torch.Tensor], e: torch.Tensor, f: torch.Tensor, sizes_x: Sequence[int],
                         sizes_y: Sequence[int]) -> dict[str, torch.Tensor]:
    """The moments of z + e and w + f from those of z and w (e, f: per-layer shift differences, concatenated).

    Moving accumulated sums to another shift needs no data: every moment of the shifted
    features is a polynomial in the old moments (for example Σ‖z+e‖⁴ = Σa² + 4eᵀGe + nγ²
    + 4eᵀΣaz + 2γΣa + 4γeᵀΣz with γ = ‖e‖²). ``merge`` uses it to add accumulators that
    chose different shifts.
    """
    n, sx, sy, c = m["n"], m["sx"], m["sy"], m["c"]
    ax, by = m["ax"], m["ay_"]
    dtype, device = c.dtype, c.device
    ex, ey = _segment_matrix(sizes_x, dtype, device), _segment_matrix(sizes_y, dtype, device)
    gamma, phi = ex.T @ (e * e), ey.T @ (f * f)
    esx, fsy = ex.T @ (e * sx), ey.T @ (f * sy)
    out = dict(m)
    out["sx"], out["sy"] = sx + n * e, sy + n * f
    out["c"] = c + torch.outer(e, sy) + torch.outer(sx, f) + n * torch.outer(e, f)
    out["ab"] = (m["ab"] + 2 * (ey.T @ (f[:, None] * m["ay"])).T + torch.outer(ax, phi)
                 + 2 * ex.T @ (e[:, None] * m["bx"]) + 4 * ex.T @ (e[:, None] * c * f[None, :]) @ ey
                 + 2 * torch.outer(esx, phi) + torch.outer(gamma, by) + 2 * torch.outer(gamma, fsy)
                 + n * torch.outer(gamma, phi))
    out["bx"] = (m["bx"] + torch.outer(e, by + 2 * fsy + n * phi) + 2 * (c * f[None, :]) @ ey
                 + torch.outer(sx, phi))
    out["ay"] = (m["ay"] + torch.outer(f, ax + 2 * esx + n * gamma) + 2 * (c * e[:, None]).T @ ex
                 + torch.outer(sy, gamma))
    for side, shift, sizes in (("x", e, sizes_x), ("y", f, sizes_y)):
        s_key, g_key, a_key, aa_key, as_key = (("sx", "gx", "ax", "aax", "axx") if side == "x"
                                               else ("sy", "gy", "ay_", "bby", "byy"))
        s, a_sum, aa_sum, as_sum = m[s_key], m[a_key], m[aa_key], m[as_key]
        grams, new_g, new_a, new_aa, new_as = _block_norms(m[g_key], sizes), [], [], [], []
        start = 0
        for i, (gi, p) in enumerate(zip(grams, sizes, strict=True)):
            si, ei, asi = s[start:start + p], shift[start:start + p], as_sum[start:start + p]
            start += p
            g_ei, e_si, gam = gi @ ei, ei @ si, ei @ ei
            new_g.append((gi + torch.outer(ei, si) + torch.outer(si, ei) + n * torch.outer(ei, ei)).reshape(-1))
            new_a.append(a_sum[i] + 2 * e_si + n * gam)
            new_aa.append(aa_sum[i] + 4 * (ei @ g_ei) + n * gam * gam + 4 * (ei @ asi) + 2 * gam * a_sum[i]
                          + 4 * gam * e_si)
            new_as.append(asi + a_sum[i] * ei + 2 * g_ei + 2 * e_si * ei + gam * si + n * gam * ei)
        out[g_key], out[a_key] = torch.cat(new_g), torch.stack(new_a)
        out[aa_key], out[as_key] = torch.stack(new_aa), torch.cat(new_as)
    return out
