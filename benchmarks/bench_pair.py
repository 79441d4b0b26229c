"""Benchmark: one pair of in-memory float32 representations, ``measure.compare`` against cka-pytorch and torch-cka.

    .venv/bin/python benchmarks/bench_pair.py                # n=2048, 16,384 float32 features, 2 rounds
    .venv/bin/python benchmarks/bench_pair.py --quick        # n=256, 2,048 features
    .venv/bin/python benchmarks/bench_pair.py --no-peers     # ours only (no PyPI needed)

The peers are installed by the bench, not by the project: ``pip install --target .bench/pair-peers --no-deps
cka-pytorch torch-cka`` (both need only torch, tqdm and matplotlib, which the project's venv has) and run in a
subprocess with that folder on ``PYTHONPATH`` (cka-pytorch's kernel files are loaded directly: its package
``__init__`` imports lightning for its model hooks, which the kernels do not use), so the project's venv is
not changed. netrep is not on PyPI and is not run (the output says so).

Rows, each the fastest of ``--rounds`` on the same tensors (x, y: n × p float32, ReLU features of a shared
64-dimensional latent, so CKA is far from 0 and 1):

* ours: ``measure.compare(x, y, "cka")`` and ``"cka_debiased"`` with the default precision (``auto``:
  the compensated float32 Gram scheme on float32 input), with ``precision="float64"``, and with
  ``--feature-route`` the feature route (``route="features"``, one round) for comparison;
* cka-pytorch (``cka_pytorch.utils.gram`` + ``cka_pytorch.hsic.hsic1``, its unbiased HSIC, in the input's
  float32) and torch-cka (``X Xᵀ`` with zeroed diagonal + ``torch_cka.CKA._HSIC``, as its ``compare`` does):
  both compute the debiased CKA, so they are compared with ``"cka_debiased"``.

Every value is printed with its difference from our float64 result; ours (auto) must be within 1e-6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
PEERS = ROOT / ".bench" / "pair-peers"
PEER_PACKAGES = ["cka-pytorch", "torch-cka"]

PEER_CODE = r"""
import json, sys, time, types
from importlib.metadata import version
import torch
torch.set_num_threads(int(sys.argv[3]))
import importlib.util, pathlib

def _file_module(name, path):  # cka_pytorch/__init__ pulls in lightning for its model hooks; its kernels need torch
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

root = pathlib.Path(sys.argv[4]) / "cka_pytorch"
hsic1 = _file_module("cka_pytorch_hsic", root / "hsic.py").hsic1
gram = _file_module("cka_pytorch_utils", root / "utils.py").gram
from torch_cka.cka import CKA as TorchCKA
x, y = torch.load(sys.argv[1])
rounds = int(sys.argv[2])

def cka_pytorch_value():
    k, l = gram(x)[None], gram(y)[None]
    return float(hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l)))

def torch_cka_value():
    this = types.SimpleNamespace(device=x.device)
    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    return TorchCKA._HSIC(this, k, l) / (TorchCKA._HSIC(this, k, k) * TorchCKA._HSIC(this, l, l)) ** 0.5

out = {}
for name, fn in (("cka-pytorch", cka_pytorch_value), ("torch-cka", torch_cka_value)):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter(); value = fn(); best = min(best, time.perf_counter() - t)
    out[name] = {"seconds": best, "value": value, "version": version(name)}
print(json.dumps(out))
"""


def make_pair(n: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 (n, p) ReLU representations of one 64-dimensional latent, plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    x = (z @ torch.randn(64, p, generator=g) + torch.randn(n, p, generator=g)).relu_()
    y = (z @ torch.randn(64, p, generator=g) + 2 * torch.randn(n, p, generator=g)).relu_()
    return x, y


def ensure_peers(log=print) -> bool:
    """Install cka-pytorch and torch-cka into ``.bench/pair-peers`` (once); False when pip cannot."""
    if (PEERS / "cka_pytorch").is_dir() and (PEERS / "torch_cka").is_dir():
        return True
    log(f"installing {', '.join(PEER_PACKAGES)} into {PEERS} (one time)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PEERS), "--no-deps",
                           *PEER_PACKAGES], capture_output=True, text=True)
    if done.returncode:
        log(f"peers not installed (no network to PyPI?): {done.stderr.strip()[-500:]}")
        return False
    return True


def best_of(rounds: int, fn) -> tuple[float, float]:
    """(fastest wall seconds, value) over ``rounds`` calls."""
    best, value = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=2048)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n=256, 2,048 features")
    parser.add_argument("--no-peers", action="store_true", help="ours only")
    parser.add_argument("--feature-route", action="store_true",
                        help="also time route='features' (one round: slow when n < p)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.features = 256, 2048
    from measure import compare

    threads = torch.get_num_threads()
    print(f"n={args.n_samples}, p={args.features} float32, torch {torch.__version__}, {threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}, fastest of {args.rounds}", flush=True)
    x, y = make_pair(args.n_samples, args.features)
    rows = []
    reference = {name: compare(x, y, name, precision="float64") for name in ("cka", "cka_debiased")}
    for name in ("cka", "cka_debiased"):
        for label, kw in (("auto (default)", {}), ("float64", {"precision": "float64"}),
                          ("feature route", {"route": "features"})):
            if "route" in kw and not args.feature_route:
                continue
            rounds = 1 if "route" in kw else args.rounds  # p² n flops: far slower than the Gram route when n < p
            seconds, value = best_of(rounds, lambda kw=kw, name=name: compare(x, y, name, **kw))
            rows.append((f"ours `compare(x, y, {name!r})` {label}", name, seconds, value, ""))
    peers: dict = {}
    if args.no_peers:
        print("peers: skipped (--no-peers)")
    elif ensure_peers():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save((x, y), Path(tmp) / "xy.pt")
            env = dict(os.environ, PYTHONPATH=str(PEERS))
            done = subprocess.run([sys.executable, "-c", PEER_CODE, str(Path(tmp) / "xy.pt"), str(args.rounds),
                                   str(threads), str(PEERS)], capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"peers failed: {done.stderr.strip()[-1000:]}")
        else:
            peers = json.loads(done.stdout.strip().splitlines()[-1])
            for peer, r in peers.items():
                rows.append((f"{peer} {r['version']} (unbiased HSIC, float32)", "cka_debiased", r["seconds"],
                             r["value"], ""))
    print("netrep: not run (not on PyPI)")
    fastest_peer = min((r["seconds"] for r in peers.values()), default=None)
    print("| what | s | value | value − ours float64 | peer fastest / this |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for what, name, seconds, value, _ in rows:
        gap = value - reference[name]
        if what.startswith("ours") and "float64" not in what:
            worst = max(worst, abs(gap))
        ratio = f"{fastest_peer / seconds:.2f}×" if fastest_peer and name == "cka_debiased" else "—"
        print(f"| {what} | {seconds:.3f} | {value:.9f} | {gap:.1e} | {ratio} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if worst > 1e-6:
        print(f"error: ours differs from float64 by {worst:.1e} (> 1e-6)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
