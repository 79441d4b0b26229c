"""Orthogonal Procrustes similarity and distances (Ding et al. 2021; Williams et al. 2021).

Both representations are centred, scaled to unit Frobenius norm and
zero-padded to equal width. Then

    similarity  s = ‖Xᵀ Y‖_*  (nuclear norm, in [0, 1]) = max over orthogonal Q of ⟨X Q, Y⟩,
    Euclidean   d = min_Q ‖X Q − Y‖_F = √(2 − 2 s)          (in [0, √2]),
    angular     θ = arccos(s)                               (in [0, π/2]).

Zero-padding does not change ‖XᵀY‖_*, and with Xc = U_X S_X V_Xᵀ the singular
values of Xcᵀ Yc are those of S_X (U_Xᵀ U_Y) S_Y, so the measure is computed
from each layer's centred Gram spectrum (``_spectral``). s is clipped into
[0, 1] before the square root and the arccos, so round-off never yields NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..errors import MeasureError
from ..validation import as_samples_matrix, check_same_samples
from ._spectral import Spectral, cross_blocks, spectral_prepare
from .gram import linear_gram

__all__ = ["OUTPUTS", "procrustes"]

OUTPUTS = ("similarity", "euclidean", "angular")


def _procrustes_prepare(gram: torch.Tensor) -> Spectral:
    """Per-layer statistic: the centred Gram's eigenvectors and eigenvalues."""
    return spectral_prepare(gram)


def _nuclear(a: Spectral, b: Spectral, cross: torch.Tensor) -> torch.Tensor:
    scaled = a.eigenvalues.sqrt()[:, None] * cross * b.eigenvalues.sqrt()[None, :]
    return torch.linalg.svdvals(scaled).sum() / math.sqrt(a.total * b.total)


def _procrustes_transform(similarity: torch.Tensor, output: str) -> torch.Tensor:
    s = similarity.clamp(0.0, 1.0)
    if output == "similarity":
        return s
    if output == "euclidean":
        return torch.sqrt((2 - 2 * s).clamp_min(0.0))
    if output == "angular":
        return torch.arccos(s)
    raise MeasureError(f"output must be one of {OUTPUTS}, got {output!r}.")


def _procrustes_matrix(rows: Sequence[Spectral], cols: Sequence[Spectral],
                       output: str = "similarity") -> torch.Tensor:
    """M[i, j] for every layer pair: ‖Xᵢᵀ Yⱼ‖_* or the chosen distance."""
    return _procrustes_transform(cross_blocks(rows, cols, _nuclear), output)


def procrustes(x, y, output: Literal["similarity", "euclidean", "angular"] = "similarity") -> float:
    """Orthogonal Procrustes similarity ‖XᵀY‖_* or distance between x (n, ...) and y (n, ...).

    Parameters
    ----------
    x, y : Tensor or ndarray of shape (n_samples, ...)
        Flattened per sample; rows must correspond.
    output : {"similarity", "euclidean", "angular"}, default="similarity"
        ‖XᵀY‖_*, √(2 − 2‖XᵀY‖_*) or arccos(‖XᵀY‖_*), X and Y centred and unit-Frobenius.

    Returns
    -------
    float

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    >>> q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    >>> round(procrustes(x, 2 * x @ q + 1, output="euclidean"), 6)
    0.0
    """
    if output not in OUTPUTS:
        raise MeasureError(f"output must be one of {OUTPUTS}, got {output!r}.")
    x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(x, y)
    px, py = _procrustes_prepare(linear_gram(x)), _procrustes_prepare(linear_gram(y))
    return float(_procrustes_matrix([px], [py], output)[0, 0])
