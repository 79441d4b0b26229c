"""Benchmark: how time, peak memory and disk of ``pipeline.py measure`` grow with the zoo, against the cost model.

    .venv/bin/python benchmarks/bench_zoo_scale.py                                # M = 8..128, n = 1024 and 4096
    .venv/bin/python benchmarks/bench_zoo_scale.py --models 8 16 32 --samples 1024
    .venv/bin/python benchmarks/bench_zoo_scale.py --quick                        # a small smoke run

Zoos of M synthetic stores (float32, the inputs stored, L = 4 layers of widths 128, 128, 64 and 10, like
the pooled outputs of a small CNN; each model its own seed) are measured by the CLI in a fresh child
process with the default measures (cka, cka_debiased, cka_rbf, dcka), ``--memory-budget 1`` (``--budget``) and no
cache, twice: the default run (results table, heatmaps by the ``--plots auto`` rule, report.html) and
the compute-only run (``--no-plots --no-report``). Per run: wall time, peak resident memory (the
child's max RSS from ``os.wait4``), the largest temporary disk used while it runs (the spilled
statistics, polled every 0.2 s in its own ``TMPDIR``) and the size of ``--out``.

The cost model of docs/scaling.md predicts each compute-only time as

    T(M) = t₀ + a · M·L + b · P·L²,      P = M (M + 1) / 2 pairs,

with t₀ the child's start-up (imports, opening the stores), a the time of one layer's statistics
(Grams and moments) and b the time of one layer pair (all measures); a and b are fitted at each n on
the two smallest zoos and every larger zoo is a prediction, printed next to the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

WIDTHS = (128, 128, 64, 10)
MiB = 2**20


def write_zoo(folder: Path, models: int, n: int) -> list[Path]:
    """``models`` stores of the same n inputs, written as ``extract`` writes them (complete, read-only after)."""
    from extract.store import INPUTS_ARRAY, LAYERS_GROUP, StoreInfo, ZarrStore

    inputs = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
    paths = []
    for m in range(models):
        path = folder / f"m{m}.zarr"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + m)
        store = ZarrStore(path, read_only=False, create=True)
        chunk = 512
        h = inputs
        names = []
        for k, p in enumerate(WIDTHS):  # a random tanh network: each layer a function of the previous one
            h = np.tanh(h @ rng.standard_normal((h.shape[1], p)).astype(np.float32) / np.sqrt(h.shape[1]))
            name = f"layer{k}"
            names.append(name)
            store.create_array(f"{LAYERS_GROUP}/{name}", h.shape, "float32", chunk)
            store.write(f"{LAYERS_GROUP}/{name}", 0, h)
        store.create_array(INPUTS_ARRAY, inputs.shape, "float32", chunk)
        store.write(INPUTS_ARRAY, 0, inputs)
        store.write_info(StoreInfo(model_name=f"m{m}", layers=names, n_samples=n, chunk_samples=chunk,
                                   dtype="float32", samples_done=n, fingerprint=f"sha256:bench-{n}", complete=True,
                                   inputs_stored=True, input_shape=[64]))
    return paths


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # removed while walking
                pass
    return total


def run_measure(paths: list[Path], out: Path, extra: list[str], threads: int, budget: float = 1.0) -> dict:
    """One ``pipeline.py measure`` in a child process: seconds, peak RSS, peak temporary disk, --out size."""
    tmp = Path(tempfile.mkdtemp(prefix="zoo-tmp-"))
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "measure", *map(str, paths), "--memory-budget", str(budget),
           "--no-cache", "--quiet", "--device", "cpu", "--out", str(out), *extra]
    peak_disk = 0
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def poll() -> None:
        nonlocal peak_disk
        while not done.wait(0.2):
            peak_disk = max(peak_disk, folder_bytes(tmp))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    stderr = child.stderr.read().decode()
    child.stderr.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"measure failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "tmp_mib": peak_disk / MiB,
            "out_mib": folder_bytes(out) / MiB, "files": sum(len(f) for _, _, f in os.walk(out))}


def fit(rows: list[dict], layers: int) -> tuple[float, float, float]:
    """t₀, a, b of T = t₀ + a·M·L + b·P·L² from the compute-only runs of the two smallest zoos and the start-up."""
    t0 = rows[0]["startup"]
    (m1, t1), (m2, t2) = [(r["M"], r["compute"]["seconds"] - t0) for r in rows[:2]]
    p1, p2 = m1 * (m1 + 1) / 2, m2 * (m2 + 1) / 2
    x = np.array([[m1 * layers, p1 * layers**2], [m2 * layers, p2 * layers**2]], dtype=float)
    a, b = np.linalg.solve(x, np.array([t1, t2]))
    return t0, float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--samples", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--default-up-to", type=int, default=10**9,
                        help="run the default (plots + report) only for zoos up to this many models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.0, help="--memory-budget of every run, in GiB")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "zoo_scale")
    parser.add_argument("--quick", action="store_true", help="M = 4, 8, 12 at n = 256")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.models, args.samples = [4, 8, 12], [256]
    layers = len(WIDTHS)
    print(f"# bench_zoo_scale: {os.cpu_count()} CPUs, {args.threads} threads, L = {layers}, widths {WIDTHS}, "
          f"--memory-budget {args.budget:g} GiB, {time.strftime('%Y-%m-%d')}")
    all_rows = []
    for n in args.samples:
        folder = args.work / f"n{n}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = write_zoo(folder, max(args.models), n)
        startup = run_measure(paths[:1], folder / "out-startup", ["--measures", "cka", "--no-plots", "--no-report"],
                              args.threads, args.budget)["seconds"]
        rows = []
        for m in sorted(args.models):
            row = {"n": n, "M": m, "pairs": m * (m + 1) // 2, "startup": startup,
                   "stores_mib": folder_bytes(folder) / MiB * m / max(args.models)}
            row["compute"] = run_measure(paths[:m], folder / f"out-{m}-compute", ["--no-plots", "--no-report"],
                                         args.threads, args.budget)
            if m <= args.default_up_to:
                row["default"] = run_measure(paths[:m], folder / f"out-{m}-default", [], args.threads, args.budget)
            for out in folder.glob(f"out-{m}-*"):
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        t0, a, b = fit(rows, layers)
        print(f"\nn = {n}: fitted t0 = {t0:.2f} s, a = {a * 1e3:.2f} ms per layer, b = {b * 1e3:.3f} ms per layer pair")
        print("| n | M | pairs | compute s | predicted s | ratio | default s | default / compute | peak MiB "
              "(compute / default) | temp disk MiB | --out MiB | files |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            predicted = t0 + a * r["M"] * layers + b * r["pairs"] * layers**2
            c, d = r["compute"], r.get("default")
            print(f"| {n} | {r['M']} | {r['pairs']} | {c['seconds']:.1f} | {predicted:.1f} | "
                  f"{c['seconds'] / predicted:.2f} | {d['seconds'] if d else float('nan'):.1f} | "
                  f"{d['seconds'] / c['seconds'] if d else float('nan'):.2f} | "
                  f"{c['peak_mib']:.0f} / {d['peak_mib'] if d else float('nan'):.0f} | {c['tmp_mib']:.0f} | "
                  f"{d['out_mib'] if d else c['out_mib']:.1f} | {d['files'] if d else c['files']} |")
            r["predicted"] = predicted
        all_rows += rows
        print()
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1))


if __name__ == "__main__":
    main()
