"""simtorch stage two: similarity measures between layer representations."""

from ._checks import MeasureError
from .accumulators import Accumulator, LinearCKA, LinearCKAMatrix
from .family import CCA, PWCCA, RSA, SVCCA, LinearRegression, MutualKNN, Procrustes
from .functional import (
    cca,
    cka,
    cka_debiased,
    cka_minibatch,
    cka_rbf,
    dcka,
    linreg,
    mutual_knn,
    procrustes,
    pwcca,
    rsa,
    svcca,
)
from .registry import MEASURES, MeasureSpec, compare, get_measure, register
from .similarity import CKA, DeconfoundedCKA, DeltaCKA, Similarity
from .stats import bootstrap, permutation_test

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
__all__ += ["CCA", "PWCCA", "RSA", "SVCCA", "LinearRegression", "MutualKNN", "Procrustes"]
__all__ += ["bootstrap", "cca", "linreg", "mutual_knn", "permutation_test", "procrustes", "pwcca", "rsa", "svcca"]
__all__ += ["Accumulator", "LinearCKA", "LinearCKAMatrix"]
