"""Benchmark: this project's measure stage against simtorch 0.2.1, same models, data and batches.

    .venv/bin/python benchmarks/bench_measure.py                 # n=2048, batch 256, width 32, CPU
    .venv/bin/python benchmarks/bench_measure.py --quick         # a 30-second smoke run
    .venv/bin/python benchmarks/bench_measure.py --device cuda   # on a GPU (both tools)

simtorch 0.2.1 is installed from PyPI into its own virtual environment (``.bench/simtorch021-venv``
by default: torch pinned to this venv's torch version first, then its light dependencies, then
``simtorch==0.2.1 --no-deps``, so pip never swaps torch for another build) and run in a subprocess of
that venv (``_simtorch021_runner.py``). Models (state dicts), inputs (a ``.pt`` tensor) and the model
definition (``bench_measure_models.py``, pure torch) are shared through files.

Rows of the table:

* simtorch 0.2.1 ``CKA.compute(loader)``: per batch of ``b`` samples, biased linear CKA of every layer
  pair (one Gram per pair, centred with O(b³) products), summed over batches and divided by the number
  of layers of model 1 (``len(batch_cka_matrix)``) instead of the number of batches.
* (a) ``extract.extract`` of both models into Zarr stores, then ``measure.engine.Engine`` with the exact
  ``cka`` (biased HSIC over all n samples, Kornblith et al. 2019).
* (b) the Engine alone on the stores written in (a), with ``cka_minibatch(batch_size=b)`` — Nguyen,
  Raghu & Kornblith (2021): unbiased HSIC summed over the same consecutive batches simtorch uses.
* (c) the in-memory ``measure.CKA(...).compute(loader)`` (exact ``cka``).
* (a32), (b32): (a) and (b) with ``precision="float32"`` (``--precision float32``): Gram products in
  float32 on column-centred activations, offsets in float64; the note gives the largest difference
  from the float64 rows.
* A check, not timed: the mean of per-batch *biased* CKA computed by our kernels over the same
  batches, which must equal simtorch's matrix × L1 / n_batches (proves same models, data and batches).
* Gram throughput: ``measure.statistics.layer_gram`` on the widest layer of a store against a plain
  ``torch.matmul(X, X.T)`` of the same (n, p) float64 matrix, in GFLOP/s (2·n²·p flops), and against a
  product of the 4 × 4 upper row blocks only (what a symmetric product could save).

Times are wall seconds and CPU seconds (``time.process_time``, all threads of the process); on a machine
shared with other jobs the CPU seconds are the steadier comparison. ``--layer-set all`` also captures the
conv outputs (9 layers instead of 5): simtorch's Gram work grows as L1·L2, ours as L1 + L2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_measure_models import LAYER_SETS, layer_widths, write_model_pair  # noqa: E402

DEFAULT_VENV = ROOT / ".bench" / "simtorch021-venv"
SIMTORCH_DEPS = ["numpy", "matplotlib", "seaborn", "tqdm"]


class BenchError(RuntimeError):
    """A set-up step failed; the message says which and how to fix it."""


# ----------------------------------------------------------------------------- simtorch 0.2.1 venv
def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_simtorch021(python: Path) -> bool:
    if not python.exists():
        return False
    probe = "from simtorch.version import VERSION; import torch; assert VERSION == '0.2.1'"
    return subprocess.run([str(python), "-c", probe], capture_output=True, cwd=tempfile.gettempdir()).returncode == 0


def ensure_simtorch_venv(venv: Path, torch_spec: str, log: Callable[[str], None] = print) -> Path:
    """The python of a venv holding simtorch 0.2.1 and ``torch_spec``, creating it when missing.

    torch is installed first and explicitly (``torch_spec``, e.g. ``torch==2.13.0``) and simtorch with
    ``--no-deps``: simtorch's bare ``torch`` requirement would otherwise let pip choose a build.
    """
    python = _venv_python(venv)
    if _has_simtorch021(python):
        return python
    log(f"installing simtorch 0.2.1 into {venv} (one time)")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", torch_spec, *SIMTORCH_DEPS],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "simtorch==0.2.1"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"`{' '.join(step)}` failed:\n{done.stderr.strip()[-2000:]}\n"
                             f"Fix the cause (network, --torch-spec) or delete {venv} and retry.")
    if not _has_simtorch021(python):
        raise BenchError(f"{venv} was set up but `import simtorch` (0.2.1) fails there; delete it and retry.")
    return python


def run_simtorch(python: Path, work: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``_simtorch021_runner.py`` in the simtorch venv on ``job``; its JSON result."""
    job = dict(job, out=str(work / "simtorch021.json"))
    job_path = work / "simtorch021-job.json"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(HERE / "_simtorch021_runner.py"), str(job_path)], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"simtorch 0.2.1 run failed:\n{done.stderr.strip()[-3000:]}")
    return json.loads(Path(job["out"]).read_text())


