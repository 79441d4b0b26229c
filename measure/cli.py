"""The ``pipeline.py measure`` command.

``measure_command_parser(subparsers=None)`` builds the parser (standalone, or registered under
``subparsers`` with ``set_defaults(func=measure_command)``); ``measure_command(args)`` runs it:
the flags become one ``EngineConfig`` (``engine_config``), the ``Engine`` measures every pair of
stores, ``measure.inference`` adds p-values or bootstrap bounds, and ``measure.report`` writes
the results table, per-pair CSVs and heatmaps (``--pair-csvs``, ``--plots``: every pair up to
``AUTO_MAX_STORES`` stores by default), the manifest and the HTML page. Each step is one small
function below.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extract.cli import exit_on_known_errors

from .errors import MeasureError

if TYPE_CHECKING:
    from extract.store import ZarrStore

    from .engine import Engine, EngineConfig, PairResult
    from .engine.cache import StatisticsCache

# The parser is built from the standard library alone (``pipeline.py measure --help`` imports no torch, numpy or
# zarr); the command bodies import the engine, stores and report where they use them.

__all__ = [
    "AUTO_MAX_STORES",
    "add_measure_arguments",
    "engine_config",
    "find_stores",
    "measure_command",
    "measure_command_parser",
    "parse_measure",
    "per_pair_files",
    "refine_results",
    "run_measure",
    "store_pairs",
]

DEFAULT_MEASURES = ["cka", "cka_debiased", "cka_rbf", "dcka"]
DEFAULT_STORES = Path("data/activations")
DEFAULT_OUT = Path("data/results")
AUTO_MAX_STORES = 6  # --plots / --pair-csvs auto: per-pair files up to this many stores (the report's detail limit)

MEASURE_EXAMPLE = """\
examples:
  python pipeline.py measure
      every store in data/activations/ against every other and itself with
      cka, cka_debiased, cka_rbf and dcka -> data/results/
  python pipeline.py measure data/activations/cnn_seed0.zarr data/activations/cnn_seed1.zarr \\
      --measures cka 'cka_rbf(threshold=0.8)' 'cka_minibatch(batch_size=128)' --layers 'block*' --out results/
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the memory budget must be positive, got {text}")
    return value


