"""Zoo tiles: all-pairs measures within a memory budget too small for every prepared layer at once."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from measure import MEASURES
from measure.engine import Engine
from measure.engine.cache import StatisticsCache
from measure.engine.tiles import Row, plan_budget, tiled_pair_matrices
from measure.errors import MeasureError
from tests._stores import write_store

ROOT = Path(__file__).parents[2]
N = 40
WIDTHS = {"conv": 6, "wide": 56, "fc": 12}  # "wide" has more features than samples
STORES = 5


def _zoo(root: Path) -> list:
    """Five stores of three float64 layers each and the inputs (dCKA's confounder); well-conditioned, so
    that the CCA family is stable."""
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((N, 8))
    stores = []
    for m in range(STORES):
        layers = {name: rng.standard_normal((N, p)) for name, p in WIDTHS.items()}
        stores.append(write_store(root / f"m{m}.zarr", f"m{m}", layers, inputs, chunk=16))
    return stores


def _run(stores, measures, budget, cache, messages=None):
    engine = Engine(stores, device="cpu", precision="float64", memory_budget=budget, cache=cache,
                    progress=(messages.append if messages is not None else None))
    pairs = [(i, j) for i in range(len(stores)) for j in range(len(stores))]
    return {(r.measure, r.store_a, r.store_b): r.matrix for r in engine.run(measures, pairs)}


# The products of a tile are smaller matrix products than the untiled ones (the bilinear measures' all-pairs
# product, the norms Procrustes takes from stacked layers), so BLAS may sum each n²-term dot product of unit
# vectors in another order: |error| ≤ n² · 2⁻⁵³ ≈ 2e-13 at n = 40, asserted as 1e-12.
BILINEAR = [("cka", {"route": "gram"}), ("cka_debiased", {"route": "gram"}), ("cka_rbf", {}), ("dcka", {}),
            ("cka_minibatch", {"batch_size": 10}), ("cka_sketch", {"sketch_size": 256})]
OTHER = [(m, {}) for m in MEASURES if m not in {name for name, _ in BILINEAR}]


@pytest.fixture(scope="module")
def untiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    stores = _zoo(root)
    cache = StatisticsCache(root / "cache.zarr")
    return root, stores, cache, _run(stores, BILINEAR + OTHER, 2**30, cache)


def _tile_budget(n: int, size: int) -> int:
    """The transient memory of one Gram being prepared (four n × n float64) plus two blocks of ``size``
    times as much: blocks of 4·size to 8·size prepared layers of n² to 2n² floats (the zoo has 15)."""
    return 4 * 8 * n * n * (1 + 2 * size)


@pytest.mark.parametrize("size", [1, 2])
def test_tiled_values_equal_untiled_values(untiled, size):
    root, stores, cache, expected = untiled
    messages: list[str] = []
    got = _run(stores, BILINEAR + OTHER, _tile_budget(N, size), cache, messages)
    assert sum(m.startswith("tile rows") for m in messages) >= 3  # the zoo was really taken in tiles
    assert got.keys() == expected.keys()
    for key, matrix in expected.items():  # the same Grams (from the cache); only the products' shapes differ
        np.testing.assert_allclose(got[key], matrix, rtol=0, atol=1e-12, err_msg=str(key))


def test_tiled_values_match_a_float64_numpy_cka(untiled):
    """Linear CKA of two layers from the tiled run against the formula on the raw activations."""
    root, stores, cache, _ = untiled
    got = _run(stores, [("cka", {"route": "gram"})], _tile_budget(N, 1), cache)

    def centred_gram(x):
        k = x @ x.T
        h = np.eye(len(x)) - 1.0 / len(x)
        return h @ k @ h

    for a, b in [(0, 4), (3, 1)]:
        for la, lb in [("wide", "fc"), ("conv", "wide")]:
            k = centred_gram(stores[a].read_layer(la).astype(np.float64))
            m = centred_gram(stores[b].read_layer(lb).astype(np.float64))
            cka = np.sum(k * m) / np.sqrt(np.sum(k * k) * np.sum(m * m))
            value = got["cka", f"m{a}", f"m{b}"][list(WIDTHS).index(la), list(WIDTHS).index(lb)]
            assert value == pytest.approx(cka, rel=1e-12)


def test_a_budget_too_small_for_one_tile_names_the_smallest_that_works(tmp_path):
    stores = _zoo(tmp_path)
    with pytest.raises(MeasureError, match=r"--memory-budget .* too small for one tile.*Use --memory-budget 0.01 or"):
        _run(stores, [("cka", {"route": "gram"})], 4 * 8 * N * N + 8 * N * N, None)
    with pytest.raises(MeasureError) as error:
        plan_budget(row_bytes=3 * 2**30, transient=2**30, memory_budget=2**30)
    smallest = float(error.value.args[0].split("Use --memory-budget ")[1].split()[0])
    assert smallest == 7.0  # 2 rows of 3 GiB + 1 GiB transient
    assert plan_budget(row_bytes=3 * 2**30, transient=2**30, memory_budget=int(smallest * 2**30)) == 3 * 2**30


def test_without_a_cache_the_statistics_go_to_a_temporary_folder_removed_afterwards(tmp_path, monkeypatch):
    stores = _zoo(tmp_path / "stores")
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    engine = Engine(stores, device="cpu", precision="float64", memory_budget=_tile_budget(N, 1))
    engine.run([("cka", {"route": "gram"})], [(0, 1), (2, 3)])
    assert [p.name for p in spill.iterdir()] == [p.name for p in spill.glob("simtorch-statistics-*")] != []
    del engine
    import gc

    gc.collect()
    assert list(spill.iterdir()) == []


def test_each_row_is_prepared_at_most_once_per_row_block():
    """T row blocks: row r of block k is prepared 1 + k times; every wanted pair is filled in."""
    layer_counts = [3, 2, 4, 1, 3]
    rows = [Row(s, k) for s, count in enumerate(layer_counts) for k in range(count)]
    vectors = {row: torch.tensor([float(row.s), float(row.k), 1.0], dtype=torch.float64) for row in rows}
    prepared: dict[Row, int] = {}

    def prepare(row):
        from measure.functional._bilinear import Prepared

        prepared[row] = prepared.get(row, 0) + 1
        v = vectors[row].clone()
        return Prepared(left=v, right=v)

    def pair_matrix(a, b):
        return torch.stack([torch.stack([x.left @ y.right for y in b]) for x in a])

    pairs = [(i, j) for i in range(5) for j in range(5) if i != 2]
    three_rows = 3 * 3 * 8  # three rows of 3 float64
    out = tiled_pair_matrices(rows, prepare, pair_matrix, pairs, layer_counts, block_bytes=three_rows)
    for i, j in pairs:
        expected = np.array([[vectors[Row(i, k)] @ vectors[Row(j, m)] for m in range(layer_counts[j])]
                             for k in range(layer_counts[i])])
        np.testing.assert_array_equal(out[i, j], expected)
    blocks = [rows[b:b + 3] for b in range(0, len(rows), 3)]
    for k, block in enumerate(blocks):
        for row in block:
            assert prepared[row] == 1 + k, row
    assert max(prepared.values()) == len(blocks)


CHILD = r"""
import json, resource, sys
import torch
from measure.engine import Engine
from extract.store import ZarrStore
torch.set_num_threads(1)
paths, budget = json.loads(sys.argv[1]), int(sys.argv[2])
stores = [ZarrStore(p) for p in paths]


def peak():  # this process's peak RSS: VmHWM (ru_maxrss keeps the pytest parent's peak across fork and exec)
    try:
        return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


before = peak()
engine = Engine(stores, device="cpu", precision="float64", memory_budget=budget)
pairs = [(i, j) for i in range(len(stores)) for j in range(i, len(stores))]
results = engine.run([("cka", {"route": "gram"})], pairs)
print(json.dumps({"before": before, "peak": peak(), "results": len(results)}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_zoo_stays_within_the_budget(tmp_path):
    """16 stores × 4 layers at n = 512: 64 Grams of 2 MiB (128 MiB) measured within a 24 MiB budget."""
    n, rng, paths = 512, np.random.default_rng(3), []
    for m in range(16):
        layers = {f"l{k}": rng.standard_normal((n, 32)).astype(np.float32) for k in range(4)}
        write_store(tmp_path / f"m{m}.zarr", f"m{m}", layers, chunk=128)
        paths.append(str(tmp_path / f"m{m}.zarr"))
    budget = 24 * 2**20
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), str(budget)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["results"] == 16 * 17 // 2
    grams = 16 * 4 * 8 * n * n
    growth = report["peak"] - report["before"]
    # the budget plus 48 MiB for the Zarr reads, the cache writer's and the allocator's buffers (28 MiB
    # measured on the 2-core CPU machine), far below the Grams that an untiled run holds
    assert growth < budget + 48 * 2**20 < grams, (growth / 2**20, report)
