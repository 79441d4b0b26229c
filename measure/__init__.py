"""simtorch stage two: similarity measures between layer representations."""

from extract.lazy_exports import lazy_exports

# public name -> the submodule defining it, imported on first access (``__getattr__`` below)
_LAZY = {
    "Accumulator": ".accumulators",
    "LinearCKA": ".accumulators",
    "LinearCKAMatrix": ".accumulators",
    "cka": ".comparison",
    "cka_debiased": ".comparison",
    "cka_minibatch": ".comparison",
    "cka_rbf": ".comparison",
    "compare": ".comparison",
    "dcka": ".comparison",
    "MeasureError": ".errors",
    "cca": ".functional",
    "linreg": ".functional",
    "mutual_knn": ".functional",
    "procrustes": ".functional",
    "pwcca": ".functional",
    "rsa": ".functional",
    "svcca": ".functional",
    "bootstrap": ".inference",
    "permutation_test": ".inference",
    "Measure": ".measures.base",
    "MEASURES": ".registry",
    "get_measure": ".registry",
    "CCA": ".similarity",
    "CKA": ".similarity",
    "PWCCA": ".similarity",
    "RSA": ".similarity",
    "SVCCA": ".similarity",
    "DeconfoundedCKA": ".similarity",
    "DeltaCKA": ".similarity",
    "LinearRegression": ".similarity",
    "MinibatchCKA": ".similarity",
    "MutualKNN": ".similarity",
    "Procrustes": ".similarity",
    "Similarity": ".similarity",
}

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
__all__ += ["CCA", "PWCCA", "RSA", "SVCCA", "LinearRegression", "MinibatchCKA", "MutualKNN", "Procrustes"]
__all__ += ["bootstrap", "cca", "linreg", "mutual_knn", "permutation_test", "procrustes", "pwcca", "rsa", "svcca"]
__all__ += ["Accumulator", "LinearCKA", "LinearCKAMatrix"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
