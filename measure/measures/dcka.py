"""Deconfounded CKA (kernels: ``measure.functional.dcka``)."""

from __future__ import annotations

import torch

from ..functional._bilinear import Prepared, bilinear_matrix
from ..functional.dcka import _dcka_prepare
from .base import Measure, Option

__all__ = ["DCKA"]


class DCKA(Measure):
    """Deconfounded linear CKA (Cui et al. 2022): CKA of the Grams with the input similarity regressed out.

    With K₀ the Gram of the centred, unit-Frobenius inputs and K = HKH / tr(HKH) a layer's
    normalised centred Gram, regress K entrywise on [1, vec K₀]:

        β = Σ (K − K̄)(K₀ − K̄₀) / Σ (K₀ − K̄₀)²,   R = K − K̄ − β (K₀ − K̄₀),
        dCKA(X, Y) = ⟨H R_X H, H R_Y H⟩ / (‖H R_X H‖_F ‖H R_Y H‖_F).

    Needs the inputs (``confounder=``, or the store's ``inputs``); can be negative. Invariant to
    orthogonal transforms, isotropic scaling and translation of either representation. The
    share of each Gram explained by the inputs is reported as ``variance_explained``.

    Parameters
    ----------
    psd : bool, default=False
        Project each residual R onto the PSD cone before centring, as in the authors' code
        (simtorch 0.2.1: ``remove_negative_eig``).

    References
    ----------
    Cui, Kumar, Marttinen & Kaski, "Deconfounded Representation Similarity for Comparison of
    Neural Networks", NeurIPS 2022.
    """

    name = "dcka"
    order = 20
    statistic = "gram"
    options = {"psd": Option(False)}
    invariances = frozenset({"orthogonal", "isotropic_scaling", "translation"})
    needs_confounder = True
    float32_grams = True
    reference = "Cui et al., NeurIPS 2022 (deconfounded linear CKA)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: torch.Tensor, psd: bool = False) -> Prepared:
        return _dcka_prepare(statistic, confounder, psd)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols)