def _count(text: str) -> int:
    """argparse type: a non-negative integer (0 turns the statistic off)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (0: off), got {text!r}")
    return value


def _refine_count(text: str) -> int:
    """argparse type of ``--refine``: a non-negative integer (0: no refinement)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (pairs from each end of the ranking; "
                                         f"0: none), got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type of ``--refine-margin``: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``measure`` command's arguments (and its examples as the epilog) to ``parser``."""
    parser.epilog = MEASURE_EXAMPLE
    parser.add_argument("stores", nargs="*", help="stores, folders of stores, or globs (default data/activations)")
    parser.add_argument("--measures", nargs="+", default=None, metavar="NAME",
                        help=f"measures, optionally with options: 'cka_rbf(threshold=0.8)' "
                             f"(default {' '.join(DEFAULT_MEASURES)})")
    parser.add_argument("--out", default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN", help="layer names or globs to compare")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--memory-budget", type=_positive_float, default=1.0, metavar="GIB",
                        help="GiB of features held at once while building Grams (default 1)")
    parser.add_argument("--precision", choices=["auto", "float64", "float32"], default="auto",
                        help="Gram products: float32 on column-centred activations with float64 offsets "
                             "(~2x faster on CPU; error bound in measure.functional.gram.linear_gram), or "
                             "float64. auto (default): float32 for float32/float16 stores, float64 for "
                             "float64 stores and for procrustes, cca, svcca, linreg (which refuse float32)")
    parser.add_argument("--undefined", choices=["raise", "nan"], default="raise",
                        help="undefined values (constant layers...): stop with an error, or write NaN")
    parser.add_argument("--plots", choices=["auto", "all", "none"], default="auto",
                        help=f"PNG heatmap per pair: auto (default) = every pair with at most {AUTO_MAX_STORES} "
                             f"stores, none beyond (zoos: report.html draws any pair on demand)")
    parser.add_argument("--no-plots", dest="plots", action="store_const", const="none",
                        help="skip the PNG heatmaps (same as --plots none)")
    parser.add_argument("--pair-csvs", choices=["auto", "all", "none"], default="auto",
                        help=f"one CSV matrix per pair beside the results table: auto (default) = with at most "
                             f"{AUTO_MAX_STORES} stores, none beyond")
    parser.add_argument("--list-measures", action="store_true", help="print the measures and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--reduce", nargs="+", metavar="RULE",
                        help="measurement-time per-layer reductions of stored layers: flatten, mean, first, last, "
                             "gap, pool<k>, or PATTERN=REDUCTION ('block*=gap'); default: as stored")
    parser.add_argument("--mixed-reductions", action="store_true",
                        help="compare same-named layers even when their stores reduced them differently")
    parser.add_argument("--no-report", action="store_true", help="skip report.html (the HTML run report)")
    scale = parser.add_argument_group("scaling out (zoos, cache, dask, remote stores)")
    scale.add_argument("--cache", default=None, metavar="DIR",
                       help="statistics cache (Zarr group, path or URL; default STORES_FOLDER/.simtorch-cache.zarr)")
    scale.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="compute per-layer statistics on a local dask cluster of N worker processes")
    scale.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="'threads' (dask's local threaded scheduler) or tcp://host:port of a running cluster")
    scale.add_argument("--storage-options", default=None, metavar="JSON",
                       help="fsspec options for URL stores, e.g. '{\"anon\": false}' (credentials: AWS_* env vars)")
    stats = parser.add_argument_group("statistics (measure.inference), written beside each matrix")
    stats.add_argument("--permutations", type=_count, default=0, metavar="N",
                       help="permutation test with N permutations: <pair>.pvalues.csv and .pvalues_fwer.csv")
    stats.add_argument("--bootstrap", type=_count, default=0, metavar="N",
                       help="percentile bootstrap with N resamples: <pair>.ci_low.csv and .ci_high.csv")
    stats.add_argument("--ci-level", type=float, default=0.95, metavar="LEVEL",
                       help="bootstrap interval coverage (default 0.95)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the permutations and resamples (default 0)")
    refine = parser.add_argument_group("refinement: approximate measures (cka_sketch) recomputed exactly where it "
                                       "matters, marked in the table and report")
    refine.add_argument("--refine", type=_refine_count, default=0, metavar="K",
                        help="recompute exactly (with the measure it estimates: cka) the K most and the K least "
                             "similar layer pairs of each approximate measure (default 0: none)")
    refine.add_argument("--refine-threshold", type=float, default=None, metavar="T",
                        help="also recompute every pair whose approximate value lies within --refine-margin of T")
    refine.add_argument("--refine-margin", type=_non_negative_float, default=None, metavar="M",
                        help="half-width of the band around --refine-threshold (default 3x the stated "
                             "standard deviation of the approximation)")