# ----------------------------------------------------------------------------- our side
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall seconds and CPU seconds of this process (all its threads; ``time.process_time``).

    On a machine shared with other jobs the wall time depends on their load; the CPU time much less so.
    """

    wall: float
    cpu: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Timing]:
    """(result, Timing), with the device synchronised on both ends."""
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, Timing(time.perf_counter() - started, time.process_time() - cpu_started)


def open_stores(paths: list[Path]) -> list[Any]:
    from extract.store import open_store

    return [open_store(p) for p in paths]


def engine_matrix(paths: list[Path], measure: str, options: dict[str, Any], device: torch.device,
                  precision: str = "float64") -> np.ndarray:
    """Open the stores afresh and run one measure on the pair (0, 1) with the Engine (no statistics cache)."""
    from measure.engine import Engine

    engine = Engine(open_stores(paths), device=device, precision=precision)
    return engine.run([(measure, options)], [(0, 1)])[0].matrix


def batch_mean_biased_cka(paths: list[Path], layers: list[str], batch_size: int, device: torch.device) -> np.ndarray:
    """Mean over consecutive batches of the per-batch biased linear CKA matrix — what simtorch means to report."""
    from measure.engine.streaming import layer_gram_blocks
    from measure.functional._bilinear import bilinear_matrix
    from measure.functional.cka import _cka_prepare

    stores = open_stores(paths)
    per_store = [[[_cka_prepare(g) for g in layer_gram_blocks(s, layer, batch_size, device)] for layer in layers]
                 for s in stores]
    n_batches = len(per_store[0][0])
    total = sum(bilinear_matrix([lay[t] for lay in per_store[0]], [lay[t] for lay in per_store[1]])
                for t in range(n_batches))
    return (total / n_batches).cpu().numpy()


def gram_throughput(path: Path, layer: str, device: torch.device, precision: str) -> dict[str, float]:
    """Seconds and GFLOP/s of ``layer_gram`` on a store vs ``torch.matmul(X, X.T)`` of the same (n, p) matrix.

    The matmul runs on the layer already in memory, in float64 or float32 as ``precision`` says;
    ``layer_gram`` includes reading and decoding the store. GFLOP/s count 2·n²·p flops for both.
    """
    from measure.engine.streaming import layer_features, layer_gram

    store = open_stores([path])[0]
    n, p = store.n_samples, int(np.prod(store.layer_shape(layer)))
    flops = 2.0 * n * n * p
    gram, t_ours = timed(lambda: layer_gram(store, layer, device, precision=precision), device)
    x = layer_features(store, layer, device).to(torch.float32 if precision == "float32" else torch.float64)
    ref, t_ref = timed(lambda: torch.matmul(x, x.T), device)
    exact = layer_features(store, layer, device)
    exact = exact @ exact.T
    scale = float(exact.abs().max())
    return {"n": n, "p": p, "ours_s": t_ours.wall, "ref_s": t_ref.wall, "ours_gflops": flops / t_ours.wall / 1e9,
            "ref_gflops": flops / t_ref.wall / 1e9, "ratio": t_ref.wall / t_ours.wall,
            "ours_rel_err": float((gram - exact).abs().max()) / scale,
            "ref_rel_err": float((ref.to(torch.float64) - exact).abs().max()) / scale}


# ----------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=2048, help="inputs (default 2048)")
    parser.add_argument("--batch-size", type=int, default=256, help="simtorch's batches = our minibatches (256)")
    parser.add_argument("--width", type=int, default=32,
                        help="conv channels: act1/act2 have width×32×32 features per sample (default 32)")
    parser.add_argument("--layer-set", choices=sorted(LAYER_SETS), default="act",
                        help="act: act1-4 and fc (5 layers, default); all: also conv1-4 (9 layers)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both processes")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"simtorch 0.2.1 venv (default {DEFAULT_VENV})")
    parser.add_argument("--torch-spec", default=f"torch=={torch.__version__.split('+')[0]}",
                        help="torch requirement for the simtorch venv (default: this venv's version)")
    parser.add_argument("--skip-simtorch", action="store_true", help="only our rows (no venv needed)")
    parser.add_argument("--skip-inmemory", action="store_true", help="skip row (c)")
    parser.add_argument("--quick", action="store_true", help="n=512, batch 128, width 8: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models/stores here (default: temp, removed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.batch_size, args.width = 512, 128, 8
    if not 4 <= args.batch_size <= args.n_samples:
        parser.error(f"--batch-size must be between 4 and --n-samples ({args.n_samples}), got {args.batch_size}")
    return args


def _row(what: str, seconds: Timing | float | None, reference: Timing | None, value: float | None,
         note: str = "") -> dict:
    """One table row; ``seconds`` a Timing (wall and CPU) or a wall time alone."""
    if isinstance(seconds, (int, float)):
        seconds = Timing(float(seconds), float("nan"))
    row: dict[str, Any] = {"what": what, "wall_s": None, "cpu_s": None, "speedup_wall": None, "speedup_cpu": None,
                           "value": value, "note": note}
    if seconds is not None:
        row.update(wall_s=seconds.wall, cpu_s=seconds.cpu)
        if reference is not None:
            row.update(speedup_wall=reference.wall / seconds.wall, speedup_cpu=reference.cpu / seconds.cpu)
    return row


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or value != value else f"{value:{spec}}{suffix}"


def format_table(rows: list[dict], first_layer: str = "act1") -> str:
    """A Markdown table: what, wall and CPU seconds, speed-ups vs simtorch, value of layer pair (0, 0), note."""
    lines = [f"| what | wall s | CPU s | × vs simtorch (wall) | × (CPU) | CKA ({first_layer}, {first_layer}) | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {_fmt(r['wall_s'], '.2f')} | {_fmt(r['cpu_s'], '.1f')} | "
                     f"{_fmt(r['speedup_wall'], '.2f', '×')} | {_fmt(r['speedup_cpu'], '.2f', '×')} | "
                     f"{_fmt(r['value'], '.6f')} | {r['note']} |")
    return "\n".join(lines)


def format_diagonal(results: dict[str, Any]) -> str:
    """CKA of each layer with the same layer of the other model, by estimator (a Markdown table)."""
    columns = [("exact `cka` (a)", results["exact_matrix"]), (f"`cka_minibatch` b={results['batch_size']} (b)",
                                                                 results["minibatch_matrix"]),
               ("mean of per-batch biased CKA (check)", results["batch_mean_matrix"])]
    if "values" in results:
        columns += [("simtorch ×L1/n_batches", results["values"]["simtorch_batch_mean"]),
                    ("simtorch raw output", results["values"]["simtorch_raw"])]
    lines = ["| layer | " + " | ".join(c[0] for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for i, layer in enumerate(results["layers"]):
        lines.append(f"| {layer} | " + " | ".join(f"{np.asarray(m)[i, i]:.4f}" for _, m in columns) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    from extract import SimilarityModel, extract
    from measure import CKA
    from measure.engine import default_device

    device = default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, b = args.n_samples, args.batch_size
    layers = LAYER_SETS[args.layer_set]
    widths = {k: w for k, w in layer_widths(args.width).items() if k in layers}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_measure_"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    log(f"n={n}, batch={b}, width={args.width} (features per sample {widths}), device={device}, "
        f"torch threads={torch.get_num_threads()}, load average {load_start[0]:.2f}; work in {work}")
    try:
        inputs, models = write_model_pair(work, n, args.width)
        rows: list[dict] = []
        results: dict[str, Any] = {"n_samples": n, "batch_size": b, "width": args.width, "device": str(device),
                                   "layers": layers, "layer_widths": widths, "threads": torch.get_num_threads(),
                                   "loadavg_start": load_start}

        t_sim = None
        if not args.skip_simtorch:
            python = ensure_simtorch_venv(args.venv, args.torch_spec, log)
            log("simtorch 0.2.1 CKA.compute ...")
            sim = run_simtorch(python, work, {
                "inputs": str(work / "inputs.pt"), "state_dicts": [str(work / f"model{i}.pt") for i in (0, 1)],
                "width": args.width, "batch_size": b, "device": str(device), "threads": args.threads, "layers": layers})
            if sim["layers"] != [layers, layers]:
                raise BenchError(f"simtorch captured layers {sim['layers']}, expected {layers} twice.")
            t_sim, raw = Timing(sim["seconds"], sim["cpu_seconds"]), np.array(sim["matrix"])
            n_batches = sim["n_batches"]
            rescaled = raw * len(layers) / n_batches
            results["simtorch"] = sim
            rows.append(_row(f"simtorch 0.2.1 `CKA.compute` (b={b}, {n_batches} batches)", t_sim, t_sim, raw[0, 0],
                             f"raw output = Σ per-batch CKA / {len(layers)} layers; ×{len(layers)}/{n_batches} "
                             f"→ batch mean {rescaled[0, 0]:.6f}"))

        log("(a) extract + measure (exact cka) ...")
        paths = [work / f"model{i}.zarr" for i in (0, 1)]

        def do_extract() -> None:
            for i, m in enumerate(models):
                extract(SimilarityModel(m, f"model{i}", list(layers)), inputs, paths[i], batch_size=b,
                        device=device, force=True, progress=False)

        _, t_extract = timed(do_extract, device)
        exact, t_exact = timed(lambda: engine_matrix(paths, "cka", {}, device), device)
        rows.append(_row("(a) our extract + measure, exact `cka` over all n", t_extract + t_exact, t_sim,
                         exact[0, 0], f"extract {t_extract.wall:.2f} s + measure {t_exact.wall:.2f} s (wall)"))

        log("(b) measure alone from the stores (cka_minibatch) ...")
        mb, t_mb = timed(lambda: engine_matrix(paths, "cka_minibatch", {"batch_size": b}, device), device)
        rows.append(_row(f"(b) our measure from stores, `cka_minibatch(batch_size={b})`", t_mb, t_sim, mb[0, 0],
                         f"mean abs diff vs exact {np.abs(mb - exact).mean():.4f}"))
        log("(a32), (b32): the same with precision='float32' ...")
        exact32, t_exact32 = timed(lambda: engine_matrix(paths, "cka", {}, device, "float32"), device)
        rows.append(_row("(a32) = (a) with `--precision float32`", t_extract + t_exact32, t_sim, exact32[0, 0],
                         f"measure {t_exact32.wall:.2f} s; max abs diff vs (a) {np.abs(exact32 - exact).max():.1e}"))
        mb32, t_mb32 = timed(lambda: engine_matrix(paths, "cka_minibatch", {"batch_size": b}, device, "float32"),
                             device)
        rows.append(_row("(b32) = (b) with `--precision float32`", t_mb32, t_sim, mb32[0, 0],
                         f"max abs diff vs (b) {np.abs(mb32 - mb).max():.1e}"))
        results["float32_max_abs_diff"] = {"exact": float(np.abs(exact32 - exact).max()),
                                           "minibatch": float(np.abs(mb32 - mb).max())}
        rows.append(_row("(a′) our extract + measure, `cka_minibatch` = extract of (a) + (b)", t_extract + t_mb,
                         t_sim, mb[0, 0], "same estimator and batches as (b)"))
        rows.append(_row("(b′) our measure from stores, exact `cka` = measure part of (a)", t_exact, t_sim,
                         exact[0, 0], ""))

        if not args.skip_inmemory:
            log("(c) in-memory CKA.compute (exact cka) ...")
            loader = DataLoader(TensorDataset(inputs), batch_size=b, shuffle=False)
            sims = [SimilarityModel(m, f"model{i}", list(layers)) for i, m in enumerate(models)]
            mem, t_mem = timed(lambda: CKA(sims[0], sims[1], device=device).compute(loader), device)
            rows.append(_row("(c) our in-memory `measure.CKA(...).compute(loader)`, exact", t_mem, t_sim, mem[0, 0],
                             f"max abs diff vs (a) {np.abs(mem - exact).max():.1e}"))
            if np.abs(mem - exact).max() > 1e-8:
                raise BenchError(f"(c) and (a) disagree by {np.abs(mem - exact).max():.2e}: a bug in measure/.")
            results["inmemory_matrix"] = mem.tolist()

        log("floor: the same exact cka with both models run in float64 (not timed) ...")
        loader64 = DataLoader(TensorDataset(inputs.double()), batch_size=b, shuffle=False)
        sims64 = [SimilarityModel(copy.deepcopy(m).double(), f"model{i}", list(layers)) for i, m in enumerate(models)]
        exact64 = CKA(sims64[0], sims64[1], device=device).compute(loader64)
        floor = float(np.abs(exact64 - exact).max())
        results["float64_forward_max_abs_diff"] = floor
        rows.append(_row("floor (not timed): exact `cka` of the models run in float64 instead of float32", None, None,
                         exact64[0, 0], f"max abs diff vs (a) {floor:.1e}: the float32 forward's own round-off, "
                                        f"against {results['float32_max_abs_diff']['exact']:.1e} for (a32)"))

        log("check: our mean of per-batch biased CKA (not timed) ...")
        check = batch_mean_biased_cka(paths, layers, b, device)
        note = ""
        if t_sim is not None:
            gap = np.abs(check - rescaled).max()
            note = f"max abs diff vs simtorch ×{len(layers)}/{n_batches}: {gap:.1e}"
            if gap > 1e-4:  # float32 (simtorch) vs float64 (ours) round-off is ~1e-7
                raise BenchError(f"our per-batch CKA differs from simtorch's by {gap:.2e}: the two runs did not "
                                 "see the same models, data or batches.")
            results["values"] = {"simtorch_raw": raw.tolist(), "simtorch_batch_mean": rescaled.tolist()}
        rows.append(_row("check (not timed): our mean of per-batch biased CKA, same batches", None, None,
                         check[0, 0], note))

        widest = max(layers, key=lambda k: widths[k])
        log(f"Gram throughput on {widest} ...")
        g = {}
        for precision in ("float64", "float32"):
            g[precision] = t = gram_throughput(paths[0], widest, device, precision)
            rows.append(_row(f"`layer_gram` on a store, {widest} ({t['n']}×{t['p']}), precision {precision}",
                             t["ours_s"], None, None,
                             f"{t['ours_gflops']:.1f} GFLOP/s = {100 * t['ratio']:.0f} % of torch.matmul; "
                             f"max error {t['ours_rel_err']:.1e} of max |K|"))
            rows.append(_row(f"`torch.matmul(X, X.T)`, same shape, {precision}, in memory", t["ref_s"], None, None,
                             f"{t['ref_gflops']:.1f} GFLOP/s; max error {t['ref_rel_err']:.1e} of max |K|"))
        flops_exact = 2 * 2.0 * n * n * sum(widths.values())
        flops_mb = 2 * 2.0 * (n // b) * b * b * sum(widths.values())
        results.update(exact_matrix=exact.tolist(), minibatch_matrix=mb.tolist(), batch_mean_matrix=check.tolist(),
                       gram=g, seconds={"extract": asdict(t_extract), "measure_exact": asdict(t_exact),
                                "measure_minibatch": asdict(t_mb)},
                       gflops={"measure_exact": flops_exact / t_exact.wall / 1e9,
                               "measure_minibatch": flops_mb / t_mb.wall / 1e9},
                       loadavg_end=os.getloadavg(), rows=rows)
        return results
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(results["rows"], results["layers"][0]))
    print("\n" + format_diagonal(results))
    gf = results["gflops"]
    print(f"\nGram work of the whole measure stage: exact {gf['measure_exact']:.1f} GFLOP/s, "
          f"minibatch {gf['measure_minibatch']:.1f} GFLOP/s (2·n²·p per layer, both models; reads included).")
    print(f"Load average: {results['loadavg_start'][0]:.2f} at start, {results['loadavg_end'][0]:.2f} at end "
          f"({os.cpu_count()} CPUs); torch threads {results['threads']}; device {results['device']}.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
