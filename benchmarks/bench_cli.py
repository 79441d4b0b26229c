"""Benchmark: the whole job through the CLI (extract, then measure), against simtorch 0.2.1, every step a fresh process.

    .venv/bin/python benchmarks/bench_cli.py            # n = 2048, WideCNN width 32, 5 layers, batch 256, 2 rounds
    .venv/bin/python benchmarks/bench_cli.py --quick    # n = 512, width 8, one round
    .venv/bin/python benchmarks/bench_cli.py --env MALLOC_MMAP_MAX_=0 --env MALLOC_TRIM_THRESHOLD_=2147483647

The two random-init ``WideCNN`` models (seeds 0 and 1) and the 2,048 inputs of ``bench_measure.py``, saved as
state dicts and a ``.pt`` tensor. Each row is the fastest of ``--rounds`` runs; every run is a new process
timed from outside (imports included), so the columns add up to what a user waits:

* simtorch 0.2.1: ``CKA(...).compute(loader)`` with batches of 256 (``_simtorch021_runner.py`` in
  ``.bench/simtorch021-venv``, set up by ``bench_measure.py``): the process, and its ``compute`` alone;
* bare forward: one process that imports torch, builds both models and runs their forward passes over the
  same batches under ``inference_mode``, keeping nothing — the floor of extraction;
* ``pipeline.py extract --config`` of both models into Zarr stores (one command), with the write rate over the
  whole command next to a plain copy of the same files (``shutil.copytree``, best of 3: the disk's own rate);
* ``pipeline.py measure --no-cache --no-plots --no-report`` on the two stores: exact ``cka`` with the default
  precision (``auto``: float32 products for these float32 stores), with ``--precision float64``, and
  ``cka_minibatch(batch_size=256)`` (Nguyen et al.'s minibatch CKA over simtorch's batches).

``--env KEY=VALUE`` (repeatable) sets a variable in every process of the run, simtorch's, the bare forward
and ours alike (for example glibc's allocator settings, see ``benchmarks/README.md``).

Printed: the step times, then each route end to end (extract + measure) with its speed relative to simtorch's
whole process (``×``, higher is faster) and to its ``compute`` alone, and extract against the bare forward.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_measure import DEFAULT_VENV, _has_simtorch021  # noqa: E402
from bench_measure_models import LAYERS, write_model_pair  # noqa: E402

FORWARD = r"""
import sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, sys.argv[1])
from bench_measure_models import WideCNN
inputs = torch.load(sys.argv[2])
width, batch = int(sys.argv[3]), int(sys.argv[4])
models = []
for path in sys.argv[5:]:
    model = WideCNN(width)
    model.load_state_dict(torch.load(path))
    models.append(model.eval())
t1 = time.perf_counter()
with torch.inference_mode():
    for model in models:
        for a in range(0, len(inputs), batch):
            model(inputs[a:a + batch])
print(time.perf_counter() - t1)
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def best(runs: list[tuple[float, str]]) -> tuple[float, str]:
    return min(runs, key=lambda r: r[0])


