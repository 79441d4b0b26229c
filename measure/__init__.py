"""simtorch stage two: similarity measures between layer representations."""

from ._checks import MeasureError
from .functional import cka, cka_debiased, cka_minibatch, cka_rbf, dcka
from .registry import MEASURES, MeasureSpec, compare, get_measure, register
from .similarity import CKA, DeconfoundedCKA, DeltaCKA, Similarity

__all__ = [
    "CKA",
    "DeconfoundedCKA",
    "DeltaCKA",
    "Similarity",
    "MEASURES",
    "MeasureError",
    "MeasureSpec",
    "cka",
    "cka_debiased",
    "cka_minibatch",
    "cka_rbf",
    "compare",
    "dcka",
    "get_measure",
    "register",
]
