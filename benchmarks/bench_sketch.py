"""Accuracy and cost of ``cka_sketch`` against exact linear CKA.

Accuracy: |sketch − exact| (median, 95th percentile, maximum) over every distinct pair of layers of a
zoo, for several sketch sizes s and seeds, next to the stated figures (the standard deviation 1/√s
of an unhashed pair at c = 0, and the Chebyshev bound that holds with probability ≥ 0.95), on

- ``demo``: the demo zoo (``data/activations/*.zarr``, made by ``python pipeline.py extract``);
- ``cnn``: 16 random-init CNNs (one seed each) on the same n smooth random images, 4 layers each;
- ``lowrank``: 16 synthetic representations, a shared rank-5 or rank-50 signal plus noise of 6 levels.

Cost: the CNN zoo written as M stores and measured by the engine, exact ``cka`` (Gram route) against
``cka_sketch``, every pair (i ≤ j), no statistics cache, each in its own process (wall time, peak RSS).

    python benchmarks/bench_sketch.py                      # the tables of benchmarks/README.md
    python benchmarks/bench_sketch.py --sizes 4096,65536 --cost 16x512 --threads 2
"""

from __future__ import annotations

import argparse
import glob
import json
import resource
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

from measure.functional.sketch import (  # noqa: E402
    DEFAULT_SKETCH_SIZE,
    DEFAULT_WIDTH,
    _cka_sketch_prepare,
    chebyshev_bound,
    sketch_from_features,
)

MiB = 2**20


# ---------------------------------------------------------------------------------------------- data
def demo_layers() -> list[np.ndarray]:
    from extract.store import open_store

    layers = []
    for path in sorted(glob.glob(str(ROOT / "data" / "activations" / "*.zarr"))):
        store = open_store(path)
        for layer in store.layers:
            array = np.asarray(store.read_layer(layer, 0, store.n_samples), np.float64)
            layers.append(array.reshape(store.n_samples, -1))
    return layers


def cnn_images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.randn(n, 3, 18, 18, generator=g), 3, stride=1)  # 16 × 16, smooth


