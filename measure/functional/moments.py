"""Linear CKA, biased and debiased, from additive moments of the features (the feature route).

Kornblith et al., ICML 2019 (linear CKA) with Song et al.'s unbiased HSIC (JMLR 2012),
computed without n × n Grams; ``measure.accumulators.LinearCKAMatrix`` streams the moments.
The Gram-route kernels of the same measures are in ``cka.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._bilinear import CANCELLATION_RTOL, UNDEFINED_RTOL
from .gram import _ieee_float32_matmul

__all__ = ["MOMENT_NAMES", "cka_from_moments", "cross_moments", "pack_self_moments", "pair_moments",
           "self_moments", "unpack_self_moments"]

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
                         sizes_y: Sequence[int], debiased: bool = True) -> dict[str, torch.Tensor]:
    """Biased and (``debiased``) debiased linear CKA matrices (L_A × L_B) from the moments of all samples.

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
    del centered
    bx_, ux_, kx_ = _self_hsic(m, "x", sizes_x)
    by_, uy_, ky_ = _self_hsic(m, "y", sizes_y)
    out = {"biased": biased, "biased_x": bx_, "biased_y": by_, "debiased_x": ux_, "debiased_y": uy_,
           "scale_x": kx_, "scale_y": ky_}
    if not debiased:
        return out
    trace = ex.T @ (c * c) @ ey - m["ab"]
    total_x = ex.T @ (sx * sx) - m["ax"]
    total_y = ey.T @ (sy * sy) - m["ay_"]
    u = (ex.T @ (sx[:, None] * c * sy[None, :]) @ ey - ex.T @ (sx[:, None] * m["bx"])
         - (ey.T @ (sy[:, None] * m["ay"])).T + m["ab"])
    out["debiased"] = (trace + torch.outer(total_x, total_y) / ((n - 1) * (n - 2)) - 2 * u / (n - 2)) / (n * (n - 3))
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# The same moments split by what they depend on, for the engine's feature route over stores: each layer's own
# moments (``self_moments``: Σz, ZᵀZ, Σa, Σa², Σaz) are formed once per run and cached like a Gram, and each pair
# of stores adds only its cross moments (``cross_moments``: ZᵢᵀWⱼ and the three fourth-order cross terms).
# ``pair_moments`` assembles the two into the ``MOMENT_NAMES`` dict of ``_cka_moments_update``.
# Blocks are float32 or float64; products are formed in the blocks' dtype and summed into float64.


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += aᵀb for row blocks a, b: the product in their dtype (full float32, no TF32), summed in float64."""
    with _ieee_float32_matmul():
        out += a.T @ b


def _squared_norms(z: torch.Tensor) -> torch.Tensor:
    """‖z_r‖² of every row, in the block's dtype (a sum of p squares: the dtype's relative rounding)."""
    return (z * z).sum(dim=1)


def self_moments(z: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One layer's own moments over a block of shifted rows z (rows × p), added into ``out`` (float64 sums).

    ``s`` = Σz (p), ``g`` = ZᵀZ (p × p), ``a`` = Σ‖z‖², ``aa`` = Σ‖z‖⁴, ``az`` = Σ‖z‖²z (p). Products and
    the block's column sums are formed in z's dtype and summed into float64 across blocks, so the sums
    over k blocks are those of all the rows.
    """
    p, f64 = z.shape[1], torch.float64
    if out is None:
        out = {"s": torch.zeros(p, dtype=f64, device=z.device), "g": torch.zeros((p, p), dtype=f64, device=z.device),
               "a": torch.zeros((), dtype=f64, device=z.device), "aa": torch.zeros((), dtype=f64, device=z.device),
               "az": torch.zeros(p, dtype=f64, device=z.device)}
    a = _squared_norms(z)
    out["s"] += z.sum(dim=0)
    _add_product(out["g"], z, z)
    a64 = a.to(f64)
    out["a"] += a64.sum()
    out["aa"] += a64 @ a64
    _add_product(out["az"][:, None], z, a[:, None])
    return out


def pack_self_moments(shift: torch.Tensor, m: dict[str, torch.Tensor]) -> torch.Tensor:
    """One flat float64 vector [shift, s, vec(g), a, aa, az] (3p + p² + 2 numbers): how they are held and cached."""
    return torch.cat([shift.to(torch.float64), m["s"], m["g"].reshape(-1), m["a"][None], m["aa"][None], m["az"]])