def read_matrix(folder: Path, measure: str) -> np.ndarray:
    with open(folder / measure / "model0__model1.csv") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([[float(v) for v in row[1:]] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=2048)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--quick", action="store_true", help="n = 512, width 8, one round")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for every process of the run (repeatable)")
    args = parser.parse_args()
    malformed = [item for item in args.env if "=" not in item]
    if malformed:
        parser.error(f"--env takes KEY=VALUE, got {malformed}")
    environ = {**os.environ, **dict(item.split("=", 1) for item in args.env)}  # every process of the run
    if args.quick:
        args.n_samples, args.width, args.rounds = 512, 8, 1
    python = args.venv / "bin" / "python"
    have_simtorch = _has_simtorch021(python)
    env = {**environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model_pair(work, args.n_samples, args.width)
        states = [str(work / f"model{i}.pt") for i in (0, 1)]
        (work / "factory.py").write_text(
            f"from bench_measure_models import WideCNN\n\ndef wide_cnn():\n    return WideCNN({args.width})\n")
        models = "\n".join(f'[[models]]\nmodel = "factory:wide_cnn"\nweights = "{s}"\nname = "model{i}"\n'
                           f"layers = {json.dumps(LAYERS)}\n" for i, s in enumerate(states))
        (work / "zoo.toml").write_text(f'data = "{work / "inputs.pt"}"\nbatch_size = {args.batch_size}\n'
                                       f'device = "cpu"\n\n{models}')
        env_work = {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}{os.pathsep}{work}"}
        rows: dict[str, tuple[float, str]] = {}
        for _ in range(args.rounds):  # interleaved, so that load changes hit every row alike
            if have_simtorch:
                job = {"state_dicts": states, "inputs": str(work / "inputs.pt"), "width": args.width,
                       "batch_size": args.batch_size, "device": "cpu", "layers": LAYERS,
                       "out": str(work / "simtorch.json")}
                (work / "job.json").write_text(json.dumps(job))
                clean = {k: v for k, v in environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
                wall, _ = timed([str(python), str(HERE / "_simtorch021_runner.py"), str(work / "job.json")], clean)
                compute = json.loads((work / "simtorch.json").read_text())["seconds"]
                rows["simtorch"] = min(rows.get("simtorch", (float("inf"), "")), (wall, str(compute)))
            rows["forward"] = best([rows.get("forward", (float("inf"), "")),
                                    timed([sys.executable, "-c", FORWARD, str(HERE), str(work / "inputs.pt"),
                                           str(args.width), str(args.batch_size), *states], env)])
            stores = work / "stores"
            rows["extract"] = best([rows.get("extract", (float("inf"), "")),
                                    timed([sys.executable, "pipeline.py", "extract", "--config", str(work / "zoo.toml"),
                                           "--out", str(stores), "--force", "--quiet"], env_work)])
            for label, extra in (("cka auto", ["--measures", "cka"]),
                                 ("cka float64", ["--measures", "cka", "--precision", "float64"]),
                                 ("cka_minibatch", ["--measures", f"cka_minibatch(batch_size={args.batch_size})"])):
                out = work / label.replace(" ", "_")
                rows[label] = best([rows.get(label, (float("inf"), "")),
                                    timed([sys.executable, "pipeline.py", "measure", str(stores / "model0.zarr"),
                                           str(stores / "model1.zarr"), *extra, "--no-cache", "--no-plots",
                                           "--no-report", "--quiet", "--out", str(out)], env)])
        auto, f64 = read_matrix(work / "cka_auto", "cka"), read_matrix(work / "cka_float64", "cka")
        raw_mb = sum(a.stat().st_size for a in (stores).rglob("*") if a.is_file()) / 1e6
        copies = []
        for k in range(3):  # the disk's own rate for the same files: a plain copy (read + write), best of 3
            start = time.perf_counter()
            shutil.copytree(stores, work / f"copy{k}")
            copies.append(time.perf_counter() - start)
        copy_rate = raw_mb / min(copies)
        forward_only = float(rows["forward"][1])
    sim_wall = rows["simtorch"][0] if have_simtorch else float("nan")
    sim_compute = float(rows["simtorch"][1]) if have_simtorch else float("nan")
    print(f"n = {args.n_samples}, WideCNN width {args.width}, layers {', '.join(LAYERS)}, batch {args.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}; "
          f"fastest of {args.rounds}; environment {' '.join(args.env) or 'as is'}\n")
    print("| step (a fresh process each) | wall s | note |\n|---|---:|---|")
    if have_simtorch:
        print(f"| simtorch 0.2.1 `CKA.compute`, batch {args.batch_size} | {sim_wall:.2f} | its compute alone "
              f"{sim_compute:.2f} s |")
    print(f"| bare forward of both models | {rows['forward'][0]:.2f} | forward passes alone {forward_only:.2f} s |")
    extract_s = rows["extract"][0]
    print(f"| `extract --config` (both models) | {extract_s:.2f} | {extract_s / rows['forward'][0]:.2f}× the bare "
          f"forward process; {raw_mb:.0f} MB on disk, {raw_mb / extract_s:.0f} MB/s over the whole command "
          f"({raw_mb / extract_s / copy_rate:.0%} of a plain copy of the same files, {copy_rate:.0f} MB/s) |")
    for label in ("cka auto", "cka float64", "cka_minibatch"):
        note = (f"max abs diff vs float64 {np.abs(auto - f64).max():.1e}" if label == "cka auto" else "")
        print(f"| `measure` {label} | {rows[label][0]:.2f} | {note} |")
    print("\n| route, end to end | ours s | × vs simtorch process | × vs simtorch compute |\n|---|---:|---:|---:|")
    for label in ("cka_minibatch", "cka auto", "cka float64"):
        total = extract_s + rows[label][0]
        print(f"| extract + `{label}` | {total:.2f} | {sim_wall / total:.2f}× | {sim_compute / total:.2f}× |")
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