def cnn_layers(seed: int, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Four layers of a random-init CNN: widths 4096 (hashed at d = 2048), 2048, 512 and 128."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.AdaptiveAvgPool2d(2))
    out, x = {}, images
    with torch.no_grad():
        for k, module in enumerate(net):
            x = module(x)
            if k in (1, 4, 7, 8):
                out[f"layer{len(out)}"] = x.reshape(len(images), -1).numpy().astype(np.float32)
    return out


def lowrank_layers(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    layers = []
    for rank in (5, 50):
        latent = rng.standard_normal((n, rank))
        for k, noise in enumerate((0.1, 0.3, 1.0, 2.0, 4.0, 8.0, 0.5, 1.5)):
            p = (256, 1024, 4096)[k % 3]
            layers.append(latent @ rng.standard_normal((rank, p)) + noise * np.sqrt(rank) * rng.standard_normal((n, p)))
    return layers


# ---------------------------------------------------------------------------------------------- accuracy
def exact_cka(layers: list[np.ndarray]) -> np.ndarray:
    vectors, ranks = [], []
    for x in layers:
        xc = torch.from_numpy(x - x.mean(axis=0))
        k = xc @ xc.T
        ranks.append(float(torch.trace(k) ** 2 / (k * k).sum()))
        vectors.append((k / k.norm()).reshape(-1))
    stacked = torch.stack(vectors)
    return (stacked @ stacked.T).clamp(0, 1).numpy(), ranks


def sketched_cka(layers: list[np.ndarray], s: int, seed: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    prepared = [_cka_sketch_prepare(sketch_from_features(torch.from_numpy(x), s, DEFAULT_WIDTH, seed)) for x in layers]
    left = torch.stack([p.left for p in prepared])
    right = torch.stack([p.right for p in prepared])
    return (left @ right.T).clamp(0, 1).numpy(), (time.perf_counter() - start) / len(layers)


def accuracy(name: str, layers: list[np.ndarray], sizes: list[int], seeds: int) -> list[dict]:
    exact, ranks = exact_cka(layers)
    upper = np.triu_indices(len(layers), 1)
    hashed = any(x.shape[1] > DEFAULT_WIDTH for x in layers)
    rows = []
    for s in sizes:
        errors, seconds = [], []
        for seed in range(seeds):
            sketch, per_layer = sketched_cka(layers, s, seed)
            errors.append(np.abs(sketch - exact)[upper])
            seconds.append(per_layer)
        e = np.concatenate(errors)
        rows.append({"data": name, "layers": len(layers), "n": len(layers[0]), "s": s, "pairs": len(upper[0]),
                     "seeds": seeds, "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
                     "max": float(e.max()), "std_stated": s ** -0.5,
                     "bound95": chebyshev_bound(s, DEFAULT_WIDTH if hashed else None, max(ranks)),
                     "sketch_s_per_layer": float(np.median(seconds)), "exact_median": float(np.median(exact[upper]))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- cost
def write_cnn_zoo(folder: Path, models: int, n: int) -> list[Path]:
    from extract.store import LAYERS_GROUP, StoreInfo, ZarrStore

    images = cnn_images(n)
    paths = []
    for m in range(models):
        path = folder / f"cnn{m}.zarr"
        paths.append(path)
        if path.exists():
            continue
        layers = cnn_layers(m, images)
        store = ZarrStore(path, read_only=False, create=True)
        for name, array in layers.items():
            store.create_array(f"{LAYERS_GROUP}/{name}", array.shape, "float32", 128)
            store.write(f"{LAYERS_GROUP}/{name}", 0, array)
        store.write_info(StoreInfo(model_name=f"cnn{m}", layers=list(layers), n_samples=n, chunk_samples=128,
                                   dtype="float32", samples_done=n, fingerprint=f"sha256:bench-sketch-{n}",
                                   complete=True, inputs_stored=False, input_shape=[3, 16, 16]))
    return paths


def _high_water_mib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_cost(method: str, paths: list[str], threads: int) -> None:
    """One measure run over every pair (i ≤ j) of the stores; prints wall time and peak RSS as JSON."""
    torch.set_num_threads(threads)
    from extract.store import open_store
    from measure.engine import Engine

    stores = [open_store(p) for p in paths]
    pairs = [(i, j) for i in range(len(stores)) for j in range(i, len(stores))]
    options = {"route": "gram"} if method == "cka" else {}
    before = _high_water_mib()  # torch, zarr and the stores opened
    start = time.perf_counter()
    engine = Engine(stores, device="cpu", precision="float64")
    results = engine.run([(method, options)], pairs)
    seconds = time.perf_counter() - start
    values = {f"{r.store_a}|{r.store_b}": r.matrix.tolist() for r in results}
    peak = _high_water_mib()
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "added_rss_mib": peak - before, "values": values}))


def cost(folder: Path, models: int, n: int, threads: int, repeat: int = 2) -> dict:
    paths = [str(p) for p in write_cnn_zoo(folder, models, n)]
    out = {"M": models, "n": n, "layers": 4 * models}
    values = {}
    for method in ("cka", "cka_sketch"):
        runs = []
        for _ in range(repeat):  # the fastest of ``repeat`` runs (other load on a shared machine only slows)
            done = subprocess.run([sys.executable, __file__, "--child", method, "--threads", str(threads), *paths],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        got = min(runs, key=lambda run: run["seconds"])
        out[f"{method}_s"], out[f"{method}_rss_mib"] = got["seconds"], got["peak_rss_mib"]
        out[f"{method}_added_mib"] = got["added_rss_mib"]
        values[method] = np.array([v for k in sorted(got["values"]) for v in np.ravel(got["values"][k])])
    error = np.abs(values["cka_sketch"] - values["cka"])
    out.update(p95=float(np.percentile(error, 95)), max=float(error.max()))
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--cost", default="16x512,64x512,16x2048", help="zoos MxN: M models of n samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each cost measurement (the fastest is kept)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: demo, cnn, lowrank, cost")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_cost(args.child, args.paths, args.threads)
        return
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = set(args.skip.split(","))
    rows = []
    if "demo" not in skip:
        layers = demo_layers()
        if layers:
            rows += accuracy("demo", layers, sizes, args.seeds)
        else:
            print("no demo zoo in data/activations (run python pipeline.py extract); skipped", flush=True)
    if "cnn" not in skip:
        images = cnn_images(args.n)
        rows += accuracy("cnn", [x.astype(np.float64) for m in range(16) for x in cnn_layers(m, images).values()],
                         sizes, args.seeds)
    if "lowrank" not in skip:
        rows += accuracy("lowrank", lowrank_layers(args.n), sizes, args.seeds)
    costs = []
    if "cost" not in skip:
        with tempfile.TemporaryDirectory(prefix="bench-sketch-") as tmp:
            for spec in args.cost.split(","):
                models, n = (int(v) for v in spec.split("x"))
                folder = Path(tmp) / f"n{n}"
                folder.mkdir(exist_ok=True)
                costs.append(cost(folder, models, n, args.threads, args.repeat))
    print("\n| data | layers | n | s | pairs × seeds | median | p95 | max | stated std 1/√s | Chebyshev 95 % bound |"
          " sketch s/layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['data']} | {r['layers']} | {r['n']} | {r['s']:,} | {r['pairs']:,} × {r['seeds']} | "
              f"{r['median']:.4f} | {r['p95']:.4f} | {r['max']:.4f} | {r['std_stated']:.4f} | {r['bound95']:.3f} | "
              f"{r['sketch_s_per_layer']:.3f} |")
    if costs:
        print(f"\n| M | layers | n | exact cka | cka_sketch (s = {DEFAULT_SKETCH_SIZE:,}) | exact peak RSS (added) | "
              "sketch peak RSS (added) | p95 / max error |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in costs:
            print(f"| {c['M']} | {c['layers']} | {c['n']} | {c['cka_s']:.1f} s | {c['cka_sketch_s']:.1f} s | "
                  f"{c['cka_rss_mib']:.0f} MiB ({c['cka_added_mib']:.0f}) | "
                  f"{c['cka_sketch_rss_mib']:.0f} MiB ({c['cka_sketch_added_mib']:.0f}) | "
                  f"{c['p95']:.4f} / {c['max']:.4f} |")


if __name__ == "__main__":
    main()
