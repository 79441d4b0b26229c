"""A zoo on a real LocalCluster: Grams and pair tiles on the workers, the driver holding neither."""

from __future__ import annotations

import os

import numpy as np
import pytest

from extract.store import ZarrStore
from measure.engine import Engine
from measure.engine.dask_tasks import compute_grams, dask_client, measure_on_cluster
from measure.errors import MeasureError
from tests.integrations.test_dask import N, make_zoo

pytest.importorskip("distributed")

MEASURES = [("cka", {"route": "gram"}), ("cka_debiased", {"route": "gram"}), ("dcka", {}), ("procrustes", {}),
            ("linreg", {})]
BUDGET = (4 + 8) * 8 * N * N  # four Grams of transient memory and two blocks of up to four prepared layers


def _pairs(m: int, symmetric: bool) -> list[tuple[int, int]]:
    return [(i, j) for i in range(m) for j in range(i if symmetric else 0, m)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    paths = make_zoo(tmp_path_factory.mktemp("zoo"), [0, 1, 2, 3, 4])
    engine = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float64")
    local = {}
    for name, options in MEASURES:
        for r in engine.run([(name, options)], _pairs(len(paths), name != "linreg")):
            local[name, r.store_a, r.store_b] = r.matrix
    return paths, local


@pytest.mark.slow
def test_pair_tiles_on_a_local_cluster_equal_the_local_run(zoo):
    paths, local = zoo
    with dask_client(workers=2) as client:
        engine = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float64", memory_budget=BUDGET)
        assert compute_grams(engine, MEASURES, client=client) == 5 * 2
        assert engine.layer_statistics.cache is not None  # a temporary cache: the Grams went there, not to memory
        assert not engine.layer_statistics.held("gram")
        submitted = []
        real_submit = client.submit

        def counting_submit(*args, **kwargs):
            submitted.append(args[0].__name__)
            return real_submit(*args, **kwargs)

        client.submit = counting_submit
        got = {}
        for name, options in MEASURES:
            for r in measure_on_cluster(engine, client, name, options, _pairs(len(paths), name != "linreg"),
                                        planned=[n for n, _ in MEASURES]):
                got[name, r.store_a, r.store_b] = r.matrix
        assert submitted.count("_pairs_task") >= 2 * len(MEASURES)  # the pairs ran as several tiles per measure
        pids = set(client.run(os.getpid).values())
        assert os.getpid() not in pids and len(pids) == 2
        assert engine.statistics_computed == 10 and not engine.layer_statistics.held("gram")
    assert got.keys() == local.keys()
    for key, matrix in local.items():
        # the same Grams; a tile's products are smaller matrix products than the local run's, so BLAS
        # may sum each n²-term dot product in another order: |error| ≤ n² · 2⁻⁵³ ≈ 3e-13 at n = 48
        np.testing.assert_allclose(got[key], matrix, rtol=0, atol=1e-12, err_msg=str(key))


@pytest.mark.slow
def test_a_budget_too_small_for_one_tile_is_refused_on_the_cluster_as_locally(zoo):
    paths, _ = zoo
    with dask_client(workers=2) as client:
        engine = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float64", memory_budget=5 * 8 * N * N)
        compute_grams(engine, MEASURES[:1], client=client)
        with pytest.raises(MeasureError, match="too small for one tile"):
            measure_on_cluster(engine, client, "cka", {"route": "gram"}, _pairs(5, True))
