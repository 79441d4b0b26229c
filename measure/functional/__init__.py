"""Pure functional kernels: tensors in, tensors out; no I/O, no registry, no hidden state.

Each module holds the kernels of one family (``cka``, ``moments``, ``dcka``, ``procrustes``,
``cca``, ``linreg``, ``rsa``, ``knn``) and the shared ``gram``, ``_bilinear`` and ``_spectral``
helpers; the classes of ``measure.measures`` pair them. The functions re-exported here compute
one pair of representations straight from the kernels; ``measure.compare`` (with ``measure.cka``,
``measure.dcka`` ...) adds the input checks and the undefined-value policy.
"""

from .cca import cca, pwcca, svcca
from .knn import mutual_knn
from .linreg import linreg
from .procrustes import procrustes
from .rsa import rsa

__all__ = ["cca", "linreg", "mutual_knn", "procrustes", "pwcca", "rsa", "svcca"]
