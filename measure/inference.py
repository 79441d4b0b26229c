"""Calibrated statistics for any measure: permutation tests and bootstrap confidence intervals.

Both work on the per-layer statistics the engine already holds (the n × n
Gram, or the features for feature measures), so no model is rerun and no store
is reread:

- **Permutation test** of H₀ "no correspondence between the samples of A and
  B". One permutation π of the n samples is drawn per round and applied to
  *every* layer of B at once (the Gram becomes K[π][:, π], features X[π]; dCKA's
  confounder is permuted with B, whose inputs they are), so the L_A × L_B null
  matrices keep the dependence between layers and a maximum over layer pairs
  stays calibrated. Measures whose per-layer object can be permuted directly
  (spectral bases, RDMs, k-NN indicators) skip re-preparing. With N rounds,

      p_ij      = (1 + #{b : T_b[i, j] ≥ T[i, j]}) / (1 + N)         (per entry, add-one correction),
      p_ij^FWER = (1 + #{b : max_kl T_b[k, l] ≥ T[i, j]}) / (1 + N)  (max-statistic, Westfall & Young 1993),

  with T the similarity (the negated distance for distance measures). The
  smallest p^FWER is the family-wise p-value of "some layer pair corresponds".
- **Bootstrap** over samples: B resamples of n sample indices drawn with
  replacement; each layer statistic becomes K[idx][:, idx] (X[idx]) for both
  models with the same idx, and the percentile interval of the resampled
  values at ``level`` is reported. Copies of one sample would look perfectly
  similar to each other in every representation; measures built on pairs of
  distinct samples (``rsa``, ``mutual_knn``) are told which resampled rows are
  copies and leave those pairs out. Kernel measures treat the resample as a
  weighted empirical distribution (the usual bootstrap of a V-statistic); CCA
  measures see only the ≈ 63 % distinct samples, so their resampled values
  are biased upward when features are many.

Both are reproducible from ``seed`` (a CPU ``torch.Generator``). Measures on
per-batch Grams (``cka_minibatch``) cannot be permuted or resampled from their
statistic and are refused.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import MeasureError
from .functional.dcka import confounder_gram
from .measures.base import statistic_of
from .registry import get_measure
from .validation import as_samples_matrix, check_finite, check_same_samples

if TYPE_CHECKING:
    from .measures.base import Measure

__all__ = [
    "BootstrapResult",
    "PermutationResult",
    "add_statistics",
    "check_supported",
    "bootstrap",
    "bootstrap_statistics",
    "pair_statistics",
    "permutation_test",
    "permutation_test_statistics",
]

_TIE_TOLERANCE = 1e-12


@dataclass
class PermutationResult:
    """A permutation test of one L_A × L_B matrix.

    Attributes
    ----------
    observed : ndarray of shape (n_layers_a, n_layers_b)
    pvalues : ndarray of shape (n_layers_a, n_layers_b)
        Per-entry p-values, (1 + #{null ≥ observed}) / (1 + N).
    pvalues_fwer : ndarray of shape (n_layers_a, n_layers_b)
        Max-statistic (family-wise) adjusted p-values over all entries.
    pvalue_max : float
        Family-wise p-value of the most similar entry (min of ``pvalues_fwer``).
    null_max : ndarray of shape (n_permutations,)
        The largest null value of each round (smallest for distances).
    n_permutations, seed : int
    """

    observed: np.ndarray
    pvalues: np.ndarray
    pvalues_fwer: np.ndarray
    pvalue_max: float
    null_max: np.ndarray
    n_permutations: int
    seed: int


@dataclass
class BootstrapResult:
    """Percentile bootstrap intervals of one L_A × L_B matrix.

    Attributes
    ----------
    observed, low, high : ndarray of shape (n_layers_a, n_layers_b)
        The full-data value and the interval's bounds.
    level : float
        Nominal coverage, e.g. 0.95 (quantiles (1 − level)/2 and (1 + level)/2).
    samples : ndarray of shape (n_resamples, n_layers_a, n_layers_b)
        The resampled values.
    n_resamples, seed : int
    """

    observed: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    samples: np.ndarray
    n_resamples: int
    seed: int


# --------------------------------------------------------------------------- helpers
def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MeasureError(f"{what} must be a positive integer, for example 999; got {value!r}.")
    return int(value)


def check_supported(spec: type[Measure]) -> None:
    """Refuse a measure whose statistic cannot be permuted or resampled (per-batch Grams, sketches)."""
    if spec.statistic == "gram_blocks":
        raise MeasureError(
            f"{spec.name} works on per-batch Grams, which cannot be permuted or resampled across batches; "
            "run the permutation test or bootstrap with cka or cka_debiased instead."
        )
    if spec.statistic == "sketch":
        raise MeasureError(
            f"{spec.name} works on sketches of the Gram, which cannot be permuted or resampled by sample; "
            "run the permutation test or bootstrap with cka (exact) instead."
        )


def _take(statistic: torch.Tensor, index: torch.Tensor, kind: str) -> torch.Tensor:
    """The statistic of the samples ``index`` (a permutation or a resample): K[idx][:, idx] or X[idx]."""
    if kind == "gram":
        return statistic[index][:, index]
    return statistic[index]


def _accepts_sample_ids(spec: type[Measure]) -> bool:
    try:
        return "sample_ids" in inspect.signature(spec.prepare).parameters
    except (TypeError, ValueError):
        return False


def _prepare_all(spec: type[Measure], options: dict[str, Any], statistics: Sequence[Any],
                 confounder: torch.Tensor | None, sample_ids: torch.Tensor | None = None) -> list[Any]:
    extra = {"sample_ids": sample_ids} if sample_ids is not None and _accepts_sample_ids(spec) else {}
    return [spec.prepare(s, confounder=confounder, **options, **extra) for s in statistics]


def _matrix(spec: type[Measure], rows: Sequence[Any], cols: Sequence[Any]) -> torch.Tensor:
    return spec.pair_matrix(rows, cols).to(torch.float64)


def _signed(spec: type[Measure], matrix: torch.Tensor) -> torch.Tensor:
    """Larger is more extreme: the similarity, or the negated distance."""
    return -matrix if spec.kind == "distance" else matrix


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MeasureError(f"seed must be an integer, got {seed!r}.")
    return torch.Generator().manual_seed(int(seed))


def _n_samples(statistics: Sequence[Any]) -> int:
    return int(statistics[0].shape[0])


# --------------------------------------------------------------------------- on statistics
def permutation_test_statistics(
    spec: type[Measure] | str,
    options: dict[str, Any],
    statistics_a: Sequence[Any],
    statistics_b: Sequence[Any],
    *,
    confounder: torch.Tensor | None = None,
    n_permutations: int = 999,
    seed: int = 0,
    prepared_a: Sequence[Any] | None = None,
    prepared_b: Sequence[Any] | None = None,
) -> PermutationResult:
    """Permutation test on per-layer statistics (the engine's Grams or features).

    Parameters
    ----------
    spec : Measure or str
    options : dict
        Resolved measure options.
    statistics_a, statistics_b : list of Tensor
        One statistic per layer of each model (n × n Grams, or (n, p) features), same samples.
    confounder : Tensor of shape (n_samples, n_samples), optional
        dCKA's input Gram; permuted along with model B.
    n_permutations : int, default=999
    seed : int, default=0
    prepared_a, prepared_b : list, optional
        The already prepared observed objects (saves one ``prepare`` per layer).
    """
    spec = get_measure(spec) if isinstance(spec, str) else spec
    check_supported(spec)
    n_permutations = _check_count(n_permutations, "n_permutations")
    generator = _generator(seed)
    n = _n_samples(statistics_a)
    rows = list(prepared_a) if prepared_a is not None else _prepare_all(spec, options, statistics_a, confounder)
    cols = list(prepared_b) if prepared_b is not None else _prepare_all(spec, options, statistics_b, confounder)
    observed = _signed(spec, _matrix(spec, rows, cols))
    device = observed.device
    fast = confounder is None and all(hasattr(p, "permuted") for p in cols)
    exceed = torch.zeros_like(observed)
    null_max = torch.empty(n_permutations, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the observed run has already warned about each layer
        for b in range(n_permutations):
            index = torch.randperm(n, generator=generator).to(device)
            if fast:
                permuted = [p.permuted(index) for p in cols]
            else:
                k0 = None if confounder is None else confounder[index][:, index]
                permuted = _prepare_all(spec, options, [_take(s, index, spec.statistic) for s in statistics_b], k0)
            null = _signed(spec, _matrix(spec, rows, permuted))
            exceed += (null >= observed - _TIE_TOLERANCE * (observed.abs() + 1)).to(torch.float64)
            finite = null[torch.isfinite(null)]
            null_max[b] = finite.max() if finite.numel() else float("nan")
    observed_np = observed.cpu().numpy()
    null_max_np = null_max.cpu().numpy()
    pvalues = (1 + exceed.cpu().numpy()) / (1 + n_permutations)
    tolerance = _TIE_TOLERANCE * (np.abs(observed_np) + 1)
    fwer_counts = (null_max_np[None, None, :] >= (observed_np - tolerance)[..., None]).sum(axis=-1)
    pvalues_fwer = (1 + fwer_counts) / (1 + n_permutations)
    undefined = ~np.isfinite(observed_np)
    pvalues[undefined] = np.nan
    pvalues_fwer[undefined] = np.nan
    sign = -1.0 if spec.kind == "distance" else 1.0
    return PermutationResult(
        observed=sign * observed_np, pvalues=pvalues, pvalues_fwer=pvalues_fwer,
        pvalue_max=float(np.nanmin(pvalues_fwer)) if not undefined.all() else float("nan"),
        null_max=sign * null_max_np, n_permutations=n_permutations, seed=int(seed),
    )


def bootstrap_statistics(
    spec: type[Measure] | str,
    options: dict[str, Any],
    statistics_a: Sequence[Any],
    statistics_b: Sequence[Any],
    *,
    confounder: torch.Tensor | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    observed: np.ndarray | None = None,
) -> BootstrapResult:
    """Percentile bootstrap over samples on per-layer statistics (same resample for both models).

    Parameters are those of ``permutation_test_statistics``; ``level`` is the nominal coverage and
    ``observed`` the full-data matrix when already known.
    """
    spec = get_measure(spec) if isinstance(spec, str) else spec
    check_supported(spec)
    n_resamples = _check_count(n_resamples, "n_resamples")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise MeasureError(f"level must be a coverage in (0, 1), for example 0.95; got {level!r}.")
    generator = _generator(seed)
    n = _n_samples(statistics_a)
    if observed is None:
        rows = _prepare_all(spec, options, statistics_a, confounder)
        cols = _prepare_all(spec, options, statistics_b, confounder)
        observed = _matrix(spec, rows, cols).cpu().numpy()
    device = statistics_a[0].device
    samples = np.empty((n_resamples, *observed.shape), dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(n_resamples):
            index = torch.randint(0, n, (n,), generator=generator).to(device)
            k0 = None if confounder is None else confounder[index][:, index]
            try:
                rows = _prepare_all(spec, options, [_take(s, index, spec.statistic) for s in statistics_a], k0, index)
                cols = _prepare_all(spec, options, [_take(s, index, spec.statistic) for s in statistics_b], k0, index)
                samples[b] = _matrix(spec, rows, cols).cpu().numpy()
            except (MeasureError, ValueError):  # e.g. a resample with too few distinct samples
                samples[b] = np.nan
    alpha = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries (undefined layers)
        low = np.nanquantile(samples, alpha, axis=0)
        high = np.nanquantile(samples, 1 - alpha, axis=0)
    return BootstrapResult(observed=np.asarray(observed, dtype=np.float64), low=low, high=high, level=float(level),
                           samples=samples, n_resamples=n_resamples, seed=int(seed))


# --------------------------------------------------------------------------- in memory
def _layers(x: Any, name: str) -> list[torch.Tensor]:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if not items:
        raise MeasureError(f"{name} is empty; pass an array of shape (n_samples, ...) or a list of them.")
    out = [as_samples_matrix(item, f"{name}[{i}]") for i, item in enumerate(items)]
    for i, m in enumerate(out):
        check_same_samples(out[0], m, (f"{name}[0]", f"{name}[{i}]"))
        check_finite(m, f"{name}[{i}]")
    return out


def _in_memory(xs: Any, ys: Any, name: str, confounder: Any, options: dict[str, Any]):
    spec = get_measure(name)
    check_supported(spec)
    opts = spec.resolve_options(options)
    a, b = _layers(xs, "xs"), _layers(ys, "ys")
    check_same_samples(a[0], b[0], ("xs", "ys"))
    k0 = None
    if spec.needs_confounder:
        if confounder is None:
            raise MeasureError(f"Measure {name!r} needs the inputs: pass confounder= (shape (n_samples, ...)).")
        z = as_samples_matrix(confounder, "confounder")
        check_same_samples(a[0], z, ("xs", "confounder"))
        k0 = confounder_gram(z)
    stats_a = [statistic_of(spec, m, opts) for m in a]
    stats_b = [statistic_of(spec, m, opts) for m in b]
    return spec, opts, stats_a, stats_b, k0


def permutation_test(xs: Any, ys: Any, name: str = "cka", *, n_permutations: int = 999, seed: int = 0,
                     confounder: Any = None, **options: Any) -> PermutationResult:
    """Permutation test of "no sample correspondence" between the layers ``xs`` and ``ys``.

    Parameters
    ----------
    xs, ys : array of shape (n_samples, ...) or list of them
        The layers of model A and of model B (one permutation is shared by all layers of B).
    name : str, default="cka"
        A registered measure.
    n_permutations : int, default=999
    seed : int, default=0
    confounder : array of shape (n_samples, ...), optional
        The inputs, for ``dcka``.
    **options
        Measure options.

    Returns
    -------
    PermutationResult

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    >>> permutation_test(x, x + 0.1 * torch.randn(30, 4, generator=g, dtype=torch.float64), n_permutations=99).pvalues
    array([[0.01]])
    """
    spec, opts, stats_a, stats_b, k0 = _in_memory(xs, ys, name, confounder, options)
    return permutation_test_statistics(spec, opts, stats_a, stats_b, confounder=k0,
                                       n_permutations=n_permutations, seed=seed)


def bootstrap(xs: Any, ys: Any, name: str = "cka", *, n_resamples: int = 1000, level: float = 0.95,
              seed: int = 0, confounder: Any = None, **options: Any) -> BootstrapResult:
    """Percentile bootstrap confidence intervals over samples for the layers ``xs`` × ``ys``.

    Parameters are those of ``permutation_test``; ``level`` is the nominal coverage.
    """
    spec, opts, stats_a, stats_b, k0 = _in_memory(xs, ys, name, confounder, options)
    return bootstrap_statistics(spec, opts, stats_a, stats_b, confounder=k0, n_resamples=n_resamples,
                                level=level, seed=seed)


# --------------------------------------------------------------------------- on the engine
def pair_statistics(engine: Any, name: str, options: dict[str, Any], i: int, j: int, *,
                    n_permutations: int = 0, n_resamples: int = 0, level: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """Permutation p-values and/or bootstrap intervals for stores ``i`` × ``j`` of an ``Engine``.

    Uses (and fills) the engine's cached per-layer statistics. Returns a dict of
    (n_layers_i, n_layers_j) matrices — ``pvalues``, ``pvalues_fwer``, ``ci_low``,
    ``ci_high`` — and scalars describing how they were computed.
    """
    spec = get_measure(name)
    check_supported(spec)
    options = spec.resolve_options(options)
    confounder = engine.confounder() if spec.needs_confounder else None
    stats_a = [engine.statistic(spec, i, layer, options) for layer in engine.layers[i]]
    stats_b = stats_a if j == i else [engine.statistic(spec, j, layer, options) for layer in engine.layers[j]]
    out: dict[str, Any] = {"seed": int(seed)}
    if n_permutations:
        test = permutation_test_statistics(spec, options, stats_a, stats_b, confounder=confounder,
                                           n_permutations=n_permutations, seed=seed)
        out.update(pvalues=test.pvalues, pvalues_fwer=test.pvalues_fwer, pvalue_max=test.pvalue_max,
                   n_permutations=test.n_permutations)
    if n_resamples:
        boot = bootstrap_statistics(spec, options, stats_a, stats_b, confounder=confounder,
                                    n_resamples=n_resamples, level=level, seed=seed)
        out.update(ci_low=boot.low, ci_high=boot.high, level=boot.level, n_resamples=boot.n_resamples)
    return out


def add_statistics(engine: Any, results: Sequence[Any], *, n_permutations: int = 0, n_resamples: int = 0,
                   level: float = 0.95, seed: int = 0) -> None:
    """Fill ``result.inference`` of each engine ``PairResult`` with p-values and/or bootstrap bounds.

    Every result uses the same ``seed``, so the permutations (resamples) are the same for every pair and
    measure of one run.
    """
    if not (n_permutations or n_resamples):
        return
    index = {store.name: s for s, store in enumerate(engine.stores)}
    for result in results:
        result.inference = pair_statistics(
            engine, result.measure, result.options, index[result.store_a], index[result.store_b],
            n_permutations=n_permutations, n_resamples=n_resamples, level=level, seed=seed,
        )
