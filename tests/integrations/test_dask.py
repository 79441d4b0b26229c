"""dask: per-layer Grams as tasks on a threaded scheduler and on a real LocalCluster of worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from extract.runner import extract
from extract.store import ZarrStore
from measure.engine import Engine
from measure.engine.cache import StatisticsCache
from measure.engine.dask_tasks import compute_grams, dask_client

N = 48


def make_zoo(folder: Path, seeds: list[int]) -> list[Path]:
    """Small MLP stores of the same 48 random inputs (two captured layers each)."""
    data = torch.from_numpy(np.random.default_rng(0).standard_normal((N, 12)).astype(np.float32))
    paths = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
        result = extract(model, data, folder / f"m{seed}.zarr", name=f"m{seed}", layers=["0", "2"],
                         batch_size=16, progress=False, chunk_bytes=16 * 12 * 4, device="cpu")
        paths.append(Path(result.path))
    return paths

distributed = pytest.importorskip("distributed")


@contextmanager
def one_thread() -> Iterator[None]:
    """torch (and through it MKL and oneDNN) on one thread inside, in every thread; the count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

MEASURES = [("cka", {}), ("cka_debiased", {}), ("dcka", {})]


def _matrices(engine: Engine) -> dict:
    n = len(engine.stores)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    return {(r.measure, r.store_a, r.store_b): r.matrix for r in engine.run(MEASURES, pairs)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    paths = make_zoo(folder, [0, 1, 2])
    local = _matrices(Engine([ZarrStore(p) for p in paths], device="cpu"))
    return paths, local


def _assert_same(got: dict, want: dict) -> None:
    # tolerance: dask's Gram tasks may run with another BLAS thread count, so float64 sums in another order;
    # a float64 CKA of 48 samples × ≤ 24 features then moves by about 2·(24 + 2)·2⁻⁵³·√48 ≈ 4e-14 (linear_gram)
    assert got.keys() == want.keys()
    for key, matrix in want.items():
        np.testing.assert_allclose(got[key], matrix, rtol=0, atol=1e-12, err_msg=str(key))


def test_threaded_scheduler_equals_local(zoo):
    paths, local = zoo
    engine = Engine([ZarrStore(p) for p in paths], device="cpu")
    assert compute_grams(engine, MEASURES, scheduler="threads") == 3 * 2
    assert engine.statistics_computed == 6
    _assert_same(_matrices(engine), local)
    assert engine.statistics_computed == 6  # the pairs used the task results, computed nothing more



def test_threaded_scheduler_passes_the_precision_and_its_cache_key(zoo, tmp_path):
    """float32 Gram tasks equal the engine's own float32 Grams and land in the cache under the float32 key."""
    from measure.engine.cache import StatisticsCache

    paths, _ = zoo
    cache = StatisticsCache(tmp_path / "cache.zarr")
    engine = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float32", cache=cache)
    with one_thread():  # equal by construction: the same kernel on the same rows, one BLAS thread on both sides
        assert compute_grams(engine, MEASURES, scheduler="threads") == 6
        own = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float32")
        own_grams = {(s, layer): own.gram(s, layer) for s, layers in enumerate(own.layers) for layer in layers}
    for s, layers in enumerate(engine.layers):
        for layer in layers:
            assert torch.equal(engine.gram(s, layer), own_grams[s, layer])
            assert cache.get(engine.stores[s], layer, "gram", {"precision": "float32"}) is not None
            assert cache.get(engine.stores[s], layer, "gram") is None  # not filed as a float64 Gram

def test_threaded_scheduler_applies_the_measure_time_reduction(tmp_path):
    """``Engine(reduce="gap")``: the Gram tasks reduce each map as the engine does, not read it flattened."""
    from _stores import write_store

    rng = np.random.default_rng(7)
    maps = [{"conv": rng.standard_normal((N, 3, 4, 4)).astype(np.float32)} for _ in range(2)]
    paths = [write_store(tmp_path / f"r{k}.zarr", f"r{k}", maps[k], chunk=16).path for k in range(2)]
    with one_thread():  # equal by construction: the same kernel on the same reduced rows, one BLAS thread
        engine = Engine([ZarrStore(p) for p in paths], device="cpu", reduce="gap", precision="float64")
        assert compute_grams(engine, [("cka", {"route": "gram"})], scheduler="threads") == 2
        own = Engine([ZarrStore(p) for p in paths], device="cpu", reduce="gap", precision="float64")
        for s in range(2):
            assert torch.equal(engine.gram(s, "conv"), own.gram(s, "conv"))


@pytest.mark.slow
def test_local_cluster_of_two_processes_equals_local(zoo, tmp_path):
    paths, local = zoo
    with dask_client(workers=2) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert len({w["id"] for w in workers.values()}) == 2
        cache = StatisticsCache(tmp_path / "c.zarr")
        engine = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache)
        assert compute_grams(engine, MEASURES, client=client) == 6
        # the tasks really ran in the worker processes
        import os

        pids = set(client.run(os.getpid).values())
        assert os.getpid() not in pids and len(pids) == 2
        _assert_same(_matrices(engine), local)
        assert cache.writes == 6 + 1  # six Grams and the confounder Gram of dcka
        # a second engine gets everything from the cache, submitting no task
        again = Engine([ZarrStore(p) for p in paths], device="cpu", cache=StatisticsCache(tmp_path / "c.zarr"))
        assert compute_grams(again, MEASURES, client=client) == 0
        _assert_same(_matrices(again), local)


