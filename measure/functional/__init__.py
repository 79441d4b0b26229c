"""Pure functional kernels: no I/O, no hidden state."""

from .cka import cka, cka_debiased, cka_minibatch, cka_rbf
from .dcka import dcka

__all__ = ["cka", "cka_debiased", "cka_minibatch", "cka_rbf", "dcka"]