def unpack_self_moments(flat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(shift, moments) from ``pack_self_moments``'s vector."""
    p = int(round((-3 + (9 + 4 * (len(flat) - 2)) ** 0.5) / 2))
    shift, s, g, rest = flat[:p], flat[p:2 * p], flat[2 * p:2 * p + p * p], flat[2 * p + p * p:]
    return shift, {"s": s, "g": g.reshape(p, p), "a": rest[0], "aa": rest[1], "az": rest[2:]}


def cross_moments(zs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor] | None, terms: str = "products",
                  out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The cross moments of a block of rows of layers zs (of A) and ws (of B; None: B is A itself),
    added into ``out`` (float64 sums; products in the blocks' dtype, as in ``self_moments``).

    ``terms="products"``: ``c`` = ZᵀW (P × Q) with every layer pair's block ZᵢᵀWⱼ; when B is A only the
    blocks above the diagonal (i < j) are formed — the diagonal ones are the layers' own ZᵢᵀZᵢ
    (``self_moments``) and the others their transposes — and the rest is left zero.
    ``terms="fourth"``: what only the debiased estimator needs, ``bx`` = Σ‖w_j‖² z (P × L_B),
    ``ay`` = Σ‖z_i‖² w (Q × L_A) and ``ab`` = Σ‖z_i‖²‖w_j‖² (L_A × L_B) (n·(P + Q)·L flops).
    """
    same = ws is None
    ws = zs if same else ws
    widths_x, widths_y = [z.shape[1] for z in zs], [w.shape[1] for w in ws]
    device = zs[0].device

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    if terms == "products":
        out = out if out is not None else {"c": zeros(sum(widths_x), sum(widths_y))}
        row = 0
        for i, z in enumerate(zs):
            col = 0
            for j, w in enumerate(ws):
                if not same or i < j:
                    _add_product(out["c"][row:row + widths_x[i], col:col + widths_y[j]], z, w)
                col += widths_y[j]
            row += widths_x[i]
        return out
    if terms != "fourth":
        raise ValueError(f"terms must be 'products' or 'fourth', got {terms!r}.")
    out = out if out is not None else {"bx": zeros(sum(widths_x), len(ws)), "ay": zeros(sum(widths_y), len(zs)),
                                       "ab": zeros(len(zs), len(ws))}
    a = torch.stack([_squared_norms(z) for z in zs], dim=1)
    b = a if same else torch.stack([_squared_norms(w) for w in ws], dim=1)
    for side, blocks, norms in (("bx", zs, b), ("ay", ws, a)):
        row = 0
        for z in blocks:
            _add_product(out[side][row:row + z.shape[1]], z, norms)
            row += z.shape[1]
    out["ab"] += a.to(torch.float64).T @ b.to(torch.float64)
    return out


def pair_moments(n: int, selfs_x: Sequence[dict[str, torch.Tensor]], selfs_y: Sequence[dict[str, torch.Tensor]],
                 cross: dict[str, torch.Tensor], same: bool) -> dict[str, torch.Tensor]:
    """The ``MOMENT_NAMES`` dict of a pair of stores from each layer's own moments and the pair's cross moments.

    ``cross``: the ``"products"`` terms, and the ``"fourth"`` ones when the debiased estimator is wanted
    (without them the dict holds no ``bx``, ``ay``, ``ab``: enough for ``cka_from_moments(debiased=False)``).
    ``same``: B is A (``cross_moments(zs, None)``): ZᵀZ is completed from the layers' own blocks and the
    transposes of the blocks above the diagonal.
    """
    c = cross["c"]
    if same:
        c = c + c.T
        start = 0
        for m in selfs_x:
            p = len(m["s"])
            c[start:start + p, start:start + p] = m["g"]
            start += p
    cat = torch.cat
    return {
        "n": torch.tensor(float(n), dtype=torch.float64, device=c.device),
        "sx": cat([m["s"] for m in selfs_x]), "sy": cat([m["s"] for m in selfs_y]),
        "gx": cat([m["g"].reshape(-1) for m in selfs_x]), "gy": cat([m["g"].reshape(-1) for m in selfs_y]),
        "ax": torch.stack([m["a"] for m in selfs_x]), "ay_": torch.stack([m["a"] for m in selfs_y]),
        "aax": torch.stack([m["aa"] for m in selfs_x]), "bby": torch.stack([m["aa"] for m in selfs_y]),
        "axx": cat([m["az"] for m in selfs_x]), "byy": cat([m["az"] for m in selfs_y]),
        "c": c, **{k: cross[k] for k in ("bx", "ay", "ab") if k in cross},
    }


def cka_from_moments(m: dict[str, torch.Tensor], sizes_x: Sequence[int], sizes_y: Sequence[int],
                     debiased: bool = True) -> dict:
    """Biased and (``debiased`` and n ≥ 4) debiased linear CKA matrices from the moments of all samples,
    NaN where undefined.

    Returns ``n_samples``, ``cka`` and ``cka_undefined`` (the undefined rows and columns), and with the
    debiased estimator ``cka_debiased``, ``cka_debiased_undefined`` and ``self_hsic_debiased``.
    """
    n = int(m["n"])
    debiased = debiased and n >= 4
    h = _cka_moments_compute(m, sizes_x, sizes_y, debiased)
    out: dict = {"n_samples": n}
    matrix, bad_x, bad_y = _cka_from_hsic(h["biased"], h["biased_x"], h["biased_y"], h["scale_x"], h["scale_y"],
                                          clamp=(-1.0, 1.0))
    out["cka"], out["cka_undefined"] = matrix, (bad_x, bad_y)
    if debiased:
        # first-order cancellation in HSIC₁: see measure.functional._bilinear.CANCELLATION_RTOL
        rescale = CANCELLATION_RTOL / UNDEFINED_RTOL / n**2
        matrix, bad_x, bad_y = _cka_from_hsic(h["debiased"], h["debiased_x"], h["debiased_y"],
                                              h["scale_x"] * rescale, h["scale_y"] * rescale, clamp=None)
        out["cka_debiased"], out["cka_debiased_undefined"] = matrix, (bad_x, bad_y)
        out["self_hsic_debiased"] = (h["debiased_x"], h["debiased_y"])
    return out
