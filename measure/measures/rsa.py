"""Representational similarity analysis (kernels: ``measure.functional.rsa``)."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.rsa import COMPARISONS, RDMS, RSAPrepared, _rsa_matrix, _rsa_prepare
from .base import Measure, Option

__all__ = ["RSA"]


class RSA(Measure):
    """Correlation between the upper triangles of the two representational dissimilarity matrices.

    With rdm="correlation", Dᵢⱼ = 1 − Pearson(xᵢ, xⱼ) across the features of samples i and j
    (rdm="euclidean": ‖xᵢ − xⱼ‖₂); RSA(X, Y) = Spearman (or Pearson) correlation of
    {D^X_ij} and {D^Y_ij}, i < j. With the default correlation RDMs only isotropic scaling
    leaves it unchanged: rotating or shifting the features changes each sample's Pearson
    correlations (Euclidean RDMs are invariant to orthogonal transforms and translation too).

    Parameters
    ----------
    rdm : {"correlation", "euclidean"}, default="correlation"
    compare : {"spearman", "pearson"}, default="spearman"

    References
    ----------
    Kriegeskorte, Mur & Bandettini, "Representational similarity analysis – connecting the
    branches of systems neuroscience", Frontiers in Systems Neuroscience 2008.
    """

    name = "rsa"
    order = 60
    statistic = "features"
    options = {"rdm": Option("correlation", RDMS), "compare": Option("spearman", COMPARISONS)}
    invariances = frozenset({"isotropic_scaling"})
    reference = "Kriegeskorte, Mur & Bandettini 2008 (RSA: correlation of RDM upper triangles)"

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, rdm: str = "correlation",
                compare: str = "spearman", sample_ids: torch.Tensor | None = None) -> RSAPrepared:
        return _rsa_prepare(statistic, rdm, compare, sample_ids)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _rsa_matrix(rows, cols)
