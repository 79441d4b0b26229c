"""``Measure``: what the engine, ``compare`` and the reports know about one similarity measure.

A measure is computed in two steps that the store engine and ``measure.compare`` share:
``prepare`` turns one layer's statistic (its n × n Gram, the Grams of consecutive batches, or
its (n_samples, n_features) features) into a per-layer object, and ``pair_matrix`` turns two
lists of those into the L_A × L_B matrix. A measure is a ``Measure`` subclass that declares
its properties as class attributes and implements those two classmethods with the kernels of
``measure.functional``; it is never instantiated.

To add a measure, add a module to this package with one such class per measure (a ``name``
of its own, an ``order`` if it should not come last); ``measure.registry`` collects it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..errors import MeasureError
from ..functional.cka import batch_grams
from ..functional.gram import linear_gram
from ..functional.sketch import sketch_from_features
from ..validation import check_options

__all__ = ["INVARIANCES", "STATISTICS", "Measure", "Option", "statistic_of"]

Statistic = Literal["gram", "gram_blocks", "features", "sketch"]
STATISTICS = ("gram", "gram_blocks", "features", "sketch")
KINDS = ("similarity", "distance")
# transforms T of one representation with S(T(X), Y) = S(X, Y): X Q (Q orthogonal), c X (c > 0),
# X + 1 vᵀ, and X A (A invertible)
INVARIANCES = frozenset({"orthogonal", "isotropic_scaling", "translation", "invertible_linear"})


@dataclass(frozen=True)
class Option:
    """One option of a measure: its default and the values it accepts, declared as data.

    Parameters
    ----------
    default : object, default=None
        The value used when the option is not given; ``None`` makes the option required.
    allowed : tuple or callable, optional
        The accepted values, or a predicate on a value; ``None`` accepts anything.
    message : str, default="{name} must be one of {allowed}, got {value!r}."
        The error for a value that ``allowed`` refuses; may use ``{name}``, ``{value}``,
        ``{allowed}`` and ``{measure}``.
    """

    default: Any = None
    allowed: tuple[Any, ...] | Callable[[Any], bool] | None = None
    message: str = "{name} must be one of {allowed}, got {value!r}."

    def check(self, name: str, value: Any, measure: str) -> None:
        """Raise ``MeasureError`` with ``message`` unless ``value`` is allowed."""
        if self.allowed is None:
            return
        try:
            ok = value in self.allowed if isinstance(self.allowed, tuple) else bool(self.allowed(value))
        except TypeError:  # a value of the wrong type for the predicate
            ok = False
        if not ok:
            raise MeasureError(self.message.format(name=name, value=value, allowed=self.allowed, measure=measure))


class Measure:
    """Base of the measure definitions; subclasses declare the attributes below.

    A subclass's ``Parameters`` section lists its options (``compare(x, y, name, **options)``,
    ``name(option=value)`` on the command line).

    Attributes
    ----------
    name : str
        Registry key, used on the command line and in result files.
    statistic : {"gram", "gram_blocks", "features", "sketch"}
        Per-layer input of ``prepare``: the n × n linear Gram, the Grams of consecutive
        batches of ``options['batch_size']`` samples, the (n_samples, n_features) matrix
        itself, or the fixed-size sketch of the centred Gram of ``measure.functional.sketch``
        (options ``sketch_size``, ``width``, ``seed``) (all float64).
    options : dict of str to Option
        The measure's options, their defaults and accepted values.
    symmetric : bool
        S(A, B) = S(B, A).
    value_range : (float, float)
    kind : {"similarity", "distance"}
    invariances : frozenset of str
        Transforms of either representation that leave the value unchanged under the default
        options, among ``INVARIANCES``.
    needs_confounder : bool
        Needs the inputs (the store's ``inputs`` array or ``confounder=``).
    reference : str
        The paper, and the variant computed.
    feature_route : str, optional
        Key of ``LinearCKAMatrix.compute()``'s output when the measure can also be computed
        from feature moments instead of Grams (its ``route`` option chooses; see ``choose_route``).
    float32_grams : bool
        Accurate on Grams formed with float32 products (``precision="float32"``): true for the
        kernel measures, false for those that whiten or take matrix square roots of the Gram.
    order : float
        Position in ``measure.MEASURES`` (ascending; ties keep module order).
    approximate : bool
        The value is a randomised estimate (a sketch), not the measure computed exactly.
    """

    name: ClassVar[str]
    statistic: ClassVar[Statistic]
    options: ClassVar[Mapping[str, Option]] = {}
    symmetric: ClassVar[bool] = True
    value_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    kind: ClassVar[Literal["similarity", "distance"]] = "similarity"
    invariances: ClassVar[frozenset[str]] = frozenset()
    needs_confounder: ClassVar[bool] = False
    reference: ClassVar[str] = ""
    feature_route: ClassVar[str | None] = None
    float32_grams: ClassVar[bool] = False
    order: ClassVar[float] = math.inf
    approximate: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Measure:
        raise TypeError(f"{cls.__name__} is a measure definition: use its classmethods "
                        f"({cls.__name__}.prepare, .pair_matrix, ...) without creating an instance.")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):
            return
        problems = []
        if cls.statistic not in STATISTICS:
            problems.append(f"statistic {cls.statistic!r} is not one of {STATISTICS}")
        if cls.kind not in KINDS:
            problems.append(f"kind {cls.kind!r} is not one of {KINDS}")
        if not isinstance(cls.invariances, frozenset) or not cls.invariances <= INVARIANCES:
            problems.append(f"invariances must be a frozenset of {sorted(INVARIANCES)}, got {cls.invariances!r}")
        problems += [f"option {k!r} is not an Option" for k, v in cls.options.items() if not isinstance(v, Option)]
        if problems:
            raise TypeError(f"Measure {cls.__name__} ({cls.name!r}): " + "; ".join(problems) + ".")

    @classmethod
    def prepare(cls, statistic: Any, *, confounder: torch.Tensor | None = None, **options: Any) -> Any:
        """The per-layer object of one layer's ``statistic`` (see ``statistic``), given the resolved options."""
        raise NotImplementedError(f"{cls.__name__}.prepare")

    @classmethod
    def pair_matrix(cls, rows: Sequence[Any], cols: Sequence[Any]) -> torch.Tensor:
        """The (len(rows), len(cols)) matrix of the measure between prepared row and column layers."""
        raise NotImplementedError(f"{cls.__name__}.pair_matrix")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option names and defaults (``None``: required)."""
        return {key: option.default for key, option in cls.options.items()}

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` merged into the defaults; unknown names, refused values and missing required options raise."""
        defaults = cls.defaults()
        options = check_options(cls.name, dict(given), defaults)
        for key, value in given.items():
            cls.options[key].check(key, value, cls.name)
        missing = [k for k, v in defaults.items() if v is None and k not in given]
        if missing:
            raise MeasureError(f"Measure {cls.name!r} needs option(s) {missing}, for example {missing[0]}=256.")
        return options

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """JSON-friendly properties (for manifests and ``--list-measures``)."""
        return {
            "name": cls.name, "statistic": cls.statistic, "options": cls.defaults(),
            "symmetric": cls.symmetric, "range": list(cls.value_range), "kind": cls.kind,
            "needs_confounder": cls.needs_confounder, "reference": cls.reference,
            "float32_grams": cls.float32_grams, "approximate": cls.approximate,
        }


def _batch_size(options: Mapping[str, Any], n: int) -> int:
    b = options.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 4:
        raise MeasureError(f"batch_size must be an integer ≥ 4 (unbiased HSIC needs 4 samples), got {b!r}.")
    if b > n:
        raise MeasureError(f"batch_size={b} exceeds the {n} samples; choose a batch_size ≤ {n}.")
    return b


def statistic_of(spec: type[Measure], x: torch.Tensor, options: Mapping[str, Any],
                 precision: str = "float64") -> Any:
    """The per-layer statistic ``spec`` needs, from the full (n_samples, n_features) matrix
    (float64, or float32 with ``precision="float32"``: Grams by ``linear_gram``'s float32 scheme)."""
    if spec.statistic == "gram":
        return linear_gram(x, precision)
    if spec.statistic == "gram_blocks":
        b = _batch_size(options, len(x))
        if len(x) % b:
            warnings.warn(f"{spec.name}: the last {len(x) % b} of {len(x)} samples do not fill a batch of "
                          f"{b} and are left out (equal-size batches).", stacklevel=3)
        return batch_grams(x, b, precision)
    if spec.statistic == "sketch":
        return sketch_from_features(x, options["sketch_size"], options["width"], options["seed"])
    return x
