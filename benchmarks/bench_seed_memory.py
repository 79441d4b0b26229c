"""Benchmark: peak memory of the model-pair API (``CKA(...).compute(loader)``) on the wide CNN pair.

    .venv/bin/python benchmarks/bench_seed_memory.py                       # this checkout, n=2048, width 32
    .venv/bin/python benchmarks/bench_seed_memory.py --root /tmp/other    # the measure/extract of another checkout
    .venv/bin/python benchmarks/bench_seed_memory.py --quick              # n=512, width 8

The pair is ``bench_measure.py``'s: two random-init ``WideCNN``s (seeds 0 and 1) on 2,048 digits
upsampled to 32×32, layers ``act1``, ``act2`` (32,768 features), ``act3`` (16,384), ``act4``
(4,096) and ``fc`` (10), a loader of 256-sample batches: 1.31 GiB of float32 activations for the
pair. Each row runs in a fresh Python process (``--root`` first on its path, so an older checkout
can be measured with the same script); the peak is that process's ``ru_maxrss``, the baseline its
``ru_maxrss`` after imports, models and inputs, before ``compute``. Rows:

* exact ``cka`` through ``measure.CKA`` with its default memory budget (1 GiB);
* ``cka_minibatch(batch_size=256)`` through a ``Similarity`` of that measure (``measure.MinibatchCKA``
  where the checkout has it): the same batches as the loader's.

Prints a Markdown table and, per row, the matrix, so two checkouts' values can be compared
(``--save FILE`` writes them as JSON; ``--compare FILE`` adds the largest difference to that file's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, resource, sys, time
root, here, measure_name, n, width, batch, threads = sys.argv[1:8]
sys.path[:0] = [root, here]
import torch
from torch.utils.data import DataLoader, TensorDataset
from bench_measure_models import LAYERS, WideCNN, make_inputs
from extract import SimilarityModel
import measure.similarity as similarity

torch.set_num_threads(int(threads))
inputs = make_inputs(int(n))
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(SimilarityModel(WideCNN(int(width)).eval(), f"model{seed}", list(LAYERS)))
loader = DataLoader(TensorDataset(inputs), batch_size=int(batch), shuffle=False)
if measure_name == "cka":
    sim = similarity.CKA(*models, device="cpu")
else:
    cls = getattr(similarity, "MinibatchCKA", None)
    if cls is None:  # a checkout without the class: the same measure through the base class
        cls = type("MinibatchCKA", (similarity.Similarity,), {"measure": "cka_minibatch"})
    sim = cls(*models, device="cpu", batch_size=int(batch))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
matrix = sim.compute(loader)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "seconds": seconds,
                  "matrix": matrix.tolist()}))
"""


def run_child(root: Path, measure_name: str, n: int, width: int, batch: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(HERE), measure_name, str(n), str(width),
                           str(batch), str(threads)], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{measure_name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose measure/extract run (default: this)")
    parser.add_argument("--n-samples", type=int, default=2048)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="loader batch and minibatch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measures", nargs="+", default=["cka", "cka_minibatch"])
    parser.add_argument("--quick", action="store_true", help="n=512, width 8")
    parser.add_argument("--save", type=Path, help="write the results (matrices included) as JSON")
    parser.add_argument("--compare", type=Path, help="a --save file to compare the matrices with")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.width = 512, 8
    import numpy as np

    other = json.loads(args.compare.read_text()) if args.compare else {}
    results = {}
    print(f"root {args.root.resolve()}, n={args.n_samples}, width {args.width}, batch {args.batch_size}, "
          f"{args.threads} torch threads\n")
    print("| measure | peak MiB | baseline MiB | seconds | max abs diff vs --compare |")
    print("|---|---:|---:|---:|---:|")
    for name in args.measures:
        r = results[name] = run_child(args.root, name, args.n_samples, args.width, args.batch_size, args.threads)
        diff = (f"{np.abs(np.array(r['matrix']) - np.array(other[name]['matrix'])).max():.1e}"
                if name in other else "—")
        print(f"| {name} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} | {r['seconds']:.1f} | {diff} |", flush=True)
        if args.save:
            args.save.write_text(json.dumps(results))
    if args.save:
        args.save.write_text(json.dumps(results))
    for name, r in results.items():
        print(f"\n{name}:\n{np.array(r['matrix']).round(6)}")


if __name__ == "__main__":
    main()
