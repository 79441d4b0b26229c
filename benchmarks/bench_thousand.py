"""Benchmark: extract and screen a thousand models on one machine with ``cka_sketch``.

    .venv/bin/python benchmarks/bench_thousand.py                        # 1,000 models, n = 512, 4 layers
    .venv/bin/python benchmarks/bench_thousand.py --models 20            # a smoke run
    .venv/bin/python benchmarks/bench_thousand.py --models 250 --report  # also time the run with report.html

The zoo: the demo CNN (``extract.demo:cnn``, width 16) at ``--models`` random-init seeds (seed k:
``torch.manual_seed(k)`` before building it; nothing is trained), each run over the first n = 512
held-out digits images (scikit-learn, offline) with its four conv blocks captured (``block1..block4``,
1,024, 512, 512 and 256 features per sample, float32, the inputs stored too).

Stages, each in one fresh child process (one interpreter for all models: no per-model start-up):

1. **extract**: ``extract.runner.extract`` once per model, in a loop, stores under ``--work``
   (default ``/tmp/bench_thousand``);
2. **measure**: ``pipeline.py measure <stores> --measures cka_sketch --no-plots --no-report
   --memory-budget B --cache <work>/cache.zarr --out <work>/out`` (a fresh cache: every sketch computed);
3. (``--report``) the same with report.html, the cache now warm, to time the report at this size;
4. **overview**: the clustered model × model best-match view (``measure.report.zoo``) from the
   results table, drawn as a PNG (``--png``).

Per stage: wall time, the child's peak resident memory (``ru_maxrss`` from ``os.wait4``), and the disk
of the stores, the statistics cache and ``--out``. Per-model and per-pair costs are printed too, for
extrapolating a smaller run to 1,000 models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_zoo_scale import folder_bytes  # noqa: E402

LAYERS = ["block1", "block2", "block3", "block4"]
MiB = 2**20


def store_name(seed: int) -> str:
    return f"cnn_s{seed:04d}"


def extract_stage(folder: Path, models: int, samples: int, threads: int) -> None:
    """Child: write ``models`` stores (skips finished ones: ``extract`` reuses a complete store)."""
    import torch

    from extract.demo import cnn, digits_test
    from extract.runner import extract

    torch.set_num_threads(threads)
    x = digits_test()[:samples].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(models):
        torch.manual_seed(seed)
        model = cnn().eval()
        extract(model, x, folder / f"{store_name(seed)}.zarr", name=store_name(seed), layers=LAYERS,
                batch_size=samples, model_spec="extract.demo:cnn", progress=False)


def run_child(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = b""
    # read stderr while waiting (a full pipe would block the child)
    import threading

    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(child.stderr.read()), daemon=True)
    reader.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    reader.join()
    stderr = b"".join(chunks)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"stage failed (exit {code}): {' '.join(cmd)}\n{stderr.decode()[-3000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}


def overview_png(out: Path, names: list[str], png: Path, title: str) -> dict:
    """Best-match model × model view from the results table, clustered, drawn to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from measure.report.zoo import BEST_MATCH, ZooView, best_matches, cluster_order

    start = time.perf_counter()
    table = next(p for p in (out / "results.csv.gz", out / "results.csv") if p.exists())
    df = pd.read_csv(table, usecols=["store_a", "store_b", "layer_a", "layer_b", "value"],
                     dtype={"store_a": "category", "store_b": "category", "layer_a": "category",
                            "layer_b": "category", "value": "float32"})
    read_s = time.perf_counter() - start
    index = {n: i for i, n in enumerate(names)}
    layer_index = {n: i for i, n in enumerate(LAYERS)}
    a = df["store_a"].cat.categories.map(index).to_numpy()[df["store_a"].cat.codes.to_numpy()]
    b = df["store_b"].cat.categories.map(index).to_numpy()[df["store_b"].cat.codes.to_numpy()]
    la = df["layer_a"].cat.categories.map(layer_index).to_numpy()[df["layer_a"].cat.codes.to_numpy()]
    lb = df["layer_b"].cat.categories.map(layer_index).to_numpy()[df["layer_b"].cat.codes.to_numpy()]
    m, nl = len(names), len(LAYERS)
    cube = np.full((m, m, nl, nl), np.nan, dtype=np.float32)
    cube[a, b, la, lb] = df["value"].to_numpy()
    del df
    values = best_matches(cube.reshape(m * m, nl, nl)).reshape(m, m)
    values = np.where(np.isfinite(values), values, values.T)  # a table holding one order only
    view = ZooView(BEST_MATCH, values, np.isfinite(values))
    order, _ = cluster_order(view, "similarity", (0.0, 1.0))
    cluster_s = time.perf_counter() - start - read_s
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=100)
    im = ax.imshow(values[np.ix_(order, order)], cmap="viridis", vmin=float(np.nanmin(values)), vmax=1.0,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("model (clustered order)", fontsize=8)
    ax.set_ylabel("model (clustered order)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    off = values[~np.eye(m, dtype=bool)]
    return {"seconds": time.perf_counter() - start, "read_s": read_s, "cluster_s": cluster_s,
            "png_kib": png.stat().st_size / 1024, "best_match_min": float(np.nanmin(off)),
            "best_match_median": float(np.nanmedian(off)), "best_match_max": float(np.nanmax(off))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the measure stage")
    parser.add_argument("--extract-threads", type=int, default=1, help="torch threads of the extract stage")
    parser.add_argument("--budget", type=float, default=4.0, help="--memory-budget of the measure stage, in GiB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_thousand"))
    parser.add_argument("--report", action="store_true", help="also time a run that writes report.html")
    parser.add_argument("--workers", type=int, default=0, help="also time a run with --workers N (LocalCluster)")
    parser.add_argument("--png", type=Path, default=None, help="draw the clustered overview to this PNG")
    parser.add_argument("--json", type=Path, default=None, help="also write the row as JSON")
    parser.add_argument("--stage", choices=["extract"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    stores = args.work / f"stores-{args.models}"
    if args.stage == "extract":
        extract_stage(stores, args.models, args.samples, args.extract_threads)
        return

    import torch

    m, layers = args.models, len(LAYERS)
    pairs = m * (m + 1) // 2
    print(f"# bench_thousand: {m} models × {layers} layers, n = {args.samples}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} measure threads, {args.extract_threads} extract threads, "
          f"--memory-budget {args.budget:g}, {time.strftime('%Y-%m-%d')}", flush=True)
    if stores.exists():
        shutil.rmtree(stores)
    row: dict = {"models": m, "layers": layers, "n": args.samples, "pairs": pairs}
    row["extract"] = run_child([sys.executable, __file__, "--stage", "extract", "--models", str(m), "--samples",
                                str(args.samples), "--extract-threads", str(args.extract_threads), "--work",
                                str(args.work)], args.extract_threads)
    row["stores_mib"] = folder_bytes(stores) / MiB
    print(f"extract: {json.dumps(row['extract'])}, stores {row['stores_mib']:.0f} MiB", flush=True)

    cache, out = args.work / f"cache-{m}.zarr", args.work / f"out-{m}"
    for p in (cache, out):
        shutil.rmtree(p, ignore_errors=True)
    base = [sys.executable, str(ROOT / "pipeline.py"), "measure", str(stores), "--measures", "cka_sketch",
            "--no-plots", "--memory-budget", f"{args.budget:g}", "--device", "cpu", "--quiet", "--cache", str(cache)]
    row["measure"] = run_child([*base, "--no-report", "--out", str(out)], args.threads)
    row["cache_mib"] = folder_bytes(cache) / MiB
    row["out_mib"] = folder_bytes(out) / MiB
    print(f"measure: {json.dumps(row['measure'])}, cache {row['cache_mib']:.0f} MiB, --out {row['out_mib']:.0f} "
          f"MiB", flush=True)
    if args.report:
        out_r = args.work / f"out-{m}-report"
        shutil.rmtree(out_r, ignore_errors=True)
        row["measure_report_warm"] = run_child([*base, "--out", str(out_r)], args.threads)
        row["report_mib"] = (out_r / "report.html").stat().st_size / MiB
        row["out_report_mib"] = folder_bytes(out_r) / MiB
        print(f"measure with report (warm cache): {json.dumps(row['measure_report_warm'])}, report.html "
              f"{row['report_mib']:.1f} MiB", flush=True)
    if args.workers:
        out_w, cache_w = args.work / f"out-{m}-workers", args.work / f"cache-{m}-workers.zarr"
        for p in (out_w, cache_w):
            shutil.rmtree(p, ignore_errors=True)
        base_w = [x if x != str(cache) else str(cache_w) for x in base]
        row["measure_workers"] = run_child([*base_w, "--no-report", "--workers", str(args.workers), "--out",
                                            str(out_w)], 1)
        print(f"measure --workers {args.workers}: {json.dumps(row['measure_workers'])}", flush=True)
    if args.png:
        names = [store_name(k) for k in range(m)]
        row["overview"] = overview_png(out, names, args.png,
                                       f"{m} random-init demo CNNs: cka_sketch best match, clustered")
        print(f"overview: {json.dumps(row['overview'])}", flush=True)
    row["disk_mib"] = row["stores_mib"] + row["cache_mib"] + row["out_mib"]
    e, c = row["extract"]["seconds"], row["measure"]["seconds"]
    print(f"per model: extract {e / m * 1e3:.0f} ms; measure {c / m * 1e3:.0f} ms per model overall, "
          f"{c / pairs * 1e3:.3f} ms per store pair overall", flush=True)
    print("| models | layers | n | store pairs | extract s | measure s | total s | peak MiB (extract / measure) | "
          "stores MiB | cache MiB | --out MiB | disk MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {m} | {layers} | {args.samples} | {pairs:,} | {e:.0f} | {c:.0f} | {e + c:.0f} | "
          f"{row['extract']['peak_mib']:.0f} / {row['measure']['peak_mib']:.0f} | {row['stores_mib']:.0f} | "
          f"{row['cache_mib']:.0f} | {row['out_mib']:.0f} | {row['disk_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
