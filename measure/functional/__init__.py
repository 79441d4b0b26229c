"""Pure functional kernels: no I/O, no hidden state."""

from .cca import cca, pwcca, svcca
from .cka import cka, cka_debiased, cka_minibatch, cka_rbf
from .dcka import dcka
from .knn import mutual_knn
from .linreg import linreg
from .procrustes import procrustes
from .rsa import rsa

__all__ = ["cka", "cka_debiased", "cka_minibatch", "cka_rbf", "dcka"]
__all__ += ["cca", "linreg", "mutual_knn", "procrustes", "pwcca", "rsa", "svcca"]
