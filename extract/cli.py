"""The ``pipeline.py extract``, ``info`` and ``ls`` commands.

Each command has ``<name>_command_parser(subparsers=None)`` (standalone, or
registered under ``subparsers`` with ``set_defaults(func=...)``) and
``<name>_command(args)``, which only calls library entry points:

- ``extract``: ``plan_extract`` turns the flags and the optional TOML config
  into one ``ExtractPlan`` (the shared ``ExtractOptions`` and the models), the
  one place where ``extract()``'s options are built; each model becomes an
  ``ExtractJob`` run here (``extract.extract``) or as a dask task
  (``extract.dask_jobs``). Without ``--model`` the demo zoo is trained (cached)
  and extracted.
- ``info`` / ``ls``: ``extract.store.summary``.

``exit_on_known_errors`` turns the errors a user can fix into one line on
stderr and an exit code (2 for usage errors, 1 otherwise, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LayerSelectionError, SpecError, StoreError
from .options import ExtractJob, ExtractOptions

__all__ = [
    "CommandError",
    "ExtractPlan",
    "exit_on_known_errors",
    "extract_command",
    "extract_command_parser",
    "info_command",
    "info_command_parser",
    "load_config",
    "ls_command",
    "ls_command_parser",
    "plan_extract",
]

DEFAULT_ACTIVATIONS = Path("data/activations")
DEFAULT_BATCH_SIZE = 128
DEMO_MODELS = Path("data/models")

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

CONFIG_TYPES = {"data": str, "out": str, "batch_size": int, "dtype": str, "device": str, "no_inputs": bool,
                "models": list, "image_size": int, "image_resize": int, "image_mean": list, "image_std": list,
                "no_normalize": bool}
MODEL_KEYS = {"model": str, "weights": str, "name": str, "layers": (list, str)}


class CommandError(Exception):
    """A user error found by the CLI itself."""


def exit_on_known_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print known errors as one line (no traceback) and return a non-zero exit code."""

    def wrapper(args: argparse.Namespace) -> int:
        known: tuple[type[BaseException], ...] = (
            CommandError, StoreError, SpecError, LayerSelectionError, ValueError, TypeError,
            RuntimeError, OSError, tomllib.TOMLDecodeError,
        )
        try:
            code = func(args)
            sys.stdout.flush()  # output cut short by a reader (`| head`) shows here, not at interpreter exit
            return code
        except BrokenPipeError as exc:
            if not _stdout_closed():  # another pipe (a worker, a connection): a real error
                print(f"error: {exc}", file=sys.stderr)
                return 1
            return 141  # as a shell reports a process ended by SIGPIPE
        except known as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, (CommandError, SpecError, ValueError, TypeError)) else 1
        except KeyboardInterrupt as exc:
            # an extraction says what it left (extract.runner.ExtractInterrupted); other commands leave
            # nothing half-written, and what they finished (stores, cached statistics) is reused
            print(f"interrupted: {exc}" if str(exc) else "interrupted: rerun the same command to continue; "
                  "finished stores and cached statistics are reused.", file=sys.stderr)
            return 130

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head``); then it is pointed at /dev/null.

    As the Python docs advise (``signal``, "Note on SIGPIPE"), so that the flush at exit does not fail again.
    """
    import os
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return True
    except (OSError, ValueError, AttributeError):  # no real stdout (captured), or no poll on this platform
        return False


def _command_parser(subparsers, name: str, func, **kwargs: Any) -> argparse.ArgumentParser:
    """A parser for command ``name``: registered under ``subparsers`` (bound to ``func``), or standalone."""
    if subparsers is None:
        return argparse.ArgumentParser(**kwargs)
    parser = subparsers.add_parser(name, **kwargs)
    parser.set_defaults(func=func)
    return parser


# ----------------------------------------------------------------------------- extract: arguments
def extract_command_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = _command_parser(
        subparsers, "extract", extract_command,
        description="Run models once over a dataset and write their layer activations to Zarr stores.",
        epilog=EXTRACT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML file with the options below and [[models]] tables")
    parser.add_argument("--model", help="module:function factory, TorchScript file, HF directory or torchvision:NAME")
    parser.add_argument("--weights", help="state-dict file loaded into --model")
    parser.add_argument("--name", help="model name; the store is OUT/NAME.zarr")
    parser.add_argument("--data", help="digits, digits:train, a .npy/.pt file, a folder of images, a .txt/.json/.jsonl "
                                       "file of texts, or module:function")
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
    images = parser.add_argument_group(
        "image folders (--data DIR)",
        "default: shorter side resized to 256, centre crop 224, ImageNet mean/std; without these options an HF "
        "model directory's own image processor (preprocessor_config.json) is used when it has one")
    images.add_argument("--image-size", type=int, default=None, metavar="PX", help="side of the centre crop (224)")
    images.add_argument("--image-resize", type=int, default=None, metavar="PX",
                        help="shorter side before cropping (default round(size / 0.875))")
    images.add_argument("--image-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="per-channel mean of pixels in [0, 1] (ImageNet's)")
    images.add_argument("--image-std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="per-channel std (ImageNet's)")
    images.add_argument("--no-normalize", action="store_true", help="keep pixels in [0, 1]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="extract the models as tasks on a local dask cluster of N worker processes")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="'threads' (dask's threaded scheduler) or tcp://host:port of a running dask cluster")
    return parser


def load_config(path: Path) -> dict:
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
        _check_model_entry(entry, i, path)
    return config


def _check_model_entry(entry: Any, i: int, path: Path) -> None:
    """Check one ``[[models]]`` table of the config at ``path`` (a single layer string becomes a list)."""
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


# ----------------------------------------------------------------------------- extract: the plan
@dataclass(frozen=True)
class ExtractPlan:
    """What one ``pipeline.py extract`` does, from its flags and TOML config (built by ``plan_extract``).

    Attributes
    ----------
    models : list of dict
        One per model (keys ``model``, ``weights``, ``name``, ``layers``); empty: the demo zoo.
    data : str or None
        The data spec shared by the models.
    out : Path or UrlPath
        The folder receiving ``NAME.zarr``.
    options : ExtractOptions
        The options every model shares (``device`` as requested, None: each runner picks).
    max_length : int or None
        Text data: pad/truncate to this many tokens.
    images : ImagePreprocessing or None
        Image folders: the preprocessing the options ask for; None when no image option was given
        (the default preprocessing, or the model directory's image processor).
    workers, scheduler
        ``--workers N`` / ``--scheduler ADDRESS``: run the jobs as dask tasks (``extract.dask_jobs``).
    """

    models: list[dict]
    data: str | None
    out: Any
    options: ExtractOptions
    max_length: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    images: Any = None

    @property
    def on_dask(self) -> bool:
        return self.workers is not None or bool(self.scheduler)

    def job(self, model: str, weights: str | None, *, name: str, layers: list, data: Any, device: Any,
            max_length: int | None = None, **changes: Any) -> ExtractJob:
        """The job writing ``OUT/NAME.zarr`` from ``model`` with ``weights``; ``changes`` override options."""
        options = self.options.replace(name=name, layers=layers, device=device,
                                       model_spec=f"{model}|weights={weights or ''}", **changes)
        return ExtractJob(model, weights, data, self.out / f"{name}.zarr", options, max_length, self.images)

    def model_jobs(self, data: Any, device: Any) -> list[ExtractJob]:
        """One job per model of the flags and config, on ``data`` (a spec, or the loaded dataset)."""
        return [self.job(m["model"], m.get("weights"), name=m["name"], layers=m["layers"], data=data, device=device,
                         max_length=self.max_length)
                for m in self.models]


def plan_extract(args: argparse.Namespace) -> ExtractPlan:
    """The one place where flags and the optional TOML config become ``extract()``'s options."""
    from .store.remote import as_path

    config = load_config(Path(args.config)) if args.config else {}
    out = as_path(args.out or config.get("out") or DEFAULT_ACTIVATIONS)  # Path, or UrlPath for s3://...
    batch_size = next(b for b in (args.batch_size, config.get("batch_size"), DEFAULT_BATCH_SIZE) if b is not None)
    dtype = args.dtype or config.get("dtype") or "float32"
    if batch_size < 1:
        raise CommandError(f"The batch size must be a positive integer, got {batch_size}.")
    if dtype not in ("float32", "float16"):
        raise CommandError(f"dtype must be float32 or float16, got {dtype!r}.")
    options = ExtractOptions(
        batch_size=batch_size,
        dtype=dtype,
        device=args.device or config.get("device"),
        force=args.force,
        store_inputs=not (args.no_inputs or config.get("no_inputs", False)),
        progress=not args.quiet,
        reduce=getattr(args, "reduce", None),
    )
    return ExtractPlan(
        models=_models(args, config),
        data=args.data or config.get("data"),
        out=out,
        options=options,
        max_length=getattr(args, "max_length", None),
        workers=getattr(args, "workers", None),
        scheduler=getattr(args, "scheduler", None),
        images=_image_preprocessing(args, config),
    )


def _image_preprocessing(args: argparse.Namespace, config: dict):
    """The ``ImagePreprocessing`` of the image flags and keys (flags first), None when none was given."""
    keys = ("image_size", "image_resize", "image_mean", "image_std", "no_normalize")
    given = {k: getattr(args, k, None) for k in keys}
    given = {k: config.get(k) if v is None or v is False else v for k, v in given.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    from .images import ImagePreprocessing

    settings = {"size": given.get("image_size", 224), "resize": given.get("image_resize"),
                "normalize": not given.get("no_normalize", False)}
    settings.update({name: tuple(given[f"image_{name}"]) for name in ("mean", "std") if f"image_{name}" in given})
    return ImagePreprocessing(**settings)


def _models(args: argparse.Namespace, config: dict) -> list[dict]:
    """The ``[[models]]`` of the config, then the one of ``--model``, each with a model, layers and a name."""
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
        _check_store_name(m["name"])
    return models


def _check_store_name(name: str) -> None:
    """A model name must give a store ``OUT/NAME.zarr`` inside ``--out``: no path separator, no leading dot.

    A hub-style name ``org/model`` is refused with the suggestion ``org--model`` (the Hugging Face cache's rule).
    """
    if "/" in name or "\\" in name:
        parts = name.replace("\\", "/").split("/")
        plain = all(p and not p.startswith(".") for p in parts)
        hint = (f"for a hub-style name write {'--'.join(parts)!r}" if plain
                else "choose a plain name such as 'resnet18_seed1'")
        raise CommandError(f"--name {name!r} contains a path separator, but the store must be OUT/NAME.zarr inside "
                           f"--out; {hint} (use --out to choose the folder).")
    if name.startswith("."):
        raise CommandError(f"--name {name!r} starts with a dot, which would give a hidden store {name}.zarr "
                           "(or one outside --out); choose a name that starts with a letter or digit.")


# ----------------------------------------------------------------------------- extract: the command
@exit_on_known_errors
def extract_command(args: argparse.Namespace) -> int:
    """Extract the demo zoo (no model flags) or the models named by flags / config."""
    plan = plan_extract(args)
    device = _default_device(plan.options.device)
    job_device = plan.options.device if plan.on_dask else device  # a dask worker picks its own device
    if not plan.models:
        if args.data or args.layers or args.weights or args.name:
            raise CommandError("--data/--layers/--weights/--name need --model (or a --config with [[models]]).")
        return _run_jobs(plan, _demo_jobs(plan, job_device))
    if not plan.data:
        raise CommandError("--data is required with --model (for example --data digits).")
    if plan.on_dask:  # the workers load the data themselves
        return _run_jobs(plan, plan.model_jobs(plan.data, job_device))
    from .specs import load_data

    return _run_jobs(plan, plan.model_jobs(load_data(plan.data, plan.images), job_device))


def _default_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CommandError(f"--device {requested} was asked for but CUDA is not available; use --device cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _demo_jobs(plan: ExtractPlan, device: Any) -> list[ExtractJob]:
    """The demo zoo, trained here (cached in data/models/), on the held-out digits; its stores follow the zoo."""
    from .demo import DEMO_LAYERS, digits, train_zoo

    records = train_zoo(DEMO_MODELS)
    x_test = digits("test")[0]
    return [plan.job(rec["factory"], rec["weights"], name=rec["name"], layers=DEMO_LAYERS, data=x_test, device=device,
                     reduce=None, replace_stale=True)  # a retrained zoo replaces its stores
            for rec in records]


def _run_jobs(plan: ExtractPlan, jobs: list[ExtractJob]) -> int:
    """Run ``jobs`` here, one after the other, or as dask tasks (``extract.dask_jobs``); report each."""
    if plan.on_dask:
        from .dask_jobs import extract_many

        results = extract_many([job.task() for job in jobs], workers=plan.workers, scheduler=plan.scheduler)
        for result in results:
            _report_extract(result)
        return 0
    from .runner import extract
    from .specs import load_model, prepare_for_model

    notes: set[str] = set()

    def note_once(line: str) -> None:
        if line not in notes:
            notes.add(line)
            print(line, file=sys.stderr)

    for job in jobs:
        model = load_model(job.model, job.weights)
        data = prepare_for_model(job.data, model, str(job.model), max_length=job.max_length, note=note_once)
        _report_extract(extract(model, data, job.path, options=job.options))
    return 0


def _report_extract(result) -> None:
    if result.cached:
        print(f"{result.path}: already complete ({result.n_samples} samples, {len(result.layers)} layers); "
              "nothing to do (--force redoes it)")
    else:
        resumed = f", resumed at sample {result.resumed_from}" if result.resumed_from else ""
        print(f"{result.path}: {result.n_samples} samples x {len(result.layers)} layers in "
              f"{result.seconds:.1f} s{resumed}")


# ----------------------------------------------------------------------------- info / ls
def info_command_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = _command_parser(
        subparsers, "info", info_command,
        description="Describe one store: model, layers with shapes, dtypes, reductions, sizes on disk, "
                    "compression ratio, sample count, fingerprint and completeness.",
    )
    parser.add_argument("store", help="a store written by `pipeline.py extract` (a .zarr folder or URL)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


@exit_on_known_errors
def info_command(args: argparse.Namespace) -> int:
    """Print ``extract.store.summary.summarize(args.store)``."""
    import json

    from .store.summary import format_info, summarize

    summary = summarize(args.store)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_info(summary))
    return 0


def ls_command_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = _command_parser(
        subparsers, "ls", ls_command,
        description="List the stores in a folder, grouped by comparability (same data: fingerprint "
                    "and sample count).",
    )
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_ACTIVATIONS),
                        help=f"folder holding .zarr stores (default {DEFAULT_ACTIVATIONS})")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    return parser


@exit_on_known_errors
def ls_command(args: argparse.Namespace) -> int:
    """Print ``extract.store.summary.list_stores(args.folder)`` grouped by comparability."""
    import json

    from .store.summary import comparability_groups, format_ls, list_stores

    summaries, skipped = list_stores(args.folder)
    if args.json:
        groups, incomplete = comparability_groups(summaries)
        print(json.dumps({"groups": [[s.path for s in g] for g in groups],
                          "incomplete": [s.path for s in incomplete], "skipped": dict(skipped),
                          "stores": [s.to_dict() for s in summaries]}, indent=2))
    else:
        print(format_ls(summaries, skipped, args.folder))
    return 0
