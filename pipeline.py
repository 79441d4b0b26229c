#!/usr/bin/env python
"""simtorch command line: ``extract`` activations to stores, ``measure`` similarities between them.

    python pipeline.py extract            # the embedded demo zoo -> data/activations/
    python pipeline.py measure            # every demo store against every other -> data/results/

Each subcommand has ``<name>_command_parser(subparsers=None)`` and
``<name>_command(args)``; command bodies only call library entry points.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
import warnings
from pathlib import Path

DEFAULT_ACTIVATIONS = Path("data/activations")
DEFAULT_RESULTS = Path("data/results")

EXTRACT_EXAMPLE = """\
examples:
  python pipeline.py extract
      train the demo zoo on scikit-learn's digits (cached in data/models/) and
      extract it into data/activations/
  python pipeline.py extract --model extract.demo:cnn --weights data/models/cnn_seed1.pt \\
      --name seed1 --data digits --layers 'block*' fc1 fc2 --out data/activations
      one model; writes data/activations/seed1.zarr (rerun to resume or reuse it)
  python pipeline.py extract --config zoo.toml
      several models; the TOML file holds the flags as keys and a [[models]] table
      per model (keys model, weights, name, layers)
"""


class CommandError(Exception):
    """A user error found by the CLI itself."""


def _die_on_known_errors(func):
    """Print known errors as one line (no traceback) and return a non-zero exit code."""

    def wrapper(args: argparse.Namespace) -> int:
        from extract import LayerSelectionError, StoreError
        from extract.specs import SpecError

        known: tuple[type[BaseException], ...] = (
            CommandError, StoreError, SpecError, LayerSelectionError, ValueError, TypeError,
            RuntimeError, OSError, tomllib.TOMLDecodeError,
        )
        try:
            return func(args)
        except known as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, (CommandError, SpecError, ValueError, TypeError)) else 1
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume.", file=sys.stderr)
            return 130

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


# ----------------------------------------------------------------------------- extract
def extract_command_parser(subparsers=None) -> argparse.ArgumentParser:
    kwargs = dict(
        description="Run models once over a dataset and write their layer activations to Zarr stores.",
        epilog=EXTRACT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser = subparsers.add_parser("extract", **kwargs) if subparsers else argparse.ArgumentParser(**kwargs)
    parser.add_argument("--config", help="TOML file with the options below and [[models]] tables")
    parser.add_argument("--model", help="module:function factory, TorchScript file, HF directory or torchvision:NAME")
    parser.add_argument("--weights", help="state-dict file loaded into --model")
    parser.add_argument("--name", help="model name; the store is OUT/NAME.zarr")
    parser.add_argument("--data", help="digits, digits:train, a .npy/.pt file, or module:function")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN", help="module names or globs ('layer*.conv?')")
    parser.add_argument("--out", default=None, help=f"folder receiving NAME.zarr (default {DEFAULT_ACTIVATIONS})")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per forward pass (default 128)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default=None, help="storage dtype")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="redo an extraction whose store already exists")
    parser.add_argument("--no-inputs", action="store_true", help="do not store the inputs (dCKA's confounder)")
    parser.add_argument("--reduce", nargs="+", metavar="RULE",
                        help="per-layer reductions before storing: flatten, mean, first, last, gap, pool<k>, "
                             "optionally PATTERN=REDUCTION ('block*=gap'); token layers default to mean")
    parser.add_argument("--max-length", type=int, default=None,
                        help="text data: pad/truncate to this many tokens (default: the longest text)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="extract the models as tasks on a local dask cluster of N worker processes")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="'threads' (dask's threaded scheduler) or tcp://host:port of a running dask cluster")
    if subparsers:
        parser.set_defaults(func=extract_command)
    return parser


def _default_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CommandError(f"--device {requested} was asked for but CUDA is not available; use --device cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


CONFIG_TYPES = {"data": str, "out": str, "batch_size": int, "dtype": str, "device": str, "no_inputs": bool,
                "models": list}
MODEL_KEYS = {"model": str, "weights": str, "name": str, "layers": (list, str)}


def _load_config(path: Path) -> dict:
    """The TOML config at ``path``, with every key and value type checked."""
    if not path.is_file():
        raise CommandError(f"Config file {path} does not exist.")
    try:
        config = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"Config file {path} is not valid TOML: {exc}; fix the syntax.") from None
    unknown = set(config) - set(CONFIG_TYPES)
    if unknown:
        raise CommandError(f"Unknown keys {sorted(unknown)} in {path}; allowed: {', '.join(CONFIG_TYPES)}.")
    for key, kind in CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CommandError(f"Key {key!r} in {path} must be a {kind.__name__}, got {value!r}.")
    for i, entry in enumerate(config.get("models", [])):
        if not isinstance(entry, dict):
            raise CommandError(f"Entry {i} of 'models' in {path} must be a [[models]] table, got {entry!r}.")
        unknown = set(entry) - set(MODEL_KEYS)
        if unknown:
            raise CommandError(f"Unknown keys {sorted(unknown)} in [[models]] entry {i} of {path}; "
                               f"allowed: {', '.join(MODEL_KEYS)}.")
        for key, kind in MODEL_KEYS.items():
            if key in entry and not isinstance(entry[key], kind):
                raise CommandError(f"Key {key!r} of [[models]] entry {i} in {path} has the wrong type: {entry[key]!r}.")
        layers = entry.get("layers")
        if isinstance(layers, str):
            entry["layers"] = [layers]
        elif layers is not None and not all(isinstance(p, str) and p for p in layers):
            raise CommandError(f"'layers' of [[models]] entry {i} in {path} must be a list of names or globs.")
    return config


def _extract_jobs(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """(models to extract, shared options) from flags and the optional TOML config."""
    from extract.remote import as_path

    config = _load_config(Path(args.config)) if args.config else {}
    shared = {
        "data": args.data or config.get("data"),
        "out": as_path(args.out or config.get("out") or DEFAULT_ACTIVATIONS),  # Path, or UrlPath for s3://...
        "batch_size": next(b for b in (args.batch_size, config.get("batch_size"), 128) if b is not None),
        "dtype": args.dtype or config.get("dtype") or "float32",
        "device": args.device or config.get("device"),
        "store_inputs": not (args.no_inputs or config.get("no_inputs", False)),
    }
    if shared["batch_size"] < 1:
        raise CommandError(f"The batch size must be a positive integer, got {shared['batch_size']}.")
    if shared["dtype"] not in ("float32", "float16"):
        raise CommandError(f"dtype must be float32 or float16, got {shared['dtype']!r}.")
    models = [dict(m) for m in config.get("models", [])]
    if args.model:
        models.append({"model": args.model, "weights": args.weights, "name": args.name, "layers": args.layers})
    for i, m in enumerate(models):
        if not m.get("model"):
            raise CommandError(f"Model entry {i} needs a 'model' key (module:function, file or directory).")
        if not m.get("layers"):
            raise CommandError(f"Model {m['model']!r} needs --layers (module names or globs).")
        m.setdefault("name", None)
        m["name"] = m["name"] or Path(str(m["model"]).replace(":", "_")).stem
    return models, shared


@_die_on_known_errors
def extract_command(args: argparse.Namespace) -> int:
    """Extract the demo zoo (no model flags) or the models named by flags / config."""
    from extract import extract
    from extract.specs import load_data, load_model
    from extract.text import tokenize_for_model

    models, shared = _extract_jobs(args)
    device = _default_device(shared["device"])
    if not models:
        if args.data or args.layers or args.weights or args.name:
            raise CommandError("--data/--layers/--weights/--name need --model (or a --config with [[models]]).")
        if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None):
            return _extract_on_dask(args, [], shared)
        return _extract_demo(shared, device, force=args.force, quiet=args.quiet)
    if not shared["data"]:
        raise CommandError("--data is required with --model (for example --data digits).")
    if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None):
        return _extract_on_dask(args, models, shared)
    data = load_data(shared["data"])
    for m in models:
        result = extract(
            load_model(m["model"], m.get("weights")),
            tokenize_for_model(data, str(m["model"]), max_length=getattr(args, "max_length", None)),
            shared["out"] / f"{m['name']}.zarr",
            name=m["name"],
            layers=m["layers"],
            batch_size=shared["batch_size"],
            dtype=shared["dtype"],
            device=device,
            force=args.force,
            store_inputs=shared["store_inputs"],
            model_spec=f"{m['model']}|weights={m.get('weights') or ''}",
            progress=not args.quiet,
            reduce=m.get("reduce") or getattr(args, "reduce", None),
        )
        _report_extract(result)
    return 0


def _extract_on_dask(args: argparse.Namespace, models: list[dict], shared: dict) -> int:
    """One dask task per model (``extract.parallel``); the worker loads model and data and picks its device."""
    from extract.parallel import extract_many

    demo: list[dict] = []
    if not models:  # the demo zoo: trained here (cached), extracted on the workers
        from extract.demo import DEMO_LAYERS, digits, train_zoo

        x_test = digits("test")[0]
        demo = [dict(model=rec["factory"], weights=rec["weights"], data=x_test,
                     path=shared["out"] / f"{rec['name']}.zarr", name=rec["name"], layers=DEMO_LAYERS,
                     batch_size=shared["batch_size"], dtype=shared["dtype"], device=shared["device"],
                     force=args.force, store_inputs=shared["store_inputs"],
                     model_spec=f"{rec['factory']}|weights={rec['weights']}", replace_stale=True)
                for rec in train_zoo(Path("data/models"))]
    jobs = demo + [dict(model=m["model"], weights=m.get("weights"), data=shared["data"],
                 path=shared["out"] / f"{m['name']}.zarr", name=m["name"], layers=m["layers"],
                 batch_size=shared["batch_size"], dtype=shared["dtype"], device=shared["device"], force=args.force,
                 store_inputs=shared["store_inputs"], model_spec=f"{m['model']}|weights={m.get('weights') or ''}",
                 reduce=m.get("reduce") or getattr(args, "reduce", None),
                 max_length=getattr(args, "max_length", None))
            for m in models]
    for result in extract_many(jobs, workers=args.workers, scheduler=args.scheduler):
        _report_extract(result)
    return 0


def _report_extract(result) -> None:
    if result.cached:
        print(f"{result.path}: already complete ({result.n_samples} samples, {len(result.layers)} layers); "
              "nothing to do (--force redoes it)")
    else:
        resumed = f", resumed at sample {result.resumed_from}" if result.resumed_from else ""
        print(f"{result.path}: {result.n_samples} samples x {len(result.layers)} layers in "
              f"{result.seconds:.1f} s{resumed}")


def _extract_demo(shared: dict, device: str, *, force: bool, quiet: bool) -> int:
    from extract import extract
    from extract.demo import DEMO_LAYERS, digits, train_zoo
    from extract.specs import load_model

    records = train_zoo(Path("data/models"))
    x_test = digits("test")[0]
    for rec in records:
        result = extract(
            load_model(rec["factory"], rec["weights"]),
            x_test,
            shared["out"] / f"{rec['name']}.zarr",
            name=rec["name"],
            layers=DEMO_LAYERS,
            batch_size=shared["batch_size"],
            dtype=shared["dtype"],
            device=device,
            force=force,
            store_inputs=shared["store_inputs"],
            model_spec=f"{rec['factory']}|weights={rec['weights']}",
            progress=not quiet,
            replace_stale=True,  # the demo's stores follow its (retrained) zoo
        )
        _report_extract(result)
    return 0


# ----------------------------------------------------------------------------- measure
def measure_command_parser(subparsers=None) -> argparse.ArgumentParser:
    from measure.cli import add_measure_arguments

    kwargs = dict(
        description="Compare the layers of stores with similarity measures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser = subparsers.add_parser("measure", **kwargs) if subparsers else argparse.ArgumentParser(**kwargs)
    add_measure_arguments(parser)
    if subparsers:
        parser.set_defaults(func=measure_command)
    return parser


@_die_on_known_errors
def measure_command(args: argparse.Namespace) -> int:
    """Measure every requested pair of stores; see ``measure.cli.run_measure``."""
    from measure.cli import run_measure

    with warnings.catch_warnings(record=True) as caught:  # warnings (NaN with --undefined nan...): one line each
        warnings.simplefilter("default")
        try:
            return run_measure(args)
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


# ----------------------------------------------------------------------------- info / ls
def info_command_parser(subparsers=None) -> argparse.ArgumentParser:
    kwargs = dict(description="Describe one store: model, layers with shapes, dtypes, reductions, sizes on disk, "
                              "compression ratio, sample count, fingerprint and completeness.")
    parser = subparsers.add_parser("info", **kwargs) if subparsers else argparse.ArgumentParser(**kwargs)
    parser.add_argument("store", help="a store written by `pipeline.py extract` (a .zarr folder or URL)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    if subparsers:
        parser.set_defaults(func=info_command)
    return parser


@_die_on_known_errors
def info_command(args: argparse.Namespace) -> int:
    """Print ``measure.inspect.summarize(args.store)``."""
    import json

    from measure.inspect import format_info, summarize

    summary = summarize(args.store)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_info(summary))
    return 0


def ls_command_parser(subparsers=None) -> argparse.ArgumentParser:
    kwargs = dict(description="List the stores in a folder, grouped by comparability (same data: fingerprint "
                              "and sample count).")
    parser = subparsers.add_parser("ls", **kwargs) if subparsers else argparse.ArgumentParser(**kwargs)
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_ACTIVATIONS),
                        help=f"folder holding .zarr stores (default {DEFAULT_ACTIVATIONS})")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    if subparsers:
        parser.set_defaults(func=ls_command)
    return parser


@_die_on_known_errors
def ls_command(args: argparse.Namespace) -> int:
    """Print ``measure.inspect.list_stores(args.folder)`` grouped by comparability."""
    import json

    from measure.inspect import comparability_groups, format_ls, list_stores

    summaries, skipped = list_stores(args.folder)
    if args.json:
        groups, incomplete = comparability_groups(summaries)
        print(json.dumps({"groups": [[s.path for s in g] for g in groups],
                          "incomplete": [s.path for s in incomplete], "skipped": dict(skipped),
                          "stores": [s.to_dict() for s in summaries]}, indent=2))
    else:
        print(format_ls(summaries, skipped, args.folder))
    return 0


# ----------------------------------------------------------------------------- root
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simtorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(title="commands")
    extract_command_parser(subparsers)
    measure_command_parser(subparsers)
    info_command_parser(subparsers)
    ls_command_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("default")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
