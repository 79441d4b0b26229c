"""Deconfounded CKA (Cui, Kumar, Marttinen & Kaski, NeurIPS 2022).

The input similarity K₀ is the linear Gram of the flattened inputs after
column centring and scaling to unit Frobenius norm. Each representation Gram K
(of centred, unit-Frobenius activations, i.e. H K H / tr(H K H)) is regressed
entrywise on [1, vec(K₀)] by least squares over all n² entries; dCKA is linear
CKA of the residual Grams R:

    β = Σ (K − K̄)(K₀ − K̄₀) / Σ (K₀ − K̄₀)²,   R = K − K̄ − β (K₀ − K̄₀),
    dCKA = ⟨H R_A H, H R_B H⟩ / (‖H R_A H‖_F ‖H R_B H‖_F).

Optionally R is projected onto the PSD cone (negative eigenvalues set to zero)
before centring, as in the authors' code. dCKA(X, X) = 1 and dCKA can be
negative. The share of the Gram's variance explained by the input,
1 − var(R) / var(K), is reported per layer as ``variance_explained``.
"""

from __future__ import annotations

import torch

from ..errors import MeasureError
from ._bilinear import Prepared, normalized
from .gram import center_gram, linear_gram

__all__ = ["confounder_gram"]


def confounder_gram(inputs: torch.Tensor) -> torch.Tensor:
    """K₀: Gram of the column-centred, unit-Frobenius, flattened inputs (n × n, float64)."""
    gram = linear_gram(inputs)
    centered = center_gram(gram)
    trace = torch.trace(centered)
    trace_value, raw_trace = torch.stack([trace, torch.trace(gram).abs()]).tolist()  # one host sync
    if not trace_value > 1e-12 * raw_trace:  # zero up to centring round-off
        raise MeasureError("The confounder (inputs) is constant over samples; dCKA needs varying inputs.")
    return centered / trace


def _dcka_prepare(gram: torch.Tensor, confounder: torch.Tensor, psd: bool = False) -> Prepared:
    """dCKA statistic of one layer: the centred, normalised residual of K regressed on K₀."""
    if confounder.shape != gram.shape:
        raise MeasureError(
            f"The confounder Gram has shape {tuple(confounder.shape)} but the layer Gram {tuple(gram.shape)}; "
            "the confounder must hold the same samples as the activations."
        )
    centered = center_gram(gram)
    trace = torch.trace(centered)
    trace_value, raw_trace = torch.stack([trace, torch.trace(gram).abs()]).tolist()  # one host sync
    if not trace_value > 1e-12 * raw_trace:
        empty = torch.zeros(gram.numel(), dtype=gram.dtype, device=gram.device)
        return Prepared(empty, empty, defined=False, reason="the layer is constant over samples")
    k_dev = centered.div_(trace)  # in place from here on: one n × n matrix instead of four
    k_dev.sub_(k_dev.mean())
    k0_dev = confounder - confounder.mean()
    k0_ss = torch.sum(k0_dev * k0_dev)
    beta = torch.sum(k_dev * k0_dev) / k0_ss
    k_ss = torch.sum(k_dev * k_dev)
    residual = k_dev.sub_(k0_dev.mul_(beta))
    del k0_dev
    explained, beta_value = torch.stack([1 - torch.sum(residual * residual) / k_ss, beta]).tolist()  # one sync
    extras = {"variance_explained": explained, "beta": beta_value}
    if psd:
        eigvals, eigvecs = torch.linalg.eigh(residual)
        residual = (eigvecs * eigvals.clamp_min(0)) @ eigvecs.T
    r = center_gram(residual).reshape(-1)
    return normalized(r, r, k_ss, "‖H R H‖² (the input explains the whole Gram)", extras)