def measure_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The ``measure`` parser: registered under ``subparsers`` (bound to ``measure_command``), or standalone."""
    kwargs: dict[str, Any] = dict(description="Compare the layers of stores with similarity measures.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    if subparsers is None:
        parser = argparse.ArgumentParser(**kwargs)
    else:
        parser = subparsers.add_parser("measure", **kwargs)
        parser.set_defaults(func=measure_command)
    add_measure_arguments(parser)
    return parser


@exit_on_known_errors
def measure_command(args: argparse.Namespace) -> int:
    """Measure every requested pair of stores (``run_measure``); each warning is printed as one line."""
    with warnings.catch_warnings(record=True) as caught:  # warnings (NaN with --undefined nan...): one line each
        warnings.simplefilter("default")
        try:
            return run_measure(args)
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


def parse_measure(text: str) -> tuple[str, dict[str, Any]]:
    """'cka_rbf(threshold=0.8)' -> ('cka_rbf', {'threshold': 0.8}); values are JSON or bare words."""
    from .registry import get_measure

    name, _, rest = text.partition("(")
    name = name.strip()
    get_measure(name)
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith(")"):
            raise MeasureError(f"Cannot parse measure {text!r}: expected NAME(option=value, ...).")
        for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise MeasureError(f"Cannot parse option {item!r} of {text!r}: expected option=value.")
            try:
                options[key.strip()] = json.loads(value.strip())
            except json.JSONDecodeError:
                options[key.strip()] = {"True": True, "False": False}.get(value.strip(), value.strip())
    return name, options


def find_stores(specs: list[str], storage_options: dict[str, Any] | None = None) -> list[Path]:
    """Store paths from explicit paths, folders holding ``*.zarr`` stores, and globs (URLs too: str entries)."""
    from extract.store.remote import find_stores as find_url_stores
    from extract.store.remote import is_url

    specs = specs or [str(DEFAULT_STORES)]
    found: list[Path] = []
    urls: list[str] = []
    for spec in specs:
        path = Path(spec)
        if is_url(spec):
            got = find_url_stores(spec, storage_options)
            if not got:
                raise MeasureError(f"No store at {spec}; check the URL and credentials (AWS_* variables or "
                                   "--storage-options).")
            urls.extend(got)
        elif path.is_dir() and path.suffix != ".zarr" and not (path / "zarr.json").exists():
            found.extend(sorted(p for p in path.glob("*.zarr") if p.is_dir() and not p.name.startswith(".")))
        elif any(c in spec for c in "*?["):
            found.extend(sorted(Path(p) for p in glob.glob(spec)))
        else:
            if not path.exists():
                raise MeasureError(f"No store at {spec}; check the path (stores are written by `pipeline.py extract`).")
            found.append(path)
    if not found and not urls:
        raise MeasureError(f"No stores found in {specs}; run `python pipeline.py extract` first.")
    unique = list(dict.fromkeys([*(p.resolve() for p in found), *urls]))
    return unique


def store_pairs(n: int, symmetric: bool) -> list[tuple[int, int]]:
    """Every store against every other and itself: unordered for symmetric measures, ordered otherwise."""
    if symmetric:
        return list(itertools.combinations_with_replacement(range(n), 2))
    return list(itertools.product(range(n), repeat=2))


def run_measure(args: argparse.Namespace) -> int:
    """``_run_measure``, with a lost connection to remote storage turned into a one-line error."""
    try:
        return _run_measure(args)
    except MeasureError:
        raise
    except Exception as exc:
        from extract.store.remote import unreachable_message

        message = unreachable_message("Remote storage", exc)
        if message is None:
            raise
        raise MeasureError(message) from exc


def _run_measure(args: argparse.Namespace) -> int:
    """Parse the measures, open the stores and the cache, measure, write the results, print the summary."""
    from extract.store.remote import parse_storage_options

    from .engine import Engine
    from .registry import get_measure

    if args.list_measures:
        _print_measures()
        return 0
    measures = _parse_measures(args)
    storage_options = parse_storage_options(getattr(args, "storage_options", None))
    paths = find_stores(args.stores, storage_options)
    stores = _open_stores(paths, storage_options)
    progress = _ProgressBar(sum(len(store_pairs(len(stores), get_measure(m).symmetric)) for m, _ in measures),
                            quiet=args.quiet)
    cache = _open_cache(args, paths, storage_options)
    engine = Engine(stores, config=engine_config(args, progress=progress, cache=cache))
    for name, _ in measures:
        engine.check_precision(get_measure(name))
    results, refinement = _measure(engine, measures, args, storage_options, progress)
    manifest, out = _write_outputs(results, engine, stores, paths, args, storage_options, refinement)
    if not args.quiet:
        _print_summary(results)
    if cache is not None and not args.quiet:
        print(_statistics_line(engine, cache))
    print(f"wrote {len(results)} result(s) to {out}/ (manifest {manifest})")
    return 0


def _statistics_line(engine: Engine, cache: StatisticsCache) -> str:
    """'statistics: N computed, M reused from CACHE': layer statistics only; dCKA's Grams of the stored
    inputs, when used, are named apart ('(+ inputs: ...)')."""
    stats = engine.layer_statistics
    line = f"statistics: {stats.computed} computed, {stats.reused} reused from {cache.path}"
    if any(stats.inputs.values()):
        line += f" (+ inputs: {stats.inputs['computed']} computed, {stats.inputs['reused']} reused)"
    return line


def _print_measures() -> None:
    """``--list-measures``: one line per registered measure."""
    from .registry import MEASURES

    for name in sorted(MEASURES):
        spec = MEASURES[name]
        print(f"{name:15s} {'symmetric' if spec.symmetric else 'asymmetric':10s} {spec.kind:10s} "
              f"options={spec.describe()['options']}  {spec.reference}")


def _parse_measures(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The requested measures with their options, checked (with the inference flags) before any work."""
    from .inference import check_supported
    from .registry import get_measure

    measures = [parse_measure(m) for m in (args.measures or DEFAULT_MEASURES)]
    for name, options in measures:
        get_measure(name).resolve_options(options)
    if getattr(args, "permutations", 0) or getattr(args, "bootstrap", 0):
        for name, _ in measures:
            check_supported(get_measure(name))
        if not 0 < getattr(args, "ci_level", 0.95) < 1:
            raise MeasureError(f"--ci-level must be in (0, 1), for example 0.95; got {args.ci_level}.")
    _check_refinement(args, measures)
    return measures


