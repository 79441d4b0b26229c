"""simtorch stage two: similarity measures between layer representations."""

from .accumulators import Accumulator, LinearCKA, LinearCKAMatrix
from .comparison import cka, cka_debiased, cka_minibatch, cka_rbf, compare, dcka
from .errors import MeasureError
from .functional import cca, linreg, mutual_knn, procrustes, pwcca, rsa, svcca
from .inference import bootstrap, permutation_test
from .measures.base import Measure
from .registry import MEASURES, get_measure
from .similarity import (
    CCA,
    CKA,
    PWCCA,
    RSA,
    SVCCA,
    DeconfoundedCKA,
    DeltaCKA,
    LinearRegression,
    MutualKNN,
    Procrustes,
    Similarity,
)

__all__ = [
    "CKA",
    "DeconfoundedCKA",
    "DeltaCKA",
    "Similarity",
    "MEASURES",
    "Measure",
    "MeasureError",
    "cka",
    "cka_debiased",
    "cka_minibatch",
    "cka_rbf",
    "compare",
    "dcka",
    "get_measure",
]
__all__ += ["CCA", "PWCCA", "RSA", "SVCCA", "LinearRegression", "MutualKNN", "Procrustes"]
__all__ += ["bootstrap", "cca", "linreg", "mutual_knn", "permutation_test", "procrustes", "pwcca", "rsa", "svcca"]
__all__ += ["Accumulator", "LinearCKA", "LinearCKAMatrix"]
