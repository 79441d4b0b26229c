"""Orthogonal Procrustes similarity and distances (kernels: ``measure.functional.procrustes``).

The distances are separate measures (kind "distance") because a measure has one kind, which
decides how heatmaps are scaled and which layer counts as the best match. ``measure.Procrustes``
is the model-pair class (``measure.similarity.Procrustes``) built on these.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..functional._spectral import Spectral
from ..functional.procrustes import _procrustes_matrix, _procrustes_prepare
from .base import Measure

__all__ = ["Procrustes", "ProcrustesAngular", "ProcrustesEuclidean"]

_REFERENCE = "Ding et al., NeurIPS 2021; Williams et al., NeurIPS 2021 (orthogonal Procrustes)"


class Procrustes(Measure):
    """Orthogonal Procrustes similarity: s = ‖Xᵀ Y‖_* = max over orthogonal Q of ⟨X Q, Y⟩.

    X and Y are centred, scaled to unit Frobenius norm and zero-padded to equal width; s is
    computed from each layer's centred Gram spectrum and clipped into [0, 1]. Invariant to
    orthogonal transforms, isotropic scaling and translation.

    References
    ----------
    Ding, Denain & Steinhardt, "Grounding Representation Similarity with Statistical Testing",
    NeurIPS 2021; Williams, Kunz, Kornblith & Linderman, "Generalized Shape Metrics on Neural
    Representations", NeurIPS 2021.
    """

    name = "procrustes"
    order = 30
    statistic = "gram"
    value_range = (0.0, 1.0)
    invariances = frozenset({"orthogonal", "isotropic_scaling", "translation"})
    reference = _REFERENCE + ": ||X^T Y||_* of centred, unit-Frobenius X, Y"
    output = "similarity"  # the transform of s that ``pair_matrix`` returns

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None) -> Spectral:
        return _procrustes_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return _procrustes_matrix(rows, cols, cls.output)


class ProcrustesEuclidean(Procrustes):
    """Procrustes distance d = min over orthogonal Q of ‖X Q − Y‖_F = √(2 − 2s), s as in ``Procrustes``.

    A metric on centred, unit-Frobenius representations (Williams et al. 2021), in [0, √2].
    """

    name = "procrustes_euclidean"
    order = 31
    value_range = (0.0, math.sqrt(2.0))
    kind = "distance"
    reference = _REFERENCE + ": sqrt(2 - 2 ||X^T Y||_*)"
    output = "euclidean"


class ProcrustesAngular(Procrustes):
    """Angular Procrustes distance θ = arccos(s), s as in ``Procrustes``.

    A metric in [0, π/2] (Williams et al. 2021).
    """

    name = "procrustes_angular"
    order = 32
    value_range = (0.0, math.pi / 2)
    kind = "distance"
    reference = _REFERENCE + ": arccos ||X^T Y||_*"
    output = "angular"
