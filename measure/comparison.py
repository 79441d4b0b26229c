"""Similarity of two in-memory representations: ``compare(x, y, name)`` and one function per CKA measure.

``compare`` runs a measure's two steps (``prepare`` each layer, then ``pair_matrix``) on arrays,
with the same input checks and undefined-value policy as the store engine. ``cka``,
``cka_debiased``, ``cka_rbf``, ``cka_minibatch`` and ``dcka`` are ``compare`` under a fixed name.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .accumulators.cka import choose_route
from .errors import MeasureError
from .functional.dcka import confounder_gram
from .functional.gram import PRECISION_CHOICES, resolve_precision
from .functional.moments import cka_from_moments, cross_moments, pair_moments, self_moments
from .measures.base import Measure, statistic_of
from .registry import get_measure
from .undefined import API_ADVICE, undefined_value
from .validation import as_samples_matrix, check_finite, check_min_samples, check_same_samples

__all__ = ["cka", "cka_debiased", "cka_minibatch", "cka_rbf", "compare", "dcka"]


def compare(x: Any, y: Any, name: str = "cka", *, confounder: Any = None,
            undefined: Literal["raise", "nan"] = "raise", precision: str = "auto", **options: Any) -> float:
    """Similarity of two representations of the same samples under measure ``name``.

    Parameters
    ----------
    x, y : Tensor or ndarray of shape (n_samples, ...)
        Flattened per sample; rows must correspond.
    name : str, default="cka"
        A key of ``MEASURES``.
    confounder : Tensor or ndarray of shape (n_samples, ...), optional
        The inputs, for measures that need them (``dcka``).
    undefined : {"raise", "nan"}, default="raise"
        What to do where the value is mathematically undefined (a constant
        layer, a negative unbiased self-HSIC): raise ``MeasureError``, or
        return NaN with a warning.
    precision : {"auto", "float64", "float32"}, default="auto"
        How Gram products are formed (``measure.functional.gram.linear_gram``, with its error
        bound): ``"auto"`` uses the compensated float32 scheme when both x and y are float32 or
        float16 (and the measure is accurate on it, ``float32_grams``), float64 otherwise;
        float32 arrays are then used as they are, not copied to float64.
    **options
        Measure options (see ``MEASURES[name].options``).

    Returns
    -------
    float
    """
    spec = get_measure(name)
    opts = spec.resolve_options(options)
    if precision not in PRECISION_CHOICES:
        raise MeasureError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}.")
    grams = spec.statistic in ("gram", "gram_blocks")
    if precision == "float32" and grams and not spec.float32_grams:
        raise MeasureError(f"{name} needs float64 Gram products: it uses the Gram's small eigenvalues, which "
                           "precision='float32' does not resolve. Use precision='auto' or 'float64'.")
    precision = resolve_precision(precision, _data_dtype(x, y), grams and spec.float32_grams)
    dtype = torch.float32 if precision == "float32" and grams else torch.float64
    xm, ym = as_samples_matrix(x, "x", dtype), as_samples_matrix(y, "y", dtype)
    check_same_samples(xm, ym)
    route = (choose_route(opts["route"], len(xm), [xm.shape[1]], [ym.shape[1]]) if spec.feature_route
             else "gram")
    on_gram = spec.statistic == "gram" and route == "gram"  # NaN/Inf then show on the Gram's diagonal
    if not on_gram:
        check_finite(xm, "x")
        check_finite(ym, "y")
    k0 = None
    if spec.needs_confounder:
        if confounder is None:
            raise MeasureError(f"Measure {name!r} needs the inputs: pass confounder= (shape (n_samples, ...)).")
        z = as_samples_matrix(confounder, "confounder")
        check_same_samples(xm, z, ("x", "confounder"))
        check_finite(z, "confounder")
        k0 = confounder_gram(z)
    if route == "features":
        return _compare_features(spec, xm, ym, undefined)
    prepared = []
    for label, m in (("x", xm), ("y", ym)):
        statistic = statistic_of(spec, m, opts, precision)
        if on_gram:
            _check_gram_diagonal(statistic, m, label, precision)
        prepared.append(spec.prepare(statistic, confounder=k0, **opts))
        del statistic
    px, py = prepared
    for label, p in (("x", px), ("y", py)):
        if not getattr(p, "defined", True):
            undefined_value(name, label, p.reason, undefined, advice=API_ADVICE)
    return float(spec.pair_matrix([px], [py])[0, 0])


def _check_gram_diagonal(gram: torch.Tensor, x: torch.Tensor, label: str, precision: str) -> None:
    """Raise unless K = X Xᵀ is finite, checked on its diagonal (one host sync; a scan of X costs more).

    K[i, i] = ‖x_i‖² is NaN or Inf when row i holds a NaN or an Inf (and the float32 scheme's column
    shift spreads one to every row), so a finite diagonal clears X; otherwise X is scanned to name the
    samples, and when it holds none the float32 products overflowed.
    """
    if bool(torch.isfinite(torch.diagonal(gram)).all()):
        return
    check_finite(x, label)
    if precision == "float32":
        raise MeasureError(f"The Gram of {label} overflows in float32 products (activations beyond ~1e17 in "
                           "magnitude); pass precision='float64'.")
    raise MeasureError(f"The Gram of {label} overflows float64 (activations beyond ~1e154 in magnitude); rescale "
                       "it before measuring.")


def _data_dtype(*arrays: Any) -> str:
    """"float32" when every array holds float32, float16 or bfloat16 values, else "float64"."""
    narrow = {"float32", "float16", "bfloat16"}
    names = [str(getattr(a, "dtype", "float64")).removeprefix("torch.") for a in arrays]
    return "float32" if all(name in narrow for name in names) else "float64"


def _compare_features(spec: type[Measure], x: torch.Tensor, y: torch.Tensor, undefined: str) -> float:
    """``compare`` on the feature route: the moments of all samples in x's and y's dtype (float32 products
    summed in float64 for float32, as the engine's feature route), each shifted by its column means."""
    debiased = spec.feature_route == "cka_debiased"
    if debiased:
        check_min_samples(len(x), 4, spec.name, "unbiased HSIC")
    zs = [m - m.mean(dim=0, dtype=torch.float64).to(m.dtype) for m in (x, y)]
    cross = cross_moments(zs[:1], zs[1:], "products")
    if debiased:
        cross.update(cross_moments(zs[:1], zs[1:], "fourth"))
    moments = pair_moments(len(x), [self_moments(zs[0])], [self_moments(zs[1])], cross, same=False)
    out = cka_from_moments(moments, [x.shape[1]], [y.shape[1]], debiased=debiased)
    bad_x, bad_y = out[f"{spec.feature_route}_undefined"]
    if bad_x or bad_y:
        undefined_value(spec.name, "x" if bad_x else "y", "its self-HSIC is zero or negative (a constant layer?)",
                        undefined, advice=API_ADVICE, stacklevel=3)
    return float(out[spec.feature_route][0, 0])


def cka(x, y) -> float:
    """Linear CKA (biased HSIC) between x (n, ...) and y (n, ...), exact over all samples.

    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    >>> round(cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]), 12)
    1.0
    """
    return compare(x, y, "cka")


def cka_debiased(x, y) -> float:
    """Linear CKA with Song et al.'s unbiased HSIC; ≈ 0 for independent data. Needs n ≥ 4."""
    return compare(x, y, "cka_debiased")


def cka_rbf(x, y, threshold: float = 0.4) -> float:
    """RBF-kernel CKA, σ² = threshold² · median squared distance (Kornblith et al. 2019)."""
    return compare(x, y, "cka_rbf", threshold=threshold)


def cka_minibatch(x, y, batch_size: int) -> float:
    """Nguyen et al.'s minibatch CKA over consecutive batches of ``batch_size`` samples."""
    return compare(x, y, "cka_minibatch", batch_size=batch_size)


def dcka(x, y, confounder, psd: bool = False) -> float:
    """Deconfounded linear CKA between x and y (n, ...) given the inputs ``confounder`` (n, ...)."""
    return compare(x, y, "dcka", confounder=confounder, psd=psd)