# The exact measure each approximate one estimates: what ``--refine`` recomputes with.
EXACT_MEASURE = {"cka_sketch": "cka"}


def _refining(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "refine", 0)) or getattr(args, "refine_threshold", None) is not None


def _check_refinement(args: argparse.Namespace, measures: list[tuple[str, dict[str, Any]]]) -> None:
    """``--refine``, ``--refine-threshold`` and ``--refine-margin``: sensible together and with the measures."""
    from .registry import get_measure

    k = getattr(args, "refine", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MeasureError(f"--refine must be a non-negative integer (pairs from each end of the ranking), got {k!r}.")
    if getattr(args, "refine_margin", None) is not None and getattr(args, "refine_threshold", None) is None:
        raise MeasureError("--refine-margin is the band around --refine-threshold; give --refine-threshold T too.")
    if not _refining(args):
        return
    approximate = [name for name, _ in measures if get_measure(name).approximate]
    if not approximate:
        raise MeasureError(f"--refine and --refine-threshold recompute the values of an approximate measure "
                           f"({', '.join(sorted(EXACT_MEASURE))}); the measures {[n for n, _ in measures]} are "
                           "exact already.")
    unknown = sorted(set(approximate) - set(EXACT_MEASURE))
    if unknown:
        raise MeasureError(f"No exact measure is known for {unknown}; --refine applies to "
                           f"{', '.join(sorted(EXACT_MEASURE))}.")


def refine_results(engine: Engine, results: list[PairResult], k: int, *, threshold: float | None = None,
                   margin: float | None = None) -> tuple[list[PairResult], list[dict[str, Any]]]:
    """``results`` with, per approximate measure (and options), the cells ``measure.refine.select_cells``
    picks recomputed exactly by ``engine`` with the measure it estimates (``EXACT_MEASURE``); the refined
    entries are listed in their result's ``extras["refined"]``.

    Returns (results, one summary per approximate measure: ``measure``, ``options``, ``exact_measure``,
    ``margin`` (the band used around ``threshold``; None without one) and ``pairs``, the pairs recomputed).
    """
    from .refine import default_margin, refine, select_cells

    groups: dict[str, list[int]] = {}
    for index, r in enumerate(results):
        if getattr(r.spec, "approximate", False):
            groups.setdefault(json.dumps([r.measure, r.options], sort_keys=True, default=str), []).append(index)
    out = list(results)
    summary = []
    for indices in groups.values():
        own = [results[i] for i in indices]
        name = own[0].measure
        if name not in EXACT_MEASURE:
            raise MeasureError(f"No exact measure is known for {name!r}; --refine applies to "
                               f"{', '.join(sorted(EXACT_MEASURE))}.")
        band = None if threshold is None else (default_margin(own) if margin is None else float(margin))
        cells = select_cells(own, k, threshold=threshold, margin=band)
        if cells:
            for i, r in zip(indices, refine(engine, own, cells, EXACT_MEASURE[name], {}), strict=True):
                out[i] = r
        summary.append({"measure": name, "options": own[0].options, "exact_measure": EXACT_MEASURE[name],
                        "margin": band, "pairs": len(cells)})
    return out, summary


def _open_stores(paths: Sequence[Path | str], storage_options: dict[str, Any] | None) -> list[ZarrStore]:
    """The stores at ``paths``, read-only; model names must be unique (they name the result files)."""
    from extract.store import ZarrStore

    from .report.files import check_file_names

    stores = [ZarrStore(p, read_only=True, storage_options=storage_options) for p in paths]
    names = [s.name for s in stores]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise MeasureError(f"Several stores share the model name(s) {dupes}; results would overwrite each other. "
                           "Re-extract with distinct --name values.")
    check_file_names(names)  # result files: distinct for names that sanitise alike ("m a", "m_a", "m/a")
    return stores


def _open_cache(args: argparse.Namespace, paths: Sequence[Path | str],
                storage_options: dict[str, Any] | None) -> StatisticsCache | None:
    """The statistics cache of ``--cache`` (default: beside the first store), or None with ``--no-cache``."""
    if getattr(args, "no_cache", False):
        return None
    from .engine.cache import StatisticsCache, default_cache_path

    return StatisticsCache(getattr(args, "cache", None) or default_cache_path([str(p) for p in paths]),
                           storage_options=storage_options)


def engine_config(args: argparse.Namespace, *, progress: Any = None,
                  cache: StatisticsCache | None = None) -> EngineConfig:
    """The engine's options from the command's flags: the one place they are translated."""
    from .engine import EngineConfig

    return EngineConfig(device=args.device, layers=args.layers, memory_budget=int(args.memory_budget * 2**30),
                        undefined=args.undefined, progress=progress, cache=cache,
                        reduce=getattr(args, "reduce", None), mixed_reductions=getattr(args, "mixed_reductions", False),
                        precision=getattr(args, "precision", "auto"))


class _ProgressBar:
    """The engine's ``progress`` callback: a bar of pairs, drawn once the stores are checked (``open``),
    so that refusals print no half-drawn bar."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.bar: Any = None

    def open(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="measure", unit="pair", disable=self.quiet, leave=False)

    def __call__(self, message: str) -> None:
        if " × " in message:
            self.bar.update(1)
        self.bar.set_postfix_str(message[-40:])

    def close(self) -> None:
        self.bar.close()


def _measure(engine: Engine, measures: list[tuple[str, dict[str, Any]]], args: argparse.Namespace,
             storage_options: dict[str, Any] | None,
             progress: _ProgressBar) -> tuple[list[PairResult], list[dict[str, Any]] | None]:
    """Every measure on every pair of stores (Grams on dask when asked), then the inference statistics, then
    (``--refine``...) the chosen pairs of the approximate measures exactly; returns (results, the refinement's
    summary per approximate measure, None without refinement)."""
    from .engine.dask_tasks import compute_grams, dask_client, measure_on_cluster
    from .inference import add_statistics
    from .registry import get_measure

    results: list[PairResult] = []
    refinement = None
    progress.open()
    try:
        last_gram = max((k for k, (name, _) in enumerate(measures) if get_measure(name).statistic == "gram"),
                        default=-1)
        planned = [name for name, _ in measures]
        with dask_client(getattr(args, "workers", None), getattr(args, "scheduler", None)) as client:
            if client is not None or getattr(args, "scheduler", None) == "threads":
                compute_grams(engine, measures, client=client, storage_options=storage_options, device=args.device)
            engine.plan(planned)  # linear CKA's auto route knows which Grams are formed anyway
            for k, (name, options) in enumerate(measures):
                pairs = store_pairs(len(engine.stores), get_measure(name).symmetric)
                if client is not None and len(engine.stores) > 2:  # a zoo's pairs in tiles on the cluster
                    results.extend(measure_on_cluster(engine, client, name, options, pairs,
                                                      storage_options=storage_options, planned=planned))
                else:
                    results.extend(engine.run([(name, options)], pairs, release=k >= last_gram))  # Grams kept
        add_statistics(engine, results, n_permutations=getattr(args, "permutations", 0),
                       n_resamples=getattr(args, "bootstrap", 0), level=getattr(args, "ci_level", 0.95),
                       seed=getattr(args, "seed", 0))
        if _refining(args):  # the approximate measures' chosen pairs, exactly
            results, refinement = refine_results(engine, results, args.refine, threshold=args.refine_threshold,
                                                 margin=args.refine_margin)
    finally:
        progress.close()
    return results, refinement


def _write_outputs(results: list[PairResult], engine: Engine, stores: Sequence[ZarrStore],
                   paths: Sequence[Path | str], args: argparse.Namespace,
                   storage_options: dict[str, Any] | None,
                   refinement: list[dict[str, Any]] | None = None) -> tuple[Path | str, Path | str]:
    """Write the results (table, CSVs, PNGs, manifest, report) to ``--out``; returns (manifest, folder).

    ``refinement`` (``refine_results``' summary) goes to the manifest's ``refine``.

    Results for a URL are written to a local staging folder, then uploaded.
    """
    from extract.store.remote import is_url, upload_folder

    from .report import write_results

    out_url = str(args.out) if args.out and is_url(args.out) else None
    staging = tempfile.TemporaryDirectory(prefix="simtorch-results-") if out_url else None
    out = Path(staging.name) if staging else Path(args.out or DEFAULT_OUT)
    store_meta = _store_meta(engine, stores, paths)
    extra: dict[str, Any] = {"precision": engine.precision}
    if refinement is not None:
        extra["refine"] = {"k": args.refine, "threshold": args.refine_threshold, "measures": refinement}
    manifest = write_results(results, out, stores=store_meta, device=str(engine.device),
                             plots=per_pair_files(getattr(args, "plots", "auto"), len(stores)),
                             matrices=per_pair_files(getattr(args, "pair_csvs", "auto"), len(stores)),
                             extra=extra)
    if not getattr(args, "no_report", False):
        _write_report(results, out, store_meta, engine, manifest, args)
    if staging is None:
        return manifest, out
    upload_folder(out, out_url, storage_options)
    staging.cleanup()
    return f"{out_url.rstrip('/')}/{Path(manifest).name}", out_url


def per_pair_files(choice: str, n_stores: int) -> bool:
    """Whether ``--plots`` / ``--pair-csvs`` ``choice`` (auto, all, none) writes one file per pair for ``n_stores``
    stores: auto does up to ``AUTO_MAX_STORES`` stores, where report.html shows every pair's heatmap."""
    return choice == "all" or (choice == "auto" and n_stores <= AUTO_MAX_STORES)


def _store_meta(engine: Engine, stores: Sequence[ZarrStore], paths: Sequence[Path | str]) -> dict[str, dict[str, Any]]:
    """Per store name, what the manifest and report record: path, identity, layers and their reductions."""
    return {s.name: {"path": str(p), "fingerprint": s.info.fingerprint, "n_samples": s.n_samples,
                     "layers": engine.layers[i], "weights_digest": s.info.weights_digest,
                     "reductions": {k: engine.stores[i].info.reductions.get(k, "flatten") for k in engine.layers[i]}}
            for i, (s, p) in enumerate(zip(stores, paths, strict=True))}


def _write_report(results: list[PairResult], out: Path, store_meta: dict[str, dict[str, Any]], engine: Engine,
                  manifest: Path, args: argparse.Namespace) -> None:
    """``report.html`` beside the manifest, listing the run options that were set."""
    from .report import write_report

    run_options = {k: getattr(args, k, None) for k in ("layers", "reduce", "mixed_reductions", "undefined",
                                                        "permutations", "bootstrap", "refine", "refine_threshold",
                                                        "refine_margin")}
    write_report(results, out, stores=store_meta, device=str(engine.device), manifest=json.loads(
        Path(manifest).read_text()), options={k: v for k, v in run_options.items() if v not in (None, 0)})


def _print_summary(results: list[PairResult]) -> None:
    """For each pair of different stores and each measure: each layer of A's best match in B."""
    for r in results:
        if r.store_a == r.store_b:
            continue
        matches = ", ".join(f"{a}→{b} ({v:.2f})" for a, b, v in r.best_matches())
        print(f"{r.measure:13s} {r.store_a} vs {r.store_b}: {matches}")
