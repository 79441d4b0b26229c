"""Benchmark: the feature route (samples outnumber features) of ``measure``, swept over n, against a plain script.

    .venv/bin/python benchmarks/bench_features.py                      # n = 2k ... 64k, 2 rounds
    .venv/bin/python benchmarks/bench_features.py --sizes 2048 16384   # some sizes only
    .venv/bin/python benchmarks/bench_features.py --quick              # n = 1024, 2048, one round

Two stores of 3 layers (1,024, 1,024 and 64 float32 features: ReLU projections of a shared 64-dimensional
latent, so CKA is far from 0 and 1), written once under ``.bench/features/`` (git-ignored) and reused.
Per n, each the fastest of ``--rounds`` runs, each run a fresh process (imports included):

* ``measure`` through the CLI: ``pipeline.py measure A B --measures cka --no-cache --no-plots --no-report``,
  with the default precision (``auto``: float32 products for these float32 stores) and ``--precision float64``;
* the plain script: opens both stores with zarr, shifts each layer by its first block's mean, and forms only
  the products the three pairs (A, A), (A, B), (B, B) need — per store the whole (P × P) product of its
  concatenated layers, and A's against B's — in float32 over sample blocks of 2,048, summed in float64;
  then biased linear CKA of every layer pair. It is the floor a hand-written script reaches.

GEMM fraction: the plain script's product flops (3 · 2nP², P = 2,112) over the wall time, against
``torch.matmul`` of one (2,048 × P)ᵀ(2,048 × P) float32 block product measured in the same run. Every value
is compared with the float64 CLI result (max abs diff over the 3 pairs × 9 layer pairs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
WIDTHS = {"wide1": 1024, "wide2": 1024, "narrow": 64}
CHUNK = 512
SIZES = [2048, 4096, 8192, 16384, 32768, 65536]

PLAIN = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch, zarr
stores, block = sys.argv[1:3], 2048
layers = ["wide1", "wide2", "narrow"]
opened = [zarr.open_group(s, mode="r") for s in stores]
n = opened[0]["layers/wide1"].shape[0]
shifts = [[torch.from_numpy(g[f"layers/{l}"][:block]).mean(0) for l in layers] for g in opened]
P = sum(opened[0][f"layers/{l}"].shape[1] for l in layers)
own = [torch.zeros(P, P, dtype=torch.float64) for _ in stores]
cross = torch.zeros(P, P, dtype=torch.float64)
sums = [torch.zeros(P, dtype=torch.float64) for _ in stores]
for a in range(0, n, block):
    z = [torch.cat([torch.from_numpy(g[f"layers/{l}"][a:a + block]) - c for l, c in zip(layers, cs)], 1)
         for g, cs in zip(opened, shifts)]
    for k in range(2):
        own[k] += (z[k].T @ z[k]).double()
        sums[k] += z[k].sum(0, dtype=torch.float64)
    cross += (z[0].T @ z[1]).double()
edges = np.cumsum([0] + [opened[0][f"layers/{l}"].shape[1] for l in layers])
def cka(c, sx, sy, gx, gy):
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            ri, rj = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            def hsic(m, s, t):
                m = m - torch.outer(s, t) / n
                return float((m * m).sum())
            own_x, own_y = hsic(gx[ri, ri], sx[ri], sx[ri]), hsic(gy[rj, rj], sy[rj], sy[rj])
            out[i, j] = hsic(c[ri, rj], sx[ri], sy[rj]) / np.sqrt(own_x * own_y)
    return out.tolist()
result = {"AA": cka(own[0], sums[0], sums[0], own[0], own[0]), "AB": cka(cross, sums[0], sums[1], own[0], own[1]),
          "BB": cka(own[1], sums[1], sums[1], own[1], own[1]), "seconds": time.perf_counter() - t0}
print(json.dumps(result))
"""


