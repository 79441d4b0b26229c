"""Sketched linear CKA: all pairs of a large zoo from fixed-size per-layer sketches (kernels:
``measure.functional.sketch``). Approximate by design; ``cka`` stays exact."""

from __future__ import annotations

from typing import Any

import torch

from ..functional._bilinear import Prepared, bilinear_matrix
from ..functional.sketch import DEFAULT_SKETCH_SIZE, DEFAULT_WIDTH, _cka_sketch_prepare, chebyshev_bound
from .base import Measure, Option

__all__ = ["SketchedCKA"]


def _positive_int(minimum: int):
    return lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= minimum


class SketchedCKA(Measure):
    """Linear CKA (Kornblith et al. 2019) estimated from a TensorSketch of each layer's centred Gram.

    Each layer is read once into two vectors of ``sketch_size`` numbers (``statistic="sketch"``):
    its features hashed to ``width`` columns by two independent CountSketches S₁, S₂, then the
    TensorSketch of vec(Z̃_c Z̃_cᵀ), c = 1, 2 (Pham & Pagh 2013). With φ_c those vectors,

        ĉ(A, B) = ½(⟨φ₁(A), φ₂(B)⟩ + ⟨φ₂(A), φ₁(B)⟩) / √(⟨φ₁(A), φ₂(A)⟩ ⟨φ₁(B), φ₂(B)⟩),

    whose numerator and denominators are unbiased for ⟨K̃_A, K̃_B⟩, ‖K̃_A‖² and ‖K̃_B‖²; clamped to
    [0, 1], where exact CKA lies. The error, its variance and a tail bound are in
    ``measure.functional.sketch`` and docs/measures.md. ĉ(A, A) = 1; symmetric; invariant to
    translation and isotropic scaling exactly, to orthogonal maps only in distribution (and exactly
    when no layer is hashed, p ≤ ``width``). All stores of a run must use one ``seed``.

    Parameters
    ----------
    sketch_size : int, default=65536
        s, numbers per sketch vector (≥ 16); the error falls as 1/√s.
    width : int, default=2048
        d, hashed features per sample; layers with at most d features are not hashed.
    seed : int, default=0
        Seed of every hash; the same for all stores compared together.

    References
    ----------
    Kornblith et al., ICML 2019; Pham & Pagh, "Fast and Scalable Polynomial Kernels via Explicit
    Feature Maps", KDD 2013; Avron, Nguyen & Woodruff, "Subspace Embeddings for the Polynomial
    Kernel", NeurIPS 2014; Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009.
    """

    name = "cka_sketch"
    order = 14
    statistic = "sketch"
    options = {
        "sketch_size": Option(DEFAULT_SKETCH_SIZE, _positive_int(16), "{name} must be an integer ≥ 16, got {value!r}."),
        "width": Option(DEFAULT_WIDTH, _positive_int(1), "{name} must be a positive integer, got {value!r}."),
        "seed": Option(0, lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0,
                       "{name} must be a non-negative integer, got {value!r}."),
    }
    value_range = (0.0, 1.0)
    invariances = frozenset({"isotropic_scaling", "translation"})
    approximate = True
    reference = ("Kornblith et al., ICML 2019 (linear CKA), estimated by feature hashing and the TensorSketch "
                 "of Pham & Pagh, KDD 2013 (approximate)")

    @classmethod
    def prepare(cls, statistic: torch.Tensor, *, confounder: Any = None, sketch_size: int = DEFAULT_SKETCH_SIZE,
                width: int = DEFAULT_WIDTH, seed: int = 0) -> Prepared:
        return _cka_sketch_prepare(statistic)

    @classmethod
    def pair_matrix(cls, rows, cols) -> torch.Tensor:
        return bilinear_matrix(rows, cols, clamp=(0.0, 1.0))

    @classmethod
    def approximation(cls, options: dict[str, Any]) -> dict[str, Any]:
        """What a result's ``extras["approximate"]`` says: the sketch, its options and its stated error.

        ``std`` is 1/√s, the largest standard deviation (c = 0) of the estimate of an unhashed pair;
        ``bound_95`` is the Chebyshev bound holding with probability ≥ 0.95 for layers that are not hashed
        (``chebyshev_bound``; hashing wide layers adds to it), None where it exceeds 1 (no information).
        """
        s = int(options["sketch_size"])
        bound = chebyshev_bound(s)
        return {"method": "feature hashing (CountSketch) + TensorSketch of the centred Gram", "sketch_size": s,
                "width": int(options["width"]), "seed": int(options["seed"]), "std": s ** -0.5,
                "bound_95": bound if bound <= 1 else None}
