"""Synthetic zoo results (no stores): ``PairResult`` lists shaped like a ``measure`` run's, for report tests."""

from __future__ import annotations

import numpy as np

from measure import MEASURES
from measure.engine.results import PairResult

ZOO_MEASURES = ("cka", "procrustes_euclidean", "linreg", "rsa")


def zoo_results(n_models: int, n_layers: int = 4, measures=ZOO_MEASURES, *, families: int = 4,
                seed: int = 0) -> tuple[list[str], list[PairResult], dict[str, dict]]:
    """Stores ``m0 … m<n-1>`` in ``families`` groups, every measure on every pair a run would compute.

    Symmetric measures get one result per unordered pair (self pairs included), asymmetric ones one per
    ordered pair. Values: 1 on a model's own layer diagonal, higher within a family than across, and for
    an asymmetric measure lower below the diagonal of stores than above.

    Returns
    -------
    names, results, stores
        The store names, the results, and per store the metadata ``write_report`` takes.
    """
    rng = np.random.default_rng(seed)
    names = [f"m{k}" for k in range(n_models)]
    layers = [f"layer{i}" for i in range(n_layers)]
    family = [k % families for k in range(n_models)]
    decay = np.exp(-np.abs(np.subtract.outer(range(n_layers), range(n_layers))))
    results = []
    for measure in measures:
        spec = MEASURES[measure]
        for a in range(n_models):
            for b in range(a if spec.symmetric else 0, n_models):
                level = 1.0 if a == b else 0.8 if family[a] == family[b] else 0.45
                if not spec.symmetric and a > b:
                    level *= 0.8  # an asymmetric measure: S(A, B) differs from S(B, A)ᵀ
                s = level * decay
                if a != b:
                    s = np.clip(s + 0.05 * rng.random(s.shape), 0.0, 1.0)
                if a == b and spec.symmetric:
                    s = (s + s.T) / 2
                matrix = np.sqrt(np.maximum(2 - 2 * s, 0.0)) if spec.kind == "distance" else s
                results.append(PairResult(measure, {}, names[a], names[b], list(layers), list(layers), matrix, spec))
    stores = {name: {"path": f"/zoo/{name}.zarr", "n_samples": 1024, "fingerprint": "sha256:" + "0" * 64,
                     "weights_digest": "0" * 16, "layers": list(layers)} for name in names}
    return names, results, stores
