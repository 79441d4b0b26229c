"""Layer-correspondence check of Kornblith et al. (ICML 2019, Table 2) on the demo zoo.

    .venv/bin/python benchmarks/layer_correspondence.py            # every measure, all demo seeds
    .venv/bin/python benchmarks/layer_correspondence.py --measures cka cca --device cuda

For networks of one architecture trained from different seeds, the layer of
net B most similar to layer i of net A should be layer i. For each measure
and each ordered pair of seeds (A, B), A ≠ B, every layer of A is matched to
its most similar layer of B (the largest similarity, the smallest distance;
for the asymmetric measures the row layer is A's: PWCCA weights from A, linear
regression predicts A from B); the accuracy is the share of layers matched to
their own counterpart, over all ordered pairs. The paper's protocol is the
same with 10 seeds of a 10-layer CNN on CIFAR-10; we have the demo zoo's
same-architecture seeds (``cnn_seed*.zarr``: 6 layers, block1..block4, fc1, fc2,
of 1024, 512, 512, 256, 64 and 10 features, over 540 held-out digits). Run
``python pipeline.py extract`` first if the stores are missing.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.store import StoreError, ZarrStore  # noqa: E402
from measure.engine import Engine  # noqa: E402
from measure.registry import get_measure  # noqa: E402

# (label, registry name, options, Kornblith et al. 2019 Table 2 accuracy in % or None)
ROWS = [
    ("CCA (mean rho)", "cca", {"output": "rho"}, 1.4),
    ("CCA (R2_CCA)", "cca", {"output": "r2"}, 10.6),
    ("SVCCA (mean rho)", "svcca", {"output": "rho"}, 9.9),
    ("SVCCA (R2_CCA)", "svcca", {"output": "r2"}, 15.1),
    ("PWCCA", "pwcca", {}, 11.1),
    ("Linear regression", "linreg", {}, 45.4),
    ("CKA (linear)", "cka", {}, 99.3),
    ("CKA (RBF, t=0.4)", "cka_rbf", {"threshold": 0.4}, 99.1),
    ("CKA (linear, debiased)", "cka_debiased", {}, None),
    ("Deconfounded CKA", "dcka", {}, None),
    ("Procrustes", "procrustes", {}, None),
    ("Procrustes (angular dist.)", "procrustes_angular", {}, None),
    ("RSA (1-corr, Spearman)", "rsa", {}, None),
    ("Mutual k-NN (k=10)", "mutual_knn", {"k": 10}, None),
]


TIE = 1e-9  # values this close to the best count as ties (saturated CCA rows are all 1 up to round-off)


def correspondence_hits(matrices: dict[tuple[str, str], np.ndarray], distance: bool) -> np.ndarray:
    """For each layer i, over the ordered pairs (A, B): how often B's best match for A's layer i is layer i.

    When several layers of B tie for the best value, a tie that includes layer i counts 1/(number tied).
    """
    hits = None
    for matrix in matrices.values():
        values = -matrix if distance else matrix
        values = np.where(np.isnan(values), -np.inf, values)
        best = values.max(axis=1, keepdims=True)
        tied = values >= best - TIE
        found = np.diag(tied) / tied.sum(axis=1)
        hits = found if hits is None else hits + found
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="data/activations/cnn_seed*.zarr", help="glob of same-architecture stores")
    parser.add_argument("--measures", nargs="+", default=None, help="registry names (default: every row)")
    parser.add_argument("--device", default=None, help="cpu, cuda... (default: cuda if available)")
    args = parser.parse_args(argv)
    paths = sorted(glob.glob(args.stores))
    if len(paths) < 2:
        print(f"error: need at least two stores matching {args.stores}; run `python pipeline.py extract` first.",
              file=sys.stderr)
        return 2
    try:
        stores = [ZarrStore(p) for p in paths]
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = stores[0].layers
    if any(s.layers != layers for s in stores):
        print("error: the stores must hold the same layers (same architecture).", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if args.measures is None or r[1] in args.measures]
    engine = Engine(stores, device=args.device)
    pairs = [p for p in itertools.permutations(range(len(stores)), 2)]
    print(f"{len(stores)} stores ({', '.join(s.name for s in stores)}), {stores[0].n_samples} samples, "
          f"layers {layers}; {len(pairs)} ordered pairs; device {engine.device}\n")
    header = (f"{'measure':28s} {'ours':>7s} {'paper':>7s}   hits per layer (of {len(pairs)}): "
              f"{' '.join(f'{layer[:6]:>6s}' for layer in layers)}   time")
    print(header)
    print("-" * len(header))
    for label, name, options, paper in rows:
        spec = get_measure(name)
        start = time.perf_counter()
        # a symmetric measure's (B, A) matrix is the transpose of its (A, B) matrix: compute each once
        todo = [p for p in pairs if not spec.symmetric or p[0] < p[1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CCA on block1 (1024 features > 540 samples) warns by design
            results = engine.run([(name, options)], todo)
        matrices = {(r.store_a, r.store_b): r.matrix for r in results}
        if spec.symmetric:
            matrices.update({(b, a): m.T for (a, b), m in list(matrices.items())})
        hits = correspondence_hits(matrices, spec.kind == "distance")
        accuracy = hits.sum() / (len(pairs) * len(layers))
        paper_text = f"{paper:6.1f}%" if paper is not None else "      –"
        per_layer = " ".join(f"{h:6.2g}" for h in hits)
        print(f"{label:28s} {100 * accuracy:6.1f}% {paper_text}   {' ' * 24}{per_layer}   "
              f"{time.perf_counter() - start:5.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
