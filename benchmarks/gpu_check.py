"""GPU check: extract + measure head to head with simtorch 0.2.1 on one device, values against CPU float64.

    .venv/bin/python benchmarks/gpu_check.py                    # CUDA when present (n=2048, width 32)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --no-peers   # the test's smoke run

One short script for whoever has a CUDA machine: it runs, on the chosen device,

* simtorch 0.2.1 ``CKA.compute(loader)`` (its per-batch average), from its own venv
  (``bench_measure.ensure_simtorch_venv``); when the venv is missing and PyPI cannot be reached it says so
  and runs our side only (``--no-peers`` skips it outright);
* our ``extract.extract`` of both models into Zarr stores, then the Engine with the exact ``cka`` (default
  precision ``auto``: the compensated float32 Gram scheme for the float32 stores) and
  ``cka_minibatch(batch_size=b)`` over simtorch's batches,

then recomputes both of our matrices on the CPU in float64 from the same stores and fails (exit 1) when a
device value is more than ``--tolerance`` (1e-6) away. The table is ``bench_measure``'s. The default size
is chosen to finish within 5 minutes on a GPU including the one-time venv set-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_measure import (  # noqa: E402
    DEFAULT_VENV,
    BenchError,
    Timing,
    _has_simtorch021,
    _row,
    _venv_python,
    engine_matrix,
    ensure_simtorch_venv,
    format_table,
    run_simtorch,
    timed,
)
from bench_measure_models import LAYERS, layer_widths, write_model_pair  # noqa: E402


def pypi_reachable(timeout: float = 3.0) -> bool:
    """Whether pypi.org answers on port 443 within ``timeout`` seconds (pip would otherwise retry for minutes)."""
    try:
        with socket.create_connection(("pypi.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--n-samples", type=int, default=2048, help="inputs (default 2048)")
    parser.add_argument("--batch-size", type=int, default=256, help="simtorch's batches = our minibatches (256)")
    parser.add_argument("--width", type=int, default=32, help="conv channels of the two models (default 32)")
    parser.add_argument("--quick", action="store_true", help="n=256, batch 64, width 4: a smoke run in seconds")
    parser.add_argument("--no-peers", action="store_true", help="skip simtorch 0.2.1 (no venv, no network)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"simtorch 0.2.1 venv (default {DEFAULT_VENV})")
    parser.add_argument("--torch-spec", default=f"torch=={torch.__version__.split('+')[0]}",
                        help="torch requirement for the simtorch venv (default: this venv's version)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest |device − CPU float64| (1e-6)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models/stores here (default: temp, removed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.batch_size, args.width = 256, 64, 4
    if not 4 <= args.batch_size <= args.n_samples:
        parser.error(f"--batch-size must be between 4 and --n-samples ({args.n_samples}), got {args.batch_size}")
    return args


def _simtorch(args: argparse.Namespace, work: Path, device: torch.device,
              log: Callable[[str], None]) -> dict[str, Any] | None:
    """simtorch 0.2.1's run on the device, or None (said why) when its venv cannot be had."""
    if args.no_peers:
        log("simtorch 0.2.1: skipped (--no-peers)")
        return None
    if not _has_simtorch021(_venv_python(args.venv)) and not pypi_reachable():
        log(f"simtorch 0.2.1: skipped — no venv at {args.venv} and no network to PyPI to build one "
            "(build it where PyPI is reachable with benchmarks/bench_measure.py, or pass --venv)")
        return None
    python = ensure_simtorch_venv(args.venv, args.torch_spec, log)
    log("simtorch 0.2.1 CKA.compute ...")
    return run_simtorch(python, work, {
        "inputs": str(work / "inputs.pt"), "state_dicts": [str(work / f"model{i}.pt") for i in (0, 1)],
        "width": args.width, "batch_size": args.batch_size, "device": str(device), "threads": None,
        "layers": LAYERS})


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from extract import SimilarityModel, extract
    from measure.engine import default_device

    device = default_device(args.device)
    cpu = torch.device("cpu")
    n, b = args.n_samples, args.batch_size
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    widths = {k: w for k, w in layer_widths(args.width).items() if k in LAYERS}
    log(f"n={n}, batch={b}, width={args.width} ({widths} features), device={device} ({name}), "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    try:
        inputs, models = write_model_pair(work, n, args.width)
        rows: list[dict] = []
        sim = _simtorch(args, work, device, log)
        t_sim = None
        if sim is not None:
            t_sim = Timing(sim["seconds"], sim["cpu_seconds"])
            rows.append(_row(f"simtorch 0.2.1 `CKA.compute` (b={b}, {sim['n_batches']} batches)", t_sim, t_sim,
                             sim["matrix"][0][0], f"simtorch {sim.get('versions', {}).get('simtorch', '0.2.1')}"))

        log("extract ...")
        paths = [work / f"model{i}.zarr" for i in (0, 1)]

        def do_extract() -> None:
            for i, m in enumerate(models):
                extract(SimilarityModel(m, f"model{i}", list(LAYERS)), inputs, paths[i], batch_size=b,
                        device=device, force=True, progress=False)

        _, t_extract = timed(do_extract, device)
        log("measure on the device ...")
        exact, t_exact = timed(lambda: engine_matrix(paths, "cka", {}, device, "auto"), device)
        mb, t_mb = timed(lambda: engine_matrix(paths, "cka_minibatch", {"batch_size": b}, device, "auto"), device)
        log("reference: the same measures on the CPU in float64 ...")
        exact64 = engine_matrix(paths, "cka", {}, cpu, "float64")
        mb64 = engine_matrix(paths, "cka_minibatch", {"batch_size": b}, cpu, "float64")
        gaps = {"exact": float(np.abs(exact - exact64).max()), "minibatch": float(np.abs(mb - mb64).max())}
        rows.append(_row("our extract + measure, exact `cka` (precision auto)", t_extract + t_exact, t_sim,
                         exact[0, 0], f"extract {t_extract.wall:.2f} s + measure {t_exact.wall:.2f} s; "
                                      f"max abs Δ vs CPU float64 {gaps['exact']:.1e}"))
        rows.append(_row(f"our extract + measure, `cka_minibatch(batch_size={b})`", t_extract + t_mb, t_sim,
                         mb[0, 0], f"measure {t_mb.wall:.2f} s; max abs Δ vs CPU float64 {gaps['minibatch']:.1e}"))
        results = {"device": str(device), "device_name": name, "n_samples": n, "batch_size": b, "width": args.width,
                   "rows": rows, "max_abs_diff_vs_cpu_float64": gaps, "simtorch": sim is not None,
                   "loadavg_end": os.getloadavg()}
        log(format_table(rows))
        bad = {k: v for k, v in gaps.items() if not v <= args.tolerance}
        if bad:
            raise BenchError(f"values on {device} differ from the CPU float64 result by {bad} "
                             f"(more than --tolerance {args.tolerance:g}).")
        log(f"values on {device} within {args.tolerance:g} of the CPU float64 result: {gaps}")
        return results
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