@pytest.mark.slow
def test_existing_cluster_by_address_and_cli(zoo, tmp_path, capsys):
    from distributed import LocalCluster

    from pipeline import main

    paths, local = zoo
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with dask_client(scheduler=cluster.scheduler_address) as client:
            engine = Engine([ZarrStore(p) for p in paths], device="cpu")
            compute_grams(engine, MEASURES, client=client)
            _assert_same(_matrices(engine), local)
        out = tmp_path / "res"
        # the Gram route, whose Grams the cluster computes (auto would take moments for these narrow layers)
        code = main(["measure", *map(str, paths), "--measures", "cka(route=gram)", "--scheduler",
                     cluster.scheduler_address, "--no-cache", "--no-plots", "--quiet", "--out", str(out)])
        assert code == 0
    from measure.report import read_matrix_csv

    _, _, got = read_matrix_csv(out / "cka" / "m0__m1.csv")
    np.testing.assert_allclose(got, local[("cka", "m0", "m1")], rtol=0, atol=1e-9)
    capsys.readouterr()


def test_bad_scheduler_arguments_are_clear(capsys, zoo):
    from pipeline import main

    paths, _ = zoo
    code = main(["measure", str(paths[0]), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1", "--quiet"])
    assert code != 0 and "not both" in capsys.readouterr().err
    code = main(["measure", str(paths[0]), "--scheduler", "nowhere", "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "tcp://" in err


@pytest.mark.slow
def test_extract_on_a_local_cluster_equals_local_extraction(tmp_path, capsys):
    """`pipeline.py extract --workers 2`: one task per model, loaded and run on the workers."""
    from extract.demo import cnn
    from pipeline import main

    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(cnn().state_dict(), tmp_path / f"w{seed}.pt")
    config = tmp_path / "zoo.toml"
    config.write_text('data = "digits:test"\n' + "".join(
        f'[[models]]\nmodel = "extract.demo:cnn"\nweights = "{tmp_path / f"w{seed}.pt"}"\nname = "s{seed}"\n'
        'layers = ["block2", "fc1"]\n' for seed in (0, 1)))
    common = ["extract", "--config", str(config), "--device", "cpu", "--quiet"]
    # equal by construction: dask's worker processes run one BLAS thread (distributed's OMP/MKL_NUM_THREADS=1),
    # so the local and threaded runs do too; the same batches then give the same products in the same order
    with one_thread():
        assert main(common + ["--out", str(tmp_path / "local")]) == 0
        assert main(common + ["--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
        assert main(common + ["--out", str(tmp_path / "threads"), "--scheduler", "threads"]) == 0
    for seed in (0, 1):
        want = ZarrStore(tmp_path / "local" / f"s{seed}.zarr")
        for folder in ("dask", "threads"):
            got = ZarrStore(tmp_path / folder / f"s{seed}.zarr")
            assert got.info.complete and got.info.fingerprint == want.info.fingerprint
            assert got.info.weights_digest == want.info.weights_digest
            for layer in ("block2", "fc1"):
                np.testing.assert_array_equal(got.read_layer(layer), want.read_layer(layer))
    capsys.readouterr()