def write_stores(n: int, folder: Path) -> list[Path]:
    """Two float32 stores of ``WIDTHS`` layers over n samples (reused when present)."""
    import torch

    from extract.store import LAYERS_GROUP, StoreInfo, ZarrStore

    paths = [folder / f"n{n}" / f"{name}.zarr" for name in ("A", "B")]
    if all((p / "zarr.json").exists() and ZarrStore(p).info.complete for p in paths):
        return paths
    g = torch.Generator().manual_seed(n)
    latent = torch.randn(n, 64, generator=g)
    for model, path in enumerate(paths):
        store = ZarrStore(path, read_only=False, create=True)
        for layer, width in WIDTHS.items():
            mix = torch.randn(64, width, generator=g) / 8
            noise = 0.5 * (model + 1) * torch.randn(n, width, generator=g)
            array = torch.relu(latent @ mix + 0.3 * noise).numpy()
            store.create_array(f"{LAYERS_GROUP}/{layer}", array.shape, "float32", CHUNK)
            store.write(f"{LAYERS_GROUP}/{layer}", 0, array)
        store.write_info(StoreInfo(model_name=path.stem, layers=list(WIDTHS), n_samples=n, chunk_samples=CHUNK,
                                   dtype="float32", samples_done=n, fingerprint=f"sha256:bench-features-{n}",
                                   complete=True, inputs_stored=False, input_shape=[]))
    return paths


def run_ours(paths: list[Path], precision: str, threads: int) -> tuple[float, dict[str, np.ndarray]]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "measure", *map(str, paths), "--measures", "cka",
                        "--no-cache", "--no-plots", "--no-report", "--quiet", "--precision", precision,
                        "--out", out], check=True, env=_env(threads), stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        values = {}
        for pair, (a, b) in {"AA": "AA", "AB": "AB", "BB": "BB"}.items():
            with open(Path(out) / "cka" / f"{a}__{b}.csv") as f:
                rows = list(csv.reader(f))[1:]
            values[pair] = np.array([[float(v) for v in row[1:]] for row in rows])
    return seconds, values


def run_plain(paths: list[Path], threads: int) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PLAIN, *map(str, paths)], check=True, capture_output=True,
                          text=True, env=_env(threads))
    seconds = time.perf_counter() - start
    out = json.loads(done.stdout)
    return seconds, {pair: np.array(out[pair]) for pair in ("AA", "AB", "BB")}


def matmul_rate(p: int, threads: int) -> float:
    """GFLOP/s of one (2048 × p)ᵀ(2048 × p) float32 product, best of 5."""
    import torch

    torch.set_num_threads(threads)
    z = torch.rand(2048, p)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        z.T @ z
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * p * p / best / 1e9


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="n = 1024 and 2048, one round")
    parser.add_argument("--folder", type=Path, default=ROOT / ".bench" / "features")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [1024, 2048], 1
    p = sum(WIDTHS.values())
    rate = matmul_rate(p, args.threads)
    print(f"torch threads {args.threads}; float32 matmul (2048 × {p})ᵀ(2048 × {p}): {rate:.0f} GFLOP/s; "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| n | ours auto s | ours float64 s | plain script s | auto / plain | float64 / plain "
          "| plain GFLOP/s (of matmul) | ours auto GFLOP/s (of matmul) | max abs diff auto / plain vs float64 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.sizes:
        paths = write_stores(n, args.folder)
        auto = min((run_ours(paths, "auto", args.threads) for _ in range(args.rounds)), key=lambda r: r[0])
        f64 = min((run_ours(paths, "float64", args.threads) for _ in range(args.rounds)), key=lambda r: r[0])
        plain = min((run_plain(paths, args.threads) for _ in range(args.rounds)), key=lambda r: r[0])
        flops = 3 * 2 * n * p * p / 1e9
        diff = [max(float(np.abs(r[1][k] - f64[1][k]).max()) for k in f64[1]) for r in (auto, plain)]
        print(f"| {n:,} | {auto[0]:.2f} | {f64[0]:.2f} | {plain[0]:.2f} | {auto[0] / plain[0]:.2f}× "
              f"| {f64[0] / plain[0]:.2f}× | {flops / plain[0]:.0f} ({flops / plain[0] / rate:.0%}) "
              f"| {flops / auto[0]:.0f} ({flops / auto[0] / rate:.0%}) | {diff[0]:.1e} / {diff[1]:.1e} |", flush=True)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
