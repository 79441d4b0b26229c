"""Benchmark: a zoo of M models compared all-pairs, from scratch, with a warm cache, and as simtorch 0.2.1 does.

    .venv/bin/python benchmarks/bench_zoo.py             # M = 2, 4, 8 (+ a 9th), n = 1024, width 16, CPU
    .venv/bin/python benchmarks/bench_zoo.py --quick     # a small smoke run
    .venv/bin/python benchmarks/bench_zoo.py --device cuda

Every row runs in a fresh child process (the scratch, warm, +1 and simtorch 0.2.1 rows: the fastest of
``--repeats`` such runs, each from the same starting state, scratch and simtorch runs interleaved; the
notes list every run's time, since the shared 2-core machine varies by 10-30 % from run to run); its
wall time is measured inside the child around the work only (imports and model construction excluded),
and its peak memory is the child's maximum resident set size (``os.wait4`` rusage), printed next to the
baseline of a child that only imports torch and simtorch. Rows:

* **scratch** — ``extract`` M models (random-init ``WideCNN``, 5 layers) over n inputs into Zarr stores,
  then the Engine's exact linear ``cka`` on all M(M+1)/2 store pairs (each store against every other and
  itself) with a fresh statistics cache: one forward pass and one n × n Gram per (model, layer).
* **warm cache** — the same measurement again: every Gram comes from the cache (no inference, no Gram).
* **+1 model (warm)** — a 9th model is extracted into the zoo of 8 and all 45 pairs are measured:
  only its 5 Grams are computed.
* **simtorch 0.2.1** — ``CKA(...).compute(loader)`` of simtorch 0.2.1 (installed in
  ``.bench/simtorch021-venv`` by ``bench_measure.py --setup``) on each of the M(M-1)/2 pairs: inference
  is rerun for every pair, and per batch a Gram per layer pair is centred with O(b³) products.
  (Skipped with a note when that venv is missing.)

Then the Gram kernel alone on synthetic float32 stores of growing n × width with a fixed
``memory_budget``: ``measure.engine.streaming.layer_gram`` (blocked, out of core once X no longer fits the
budget) next to a plain ``torch.matmul(X, X.T)`` of the same float64 matrix held in memory, in
GFLOP/s (2·n²·p flop) and peak memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

SIMTORCH_VENV = ROOT / ".bench" / "simtorch021-venv"
MiB = 2**20


# ----------------------------------------------------------------------------- children
def _child_baseline(job: dict) -> dict:
    import torch  # noqa: F401

    import extract  # noqa: F401
    import measure  # noqa: F401

    return {"seconds": 0.0}


def _child_zoo(job: dict) -> dict:
    """Extract ``job["extract"]`` model indices into ``job["folder"]``, then measure every pair there."""
    import torch
    import zarr  # noqa: F401  (imported before the clock starts, like torch)
    from bench_measure_models import LAYERS, WideCNN

    from extract.runner import extract
    from extract.store import ZarrStore
    from measure.engine import Engine
    from measure.engine.cache import StatisticsCache

    torch.set_num_threads(job["threads"])
    inputs = torch.load(job["inputs"])
    folder = Path(job["folder"])
    models = []
    for k in job["extract"]:
        model = WideCNN(job["width"])
        model.load_state_dict(torch.load(job["state_dicts"][k]))
        models.append((k, model))
    started = time.perf_counter()
    for k, model in models:
        extract(model, inputs, folder / f"m{k}.zarr", name=f"m{k}", layers=list(job.get("layers", LAYERS)),
                batch_size=256, device=job["device"], progress=False)
    extracted = time.perf_counter()
    paths = sorted(p for p in folder.glob("m*.zarr"))
    cache = StatisticsCache(job["cache"]) if job.get("cache") else None
    engine = Engine([ZarrStore(p) for p in paths], device=job["device"], cache=cache,
                    memory_budget=job["zoo_budget"], precision=job.get("precision", "float64"))
    pairs = list(itertools.combinations_with_replacement(range(len(paths)), 2))
    results = engine.run([("cka", {})], pairs)
    if job["device"].startswith("cuda"):
        torch.cuda.synchronize()
    done = time.perf_counter()
    return {"seconds": done - started, "extract_seconds": extracted - started, "measure_seconds": done - extracted,
            "stores": len(paths), "pairs": len(results), "statistics_computed": engine.statistics_computed,
            "cache_hits": cache.hits if cache else 0, "matrix01": results[1].matrix.tolist() if len(results) > 1
            else None}


def _synthetic_store(path: Path, n: int, p: int) -> None:
    import numpy as np

    from extract.store import StoreInfo, ZarrStore

    chunk = max(1, (4 * MiB) // (p * 4))
    store = ZarrStore(path, read_only=False, create=True)
    info = StoreInfo(model_name="synthetic", layers=["x"], n_samples=n, chunk_samples=chunk,
                     fingerprint="sha256:synthetic", inputs_stored=False)
    store.write_info(info)
    store.create_array("layers/x", (n, p), "float32", chunk)
    rng = np.random.default_rng(0)
    step = max(chunk, (64 * MiB) // (p * 4) // chunk * chunk)
    for a in range(0, n, step):
        b = min(n, a + step)
        store.write("layers/x", a, rng.standard_normal((b - a, p), dtype=np.float32))
    info.samples_done, info.complete = n, True
    store.write_info(info)


def _child_gram(job: dict) -> dict:
    import torch

    from extract.store import ZarrStore
    from measure.engine.streaming import layer_gram

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    store = ZarrStore(job["store"])
    n, p = store.n_samples, store.layer_shape("x")[0]
    started = time.perf_counter()
    gram = layer_gram(store, "x", device, job["budget"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "gflops": 2 * n * n * p / seconds / 1e9, "trace": float(gram.trace())}


def _child_matmul(job: dict) -> dict:
    import torch

    from extract.store import ZarrStore

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    x = torch.from_numpy(ZarrStore(job["store"]).read_layer("x")).to(device, torch.float64)
    n, p = x.shape
    started = time.perf_counter()
    gram = torch.matmul(x, x.T)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "gflops": 2 * n * n * p / seconds / 1e9, "trace": float(gram.trace())}


CHILDREN = {"baseline": _child_baseline, "zoo": _child_zoo, "gram": _child_gram, "matmul": _child_matmul}


def run_child(kind: str, job: dict, python: str = sys.executable, script: Path | None = None) -> dict:
    """Run one child; its JSON result plus ``peak_mib`` (max RSS of the child, from ``os.wait4``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
        job_path = handle.name
    out_path = job_path + ".out"
    if script is None:
        argv = [python, str(Path(__file__).resolve()), "--child", kind, job_path, out_path]
        env = dict(os.environ)
    else:  # simtorch 0.2.1's runner in its own venv
        job = dict(job, out=out_path)
        Path(job_path).write_text(json.dumps(job))
        argv = [python, str(script), job_path]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(Path(out_path).read_text())
    result["peak_mib"] = usage.ru_maxrss / 1024
    os.unlink(job_path)
    os.unlink(out_path)
    return result


# ----------------------------------------------------------------------------- orchestration
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "JOB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--zoo-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--n", type=int, default=1024, help="samples (default 1024)")
    parser.add_argument("--width", type=int, default=16, help="WideCNN width (act1: width × 1024 features)")
    parser.add_argument("--batch-size", type=int, default=256, help="simtorch 0.2.1's batch size")
    parser.add_argument("--budget-mib", type=int, default=64, help="memory_budget of the Gram kernel rows (MiB)")
    parser.add_argument("--zoo-budget-mib", type=int, default=1024,
                        help="memory_budget of the zoo runs (MiB; default 1024, as pipeline.py measure)")
    parser.add_argument("--layer-set", choices=["act", "all"], default="act",
                        help="act: act1-4 and fc (5 layers, default); all: also conv1-4 (9 layers)")
    parser.add_argument("--precisions", nargs="+", choices=["float64", "float32"], default=["float64", "float32"],
                        help="Engine precision of the zoo runs (default: both)")
    parser.add_argument("--gram-sizes", nargs="+", default=["1024x8192", "1024x32768", "2048x32768"],
                        help="n x width of the synthetic Gram rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch_threads())
    parser.add_argument("--quick", action="store_true", help="M = 2, 3; n = 256; small Gram rows")
    parser.add_argument("--no-simtorch", action="store_true", help="skip simtorch 0.2.1")
    parser.add_argument("--simtorch-max-pairs", type=int, default=6,
                        help="time at most this many simtorch 0.2.1 pairs per zoo and scale to all (0: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="scratch and simtorch 0.2.1 rows: the fastest of this many fresh runs (default 3)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args(argv)


def torch_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _row(label: str, r: dict | None, note: str = "") -> str:
    if r is None:
        return f"| {label} | – | – | {note} |"
    return f"| {label} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {note} |"


def run(args: argparse.Namespace) -> str:
    import torch
    from bench_measure_models import LAYER_SETS, WideCNN, make_inputs

    if args.quick:
        args.zoo_sizes, args.n, args.gram_sizes = [2, 3], 256, ["256x4096", "256x16384"]
    work = Path(args.work or tempfile.mkdtemp(prefix="simtorch-bench-zoo-"))
    work.mkdir(parents=True, exist_ok=True)
    m_max = max(args.zoo_sizes)
    inputs = work / "inputs.pt"
    torch.save(make_inputs(args.n), inputs)
    state_dicts = []
    for seed in range(m_max + 1):
        torch.manual_seed(seed)
        path = work / f"w{seed}.pt"
        torch.save(WideCNN(args.width).state_dict(), path)
        state_dicts.append(str(path))
    common = {"inputs": str(inputs), "state_dicts": state_dicts, "width": args.width, "device": args.device,
              "threads": args.threads, "budget": args.budget_mib * MiB, "zoo_budget": args.zoo_budget_mib * MiB,
              "layers": LAYER_SETS[args.layer_set]}
    base = run_child("baseline", {})
    lines = [f"n = {args.n} samples, WideCNN width {args.width} ({len(common['layers'])} layers, widest "
             f"{args.width * 1024} features), "
             f"{args.threads} threads, device {args.device}, memory budget {args.zoo_budget_mib} MiB; child "
             f"baseline (imports only) {base['peak_mib']:.0f} MiB RSS.", "",
             "| run | seconds | peak MiB | notes |", "|---|---:|---:|---|"]
    simtorch_python = SIMTORCH_VENV / "bin" / "python"
    have_simtorch = simtorch_python.exists() and not args.no_simtorch
    summary: dict[int, dict[str, Any]] = {}
    for m in args.zoo_sizes:
        summary[m] = {}
        jobs = {p: dict(common, folder=str(work / f"zoo{m}_{p}"),
                        cache=str(work / f"zoo{m}_{p}" / ".simtorch-cache.zarr"), precision=p)
                for p in args.precisions}
        runs: dict[str, list[dict]] = {p: [] for p in args.precisions}
        sims: list[dict] = []
        for _ in range(args.repeats):  # interleaved, so a slower spell of the shared machine hits every tool
            for precision, job in jobs.items():  # each from nothing: no stores, no cache
                shutil.rmtree(job["folder"], ignore_errors=True)
                Path(job["folder"]).mkdir()
                runs[precision].append(run_child("zoo", dict(job, extract=list(range(m)))))
            if have_simtorch:
                sims.append(run_child("simtorch", dict(common, batch_size=args.batch_size,
                                                       state_dicts=state_dicts[:m], max_pairs=args.simtorch_max_pairs),
                                      python=str(simtorch_python), script=HERE / "_simtorch021_zoo_runner.py"))
        for precision, job in jobs.items():
            scratch = min(runs[precision], key=lambda r: r["seconds"])
            warm = min((run_child("zoo", dict(job, extract=[])) for _ in range(args.repeats)),
                       key=lambda r: r["seconds"])
            spread = " / ".join(f"{r['seconds']:.2f}" for r in runs[precision])
            lines.append(_row(f"M={m} scratch, {precision} (extract + {scratch['pairs']} pairs)", scratch,
                              f"extract {scratch['extract_seconds']:.2f} s + measure "
                              f"{scratch['measure_seconds']:.2f} s, {scratch['statistics_computed']} Grams; "
                              f"runs {spread} s"))
            lines.append(_row(f"M={m} warm cache, {precision}", warm, f"{warm['statistics_computed']} Grams "
                                                                     f"computed, {warm['cache_hits']} reused"))
            summary[m][precision] = {"scratch": scratch, "warm": warm}
        if have_simtorch:
            sim = min(sims, key=lambda r: r["seconds"])
            how = (f"{sim['pairs']} pairs" if sim["measured_pairs"] == sim["pairs"] else
                   f"{sim['measured_pairs']} of {sim['pairs']} pairs timed ({sim['measured_seconds']:.1f} s), "
                   "scaled to all")
            faster = ", ".join(f"{p} scratch is {sim['seconds'] / summary[m][p]['scratch']['seconds']:.1f}×"
                               for p in args.precisions)
            spread = " / ".join(f"{r['seconds']:.2f}" for r in sims)
            lines.append(_row(f"M={m} simtorch 0.2.1 ({how})", sim,
                              f"batch {args.batch_size}; {faster} faster; runs {spread} s"))
            summary[m]["simtorch"] = sim
        else:
            why = "--no-simtorch" if args.no_simtorch else f"no {SIMTORCH_VENV} (benchmarks/bench_measure.py makes it)"
            lines.append(_row(f"M={m} simtorch 0.2.1", None, f"not run: {why}"))
    for precision in args.precisions:
        folder = work / f"zoo{m_max}_{precision}"
        cache, saved = folder / ".simtorch-cache.zarr", work / "cache-of-the-zoo.zarr"
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(cache, saved)
        runs = []
        for _ in range(args.repeats):  # each from the zoo of m_max with its warm cache, without the new model
            shutil.rmtree(folder / f"m{m_max}.zarr", ignore_errors=True)
            shutil.rmtree(cache)
            shutil.copytree(saved, cache)
            runs.append(run_child("zoo", dict(common, folder=str(folder), cache=str(cache), precision=precision,
                                              extract=[m_max])))
        added = min(runs, key=lambda r: r["seconds"])
        ratio = added["seconds"] / summary[m_max][precision]["scratch"]["seconds"]
        lines.append(_row(f"+1 model to M={m_max}, {precision} (warm, {added['pairs']} pairs)", added,
                          f"{added['statistics_computed']} Grams computed; {ratio:.2f} of the M={m_max} scratch run"))
    lines += ["", f"Gram kernel, memory_budget = {args.budget_mib} MiB (float32 store, float64 Gram):", "",
              "| n × width | X float64 MiB | layer_gram s | GFLOP/s | peak MiB | torch.matmul s | GFLOP/s | peak MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size in args.gram_sizes:
        n, p = (int(v) for v in size.lower().split("x"))
        store = work / f"gram_{n}x{p}.zarr"
        if not store.exists():
            _synthetic_store(store, n, p)
        ours = run_child("gram", dict(common, store=str(store)))
        plain = run_child("matmul", dict(common, store=str(store)))
        assert abs(ours["trace"] - plain["trace"]) <= 1e-9 * abs(plain["trace"]), (ours["trace"], plain["trace"])
        lines.append(f"| {n} × {p} | {n * p * 8 / MiB:.0f} | {ours['seconds']:.2f} | {ours['gflops']:.1f} | "
                     f"{ours['peak_mib']:.0f} | {plain['seconds']:.2f} | {plain['gflops']:.1f} | "
                     f"{plain['peak_mib']:.0f} |")
        shutil.rmtree(store, ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, job_path, out_path = args.child
        result = CHILDREN[kind](json.loads(Path(job_path).read_text()))
        Path(out_path).write_text(json.dumps(result))
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
