"""The measure registry: one entry per measure, with its properties and kernels.

A measure is computed in two steps that the store engine and ``compare``
share: ``prepare`` turns one layer's statistic (its Gram matrix, per-batch
Grams, or its features) into a per-layer object, and ``pair_matrix`` turns two
lists of those into the L_A × L_B matrix. ``compare(x, y, name)`` runs the two
steps on in-memory arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ._checks import MeasureError, as_samples_matrix, check_finite, check_options, check_same_samples
from .accumulators.cka import LinearCKAMatrix, choose_route
from .functional._bilinear import bilinear_matrix
from .functional.cka import (
    _cka_debiased_prepare,
    _cka_minibatch_prepare,
    _cka_prepare,
    _cka_rbf_prepare,
    batch_grams,
)
from .functional.dcka import _dcka_prepare, confounder_gram
from .functional.gram import linear_gram

__all__ = ["MEASURES", "MeasureSpec", "compare", "get_measure", "register", "statistic_of"]

Statistic = Literal["gram", "gram_blocks", "features"]


@dataclass(frozen=True)
class MeasureSpec:
    """A measure and what the engine needs to know about it.

    Attributes
    ----------
    name : str
        Registry key, used on the command line and in result files.
    statistic : {"gram", "gram_blocks", "features"}
        Per-layer input of ``prepare``: the n × n linear Gram, the Grams of
        consecutive batches of ``options['batch_size']`` samples, or the
        (n_samples, n_features) matrix itself (all float64).
    prepare : callable(statistic, *, confounder, **options) -> object
    pair_matrix : callable(list, list) -> Tensor of shape (len(rows), len(cols))
    options : mapping
        Option names and defaults; ``None`` marks a required option.
    symmetric : bool
        S(A, B) = S(B, A).
    value_range : (float, float)
    kind : {"similarity", "distance"}
    needs_confounder : bool
        Needs the inputs (the store's ``inputs`` array or ``confounder=``).
    reference : str
    feature_route : str, optional
        Key of ``LinearCKAMatrix.compute()``'s output when the measure can also be computed from
        feature moments instead of Grams (its ``route`` option chooses; see ``choose_route``).
    float32_grams : bool
        Accurate on Grams formed with float32 products (``precision="float32"``): true for the
        kernel measures, false for those that whiten or take matrix square roots of the Gram.
    """

    name: str
    statistic: Statistic
    prepare: Callable[..., Any]
    pair_matrix: Callable[[Sequence[Any], Sequence[Any]], torch.Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    symmetric: bool = True
    value_range: tuple[float, float] = (-1.0, 1.0)
    kind: Literal["similarity", "distance"] = "similarity"
    needs_confounder: bool = False
    reference: str = ""
    feature_route: str | None = None
    float32_grams: bool = False

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        options = check_options(self.name, dict(given), dict(self.options))
        if "route" in options and options["route"] not in ("auto", "gram", "features"):
            raise MeasureError(f"Option route of {self.name!r} must be 'auto', 'gram' or 'features', "
                               f"got {options['route']!r}.")
        missing = [k for k, v in options.items() if v is None and self.options.get(k) is None and k not in given]
        if missing:
            raise MeasureError(f"Measure {self.name!r} needs option(s) {missing}, for example {missing[0]}=256.")
        return options

    def describe(self) -> dict[str, Any]:
        """JSON-friendly properties (for manifests and ``--list-measures``)."""
        return {
            "name": self.name, "statistic": self.statistic, "options": dict(self.options),
            "symmetric": self.symmetric, "range": list(self.value_range), "kind": self.kind,
            "needs_confounder": self.needs_confounder, "reference": self.reference,
            "float32_grams": self.float32_grams,
        }


MEASURES: dict[str, MeasureSpec] = {}


def register(spec: MeasureSpec) -> MeasureSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in MEASURES:
        raise ValueError(f"A measure named {spec.name!r} is already registered.")
    MEASURES[spec.name] = spec
    return spec


def get_measure(name: str) -> MeasureSpec:
    """The registered measure ``name``; an unknown name lists the valid ones."""
    try:
        return MEASURES[name]
    except KeyError:
        raise MeasureError(f"Unknown measure {name!r}; valid measures: {', '.join(sorted(MEASURES))}.") from None


def _batch_size(options: Mapping[str, Any], n: int) -> int:
    b = options.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 4:
        raise MeasureError(f"batch_size must be an integer ≥ 4 (unbiased HSIC needs 4 samples), got {b!r}.")
    if b > n:
        raise MeasureError(f"batch_size={b} exceeds the {n} samples; choose a batch_size ≤ {n}.")
    return b


def statistic_of(spec: MeasureSpec, x: torch.Tensor, options: Mapping[str, Any]) -> Any:
    """The per-layer statistic ``spec`` needs, from the full (n_samples, n_features) float64 matrix."""
    if spec.statistic == "gram":
        return linear_gram(x)
    if spec.statistic == "gram_blocks":
        b = _batch_size(options, len(x))
        if len(x) % b:
            warnings.warn(f"{spec.name}: the last {len(x) % b} of {len(x)} samples do not fill a batch of "
                          f"{b} and are left out (equal-size batches).", stacklevel=3)
        return batch_grams(x, b)
    return x


def compare(x: Any, y: Any, name: str = "cka", *, confounder: Any = None,
            undefined: Literal["raise", "nan"] = "raise", **options: Any) -> float:
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
    **options
        Measure options (see ``MEASURES[name].options``).

    Returns
    -------
    float
    """
    spec = get_measure(name)
    opts = spec.resolve_options(options)
    xm, ym = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
    check_same_samples(xm, ym)
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
    if spec.feature_route and choose_route(opts["route"], len(xm), [xm.shape[1]], [ym.shape[1]]) == "features":
        return _compare_features(spec, xm, ym, undefined)
    px = spec.prepare(statistic_of(spec, xm, opts), confounder=k0, **opts)
    py = spec.prepare(statistic_of(spec, ym, opts), confounder=k0, **opts)
    for label, p in (("x", px), ("y", py)):
        if not getattr(p, "defined", True):
            message = f"{name} is undefined for {label}: {p.reason}."
            if undefined == "raise":
                raise MeasureError(message + " Pass undefined='nan' to get NaN instead.")
            warnings.warn(message, stacklevel=2)
    return float(spec.pair_matrix([px], [py])[0, 0])


def _compare_features(spec: MeasureSpec, x: torch.Tensor, y: torch.Tensor, undefined: str) -> float:
    """``compare`` on the feature route: one ``LinearCKAMatrix`` update over all samples."""
    if spec.feature_route == "cka_debiased" and len(x) < 4:
        raise MeasureError(f"{spec.name} needs at least 4 samples (unbiased HSIC), got {len(x)}; measure more samples.")
    acc = LinearCKAMatrix()
    acc.update([x], [y])
    out = acc.compute()
    bad_x, bad_y = out[f"{spec.feature_route}_undefined"]
    if bad_x or bad_y:
        label = "x" if bad_x else "y"
        message = f"{spec.name} is undefined for {label}: its self-HSIC is zero or negative (a constant layer?)."
        if undefined == "raise":
            raise MeasureError(message + " Pass undefined='nan' to get NaN instead.")
        warnings.warn(message, stacklevel=3)
    return float(out[spec.feature_route][0, 0])


def _no_confounder(prepare: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(stat: Any, *, confounder: Any = None, route: str = "gram", **options: Any) -> Any:
        return prepare(stat, **options)

    wrapped.__doc__ = prepare.__doc__
    return wrapped


def _minibatch_prepare(blocks, *, confounder=None, batch_size=None):
    return _cka_minibatch_prepare(blocks)


def _unclamped(rows, cols):
    return bilinear_matrix(rows, cols, clamp=None)


register(MeasureSpec(
    "cka", "gram", _no_confounder(_cka_prepare), bilinear_matrix, options={"route": "auto"},
    value_range=(0.0, 1.0), feature_route="cka", float32_grams=True,
    reference="Kornblith et al., ICML 2019 (linear kernel, biased HSIC)",
))
register(MeasureSpec(
    "cka_debiased", "gram", _no_confounder(_cka_debiased_prepare), _unclamped, options={"route": "auto"},
    value_range=(-1.0, 1.0), feature_route="cka_debiased", float32_grams=True,
    reference="Kornblith et al., ICML 2019 with the unbiased HSIC of Song et al., JMLR 2012",
))
register(MeasureSpec(
    "cka_rbf", "gram", _no_confounder(_cka_rbf_prepare), bilinear_matrix, options={"threshold": 0.4},
    value_range=(0.0, 1.0), float32_grams=True,
    reference="Kornblith et al., ICML 2019 (RBF kernel, sigma^2 = threshold^2 * median squared distance)",
))
register(MeasureSpec(
    "cka_minibatch", "gram_blocks", _minibatch_prepare, _unclamped, options={"batch_size": None},
    value_range=(-1.0, 1.0), float32_grams=True,
    reference="Nguyen, Raghu & Kornblith, ICLR 2021 (unbiased HSIC summed over batches)",
))
register(MeasureSpec(
    "dcka", "gram", lambda stat, *, confounder, psd=False: _dcka_prepare(stat, confounder, psd),
    bilinear_matrix, options={"psd": False}, needs_confounder=True, float32_grams=True,
    reference="Cui et al., NeurIPS 2022 (deconfounded linear CKA)",
))

from . import family  # noqa: E402,F401  (registers the Procrustes/CCA/RSA/k-NN family)
