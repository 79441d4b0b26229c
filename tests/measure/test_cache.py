"""The persistent statistics cache: reuse across runs, counted work, staleness, atomic entries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from extract.runner import extract
from extract.store import ZarrStore
from measure.engine import Engine
from measure.engine.cache import CACHE_NAME, ENTRIES, StatisticsCache, default_cache_path

N = 48


def _mlp(seed: int, width: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.Tanh(), nn.Linear(width, 6))


def _data() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((N, 12)).astype(np.float32))


def make_zoo(folder: Path, seeds: list[int]) -> list[Path]:
    paths = []
    for seed in seeds:
        result = extract(_mlp(seed), _data(), folder / f"m{seed}.zarr", name=f"m{seed}", layers=["0", "2"],
                         batch_size=16, progress=False, chunk_bytes=16 * 12 * 4, device="cpu")
        paths.append(Path(result.path))
    return paths


def _all_pairs(engine: Engine, measures=(("cka", {"route": "gram"}),)):  # the Grams are what is cached
    n = len(engine.stores)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    return {(r.measure, r.store_a, r.store_b): r.matrix for r in engine.run(list(measures), pairs)}


def _reference_gram(path: Path, layer: str) -> np.ndarray:
    x = np.asarray(ZarrStore(path).read_layer(layer), dtype=np.float64).reshape(N, -1)
    return x @ x.T


def test_adding_one_model_computes_only_its_statistics(tmp_path):
    paths = make_zoo(tmp_path, [0, 1, 2])
    cache = StatisticsCache(tmp_path / "cache.zarr")
    first = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache, precision="float64")
    before = _all_pairs(first)
    assert first.statistics_computed == 3 * 2 and cache.writes == 6 and cache.hits == 0

    paths += make_zoo(tmp_path, [3])
    cache = StatisticsCache(tmp_path / "cache.zarr")
    second = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache, precision="float64")
    after = _all_pairs(second)
    assert second.statistics_computed == 2  # the new store's two layers, nothing else
    assert cache.hits == 6 and cache.writes == 2
    for key, matrix in before.items():
        np.testing.assert_allclose(after[key], matrix, rtol=0, atol=1e-12)
    # the cached Gram is the float64 Gram of the stored activations
    np.testing.assert_allclose(second.gram(0, "0").numpy(), _reference_gram(paths[0], "0"), rtol=1e-12, atol=1e-9)


def test_cached_results_equal_uncached_for_several_measures(tmp_path):
    paths = make_zoo(tmp_path, [0, 1])
    measures = [("cka", {}), ("cka_debiased", {}), ("dcka", {}), ("cka_minibatch", {"batch_size": 16})]
    plain = _all_pairs(Engine([ZarrStore(p) for p in paths], device="cpu"), measures)
    cache = StatisticsCache(tmp_path / "c.zarr")
    _all_pairs(Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache), measures)
    warm_engine = Engine([ZarrStore(p) for p in paths], device="cpu", cache=StatisticsCache(tmp_path / "c.zarr"))
    warm = _all_pairs(warm_engine, measures)
    assert warm_engine.statistics_computed == 0
    for key, matrix in plain.items():
        np.testing.assert_allclose(warm[key], matrix, rtol=0, atol=1e-12)


def test_options_that_change_the_statistic_are_part_of_the_key(tmp_path):
    paths = make_zoo(tmp_path, [0])
    cache = StatisticsCache(tmp_path / "c.zarr")
    engine = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache)
    engine.run([("cka_minibatch", {"batch_size": 16})], [(0, 0)])
    engine.run([("cka_minibatch", {"batch_size": 8})], [(0, 0)])
    assert engine.statistics_computed == 4 and cache.writes == 4
    store = ZarrStore(paths[0])
    assert cache.key(store, "0", "gram_blocks", {"batch_size": 16}) != cache.key(store, "0", "gram_blocks",
                                                                                  {"batch_size": 8})


def test_rewritten_store_invalidates_its_entries(tmp_path):
    paths = make_zoo(tmp_path, [0, 1])
    cache_path = tmp_path / "c.zarr"
    _all_pairs(Engine([ZarrStore(p) for p in paths], device="cpu", cache=StatisticsCache(cache_path)))
    old_keys = set(StatisticsCache(cache_path).entries())
    # rewrite m1 in place with other weights (same name, same data)
    extract(_mlp(99), _data(), paths[1], name="m1", layers=["0", "2"], batch_size=16, progress=False,
            chunk_bytes=16 * 12 * 4, device="cpu", force=True)
    cache = StatisticsCache(cache_path)
    engine = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache)
    result = _all_pairs(engine)
    assert engine.statistics_computed == 2 and cache.hits == 2
    new_keys = set(cache.entries())
    assert len(old_keys - new_keys) == 2  # the stale entries of the old m1 were deleted
    fresh = _all_pairs(Engine([ZarrStore(p) for p in paths], device="cpu"))
    for key, matrix in fresh.items():
        np.testing.assert_allclose(result[key], matrix, rtol=0, atol=1e-12)


def test_store_rewritten_with_another_token_reduction_is_not_served_stale_grams(tmp_path):
    """``mean`` then ``last`` over a layer's tokens: fingerprint, weights digest and shapes all unchanged, so only
    the store's identity (its whole attribute record, reductions included) tells the old Grams from the new."""
    def tokens() -> nn.Module:  # a layer of 5 tokens × 4 features per sample
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(12, 20), nn.Unflatten(1, (5, 4)))

    path, cache_path = tmp_path / "t.zarr", tmp_path / "c.zarr"
    options = dict(name="t", layers=["1"], batch_size=16, progress=False, device="cpu")
    extract(tokens(), _data(), path, reduce={"1": "mean"}, **options)
    _all_pairs(Engine([ZarrStore(path)], device="cpu", cache=StatisticsCache(cache_path), precision="float64"))
    before = ZarrStore(path).info
    extract(tokens(), _data(), path, reduce={"1": "last"}, force=True, **options)
    after = ZarrStore(path).info
    assert (after.fingerprint, after.weights_digest) == (before.fingerprint, before.weights_digest)
    assert ZarrStore(path).layer_shape("1") == (4,)
    engine = Engine([ZarrStore(path)], device="cpu", cache=StatisticsCache(cache_path), precision="float64")
    engine.run([("cka", {"route": "gram"})], [(0, 0)])
    assert engine.statistics_computed == 1  # the new layer's Gram, not the old one from the cache
    # tolerance: float64 dot products of 4 terms, |ΔKᵢⱼ| ≲ 4·2⁻⁵³·Σ|xᵢₖxⱼₖ|, far below the 1e-12 allowed here
    np.testing.assert_allclose(engine.gram(0, "1").numpy(), _reference_gram(path, "1"), rtol=1e-12, atol=1e-12)


def test_incomplete_or_damaged_entry_is_never_used(tmp_path):
    paths = make_zoo(tmp_path, [0])
    cache = StatisticsCache(tmp_path / "c.zarr")
    store = ZarrStore(paths[0])
    good = _reference_gram(paths[0], "0")
    cache.put(store, "0", good)
    key = cache.key(store, "0")
    # a run killed between writing and marking complete
    import zarr

    array = zarr.open_group(str(tmp_path / "c.zarr"))[f"{ENTRIES}/{key}"]
    attrs = dict(array.attrs["simtorch_cache"])
    array.attrs["simtorch_cache"] = {**attrs, "complete": False}
    assert StatisticsCache(tmp_path / "c.zarr").get(store, "0") is None
    # complete but with bytes that do not match the recorded digest
    array.attrs["simtorch_cache"] = attrs
    array[0, 0] = good[0, 0] + 1.0
    assert StatisticsCache(tmp_path / "c.zarr").get(store, "0") is None
    # an engine recomputes and repairs the entry
    engine = Engine([store], device="cpu", cache=StatisticsCache(tmp_path / "c.zarr"), precision="float64")
    np.testing.assert_allclose(engine.gram(0, "0").numpy(), good, rtol=1e-12, atol=1e-9)
    assert engine.statistics_computed == 1
    np.testing.assert_array_equal(StatisticsCache(tmp_path / "c.zarr").get(store, "0"), engine.gram(0, "0").numpy())


def test_killed_writer_leaves_no_reusable_entry(tmp_path):
    """A process killed inside put (after the data, before the completion mark) leaves a miss."""
    paths = make_zoo(tmp_path, [0])
    script = f"""
import os, numpy as np
from extract.store import ZarrStore
from measure.engine.cache import StatisticsCache
cache = StatisticsCache({str(tmp_path / 'c.zarr')!r})
store = ZarrStore({str(paths[0])!r})
import measure.engine.cache
original = measure.engine.cache._write
def die_after_data(array, value):
    original(array, value)
    os._exit(9)
measure.engine.cache._write = die_after_data
cache.put(store, "0", np.ones((48, 48)))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    cache = StatisticsCache(tmp_path / "c.zarr")
    assert cache.entries() == {}  # written aside, never published: no entry, complete or not, is visible
    (left,) = (tmp_path / "c.zarr" / ".tmp").iterdir()
    assert cache.get(ZarrStore(paths[0]), "0") is None
    os.utime(left, (time.time() - 2 * 86400,) * 2)  # abandoned two days ago: removed by the next writer
    assert cache.put(ZarrStore(paths[0]), "0", np.ones((48, 48)))  # the next put publishes the entry
    assert not (tmp_path / "c.zarr" / ".tmp").exists()  # emptied, then removed
    np.testing.assert_array_equal(StatisticsCache(tmp_path / "c.zarr").get(ZarrStore(paths[0]), "0"),
                                  np.ones((48, 48)))


def test_incomplete_or_damaged_entry_in_place_is_replaced(tmp_path):
    """An entry left incomplete in ``entries/`` (a run killed on the URL path, or an older version) is
    moved aside and replaced by the next put; readers never used it."""
    import zarr

    paths = make_zoo(tmp_path, [0])
    store = ZarrStore(paths[0])
    cache = StatisticsCache(tmp_path / "c.zarr")
    assert cache.put(store, "0", np.ones((48, 48)))
    key = cache.key(store, "0")
    array = zarr.open_array(str(tmp_path / "c.zarr" / "entries" / key), mode="r+")
    attrs = dict(array.attrs["simtorch_cache"])
    array.attrs["simtorch_cache"] = {**attrs, "complete": False}
    assert StatisticsCache(tmp_path / "c.zarr").get(store, "0") is None
    assert StatisticsCache(tmp_path / "c.zarr").put(store, "0", np.full((48, 48), 2.0))
    np.testing.assert_array_equal(StatisticsCache(tmp_path / "c.zarr").get(store, "0"), np.full((48, 48), 2.0))
    array = zarr.open_array(str(tmp_path / "c.zarr" / "entries" / key), mode="r+")
    array.attrs["simtorch_cache"] = {**dict(array.attrs["simtorch_cache"]), "crc32c": 1}  # complete, but damaged
    again = StatisticsCache(tmp_path / "c.zarr")
    assert again.get(store, "0") is None and again.put(store, "0", np.full((48, 48), 3.0))
    np.testing.assert_array_equal(StatisticsCache(tmp_path / "c.zarr").get(store, "0"), np.full((48, 48), 3.0))
    assert not (tmp_path / "c.zarr" / ".tmp").exists()  # the replaced entries were deleted
    assert list(StatisticsCache(tmp_path / "c.zarr").entries()) == [key]


def test_default_cache_path_is_beside_the_stores():
    assert default_cache_path(["/a/zoo/m.zarr"]) == f"/a/zoo/{CACHE_NAME}"
    assert default_cache_path(["s3://bucket/zoo/m.zarr"]) == f"s3://bucket/zoo/{CACHE_NAME}"


def test_cli_measure_reuses_the_cache_and_skips_it_in_store_folders(tmp_path, capsys):
    from pipeline import main

    make_zoo(tmp_path / "zoo", [0, 1])
    out = tmp_path / "res"
    args = ["measure", str(tmp_path / "zoo"), "--measures", "cka", "--out", str(out), "--no-plots", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "zoo" / CACHE_NAME).is_dir()
    first = (out / "manifest.json").read_text()
    make_zoo(tmp_path / "zoo", [2])
    assert main(args) == 0  # the cache folder inside zoo/ is not mistaken for a store
    cache = StatisticsCache(tmp_path / "zoo" / CACHE_NAME)
    assert len(cache.entries()) == 6
    assert "m2" in (out / "manifest.json").read_text() and "m2" not in first
    other = tmp_path / "elsewhere.zarr"
    assert main(args + ["--cache", str(other)]) == 0 and len(StatisticsCache(other).entries()) == 6
    capsys.readouterr()


def test_cli_no_cache_writes_nothing(tmp_path, capsys):
    from pipeline import main

    make_zoo(tmp_path / "zoo", [0])
    assert main(["measure", str(tmp_path / "zoo"), "--measures", "cka", "--out", str(tmp_path / "r"),
                 "--no-plots", "--quiet", "--no-cache"]) == 0
    assert not (tmp_path / "zoo" / CACHE_NAME).exists()
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["not json", "[1, 2]"])
def test_cli_bad_storage_options_is_one_line_error(tmp_path, capsys, bad):
    from pipeline import main

    make_zoo(tmp_path / "zoo", [0])
    code = main(["measure", str(tmp_path / "zoo"), "--storage-options", bad, "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "--storage-options" in err and "Traceback" not in err


def test_prepared_layers_are_stacked_once_and_pairs_use_them(tmp_path):
    """A store's prepared vectors are stacked once (views, no second copy); pairs equal a fresh product."""
    from measure.functional._bilinear import PreparedLayers, bilinear_matrix
    from measure.registry import get_measure

    paths = make_zoo(tmp_path, [0, 1])
    engine = Engine([ZarrStore(p) for p in paths], device="cpu")
    spec = get_measure("cka")
    a, b = (engine.prepared(spec, spec.resolve_options({}), s) for s in (0, 1))
    assert isinstance(a, PreparedLayers) and a.stacked["left"].shape == (2, N * N)
    for k, p in enumerate(a):
        assert p.left.data_ptr() == a.stacked["left"][k].data_ptr()
        assert p.right.data_ptr() == p.left.data_ptr()  # cka's right vector is its left one
    plain = bilinear_matrix(list(a), list(b))  # plain lists: stacked on the fly
    # equal by construction: the same stacked vectors multiplied in the same product, stacked before or on the fly
    np.testing.assert_array_equal(bilinear_matrix(a, b).numpy(), plain.numpy())


def test_each_store_layer_statistic_is_computed_once_for_all_pairs_and_measures(tmp_path):
    """M stores × L layers Grams, however many pairs and Gram measures are asked for."""
    paths = make_zoo(tmp_path, [0, 1, 2, 3])
    engine = Engine([ZarrStore(p) for p in paths], device="cpu")
    pairs = [(i, j) for i in range(4) for j in range(4)]
    results = engine.run([("cka", {}), ("cka_debiased", {}), ("dcka", {})], pairs)
    assert len(results) == 3 * 16 and engine.statistics_computed == 4 * 2
    assert len(engine.layer_statistics.held("gram")) == 4 * 2  # memory held: one Gram per (store, layer), not per pair


def test_entries_over_several_chunks_are_plain_zarr(tmp_path, monkeypatch):
    # entries are written and read through their chunk files (extract.store.chunk_files); zarr must agree
    import zarr

    import measure.engine.cache

    monkeypatch.setattr(measure.engine.cache, "CHUNK_BYTES", 7 * N * 8)  # 7 rows a chunk: 6 whole chunks, a partial one
    paths = make_zoo(tmp_path, [0])
    store = ZarrStore(paths[0])
    value = np.random.default_rng(3).standard_normal((N, N))
    cache = StatisticsCache(tmp_path / "c.zarr")
    cache.put(store, "0", value)
    array = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")[f"{ENTRIES}/{cache.key(store, '0')}"]
    assert array.chunks == (7, N)
    np.testing.assert_array_equal(array[...], value)
    np.testing.assert_array_equal(StatisticsCache(tmp_path / "c.zarr").get(store, "0"), value)
    chunk_file = Path(array.store_path.store.root) / array.store_path.path / "c" / "2" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[10] ^= 0x01
    chunk_file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="unreadable"):
        assert StatisticsCache(tmp_path / "c.zarr").get(store, "0") is None  # a flipped bit: recomputed


def test_cached_grams_are_loaded_once_per_run_and_released_after_the_last_gram_measure(tmp_path):
    paths = make_zoo(tmp_path, [0, 1, 2])
    measures = (("cka", {"route": "gram"}), ("cka_rbf", {}), ("cka_debiased", {"route": "gram"}))
    reference = _all_pairs(Engine([ZarrStore(p) for p in paths], device="cpu", precision="float64"), measures)
    first = Engine([ZarrStore(p) for p in paths], device="cpu", cache=StatisticsCache(tmp_path / "c.zarr"),
                   precision="float64")
    _all_pairs(first, measures)
    assert first.statistics_computed == 6 and not first.layer_statistics.held("gram")  # computed, cached, then released
    cache = StatisticsCache(tmp_path / "c.zarr")
    warm = Engine([ZarrStore(p) for p in paths], device="cpu", cache=cache, precision="float64")
    results = _all_pairs(warm, measures)
    assert warm.statistics_computed == 0 and cache.hits == 6 and cache.misses == 0  # each Gram loaded once
    assert not warm.layer_statistics.held("gram")
    assert results.keys() == reference.keys()
    for key, matrix in results.items():
        np.testing.assert_allclose(matrix, reference[key], rtol=1e-12, atol=1e-12, err_msg=str(key))
    assert warm.layer_statistics.reused == 6
    np.testing.assert_allclose(warm.gram(1, "0").numpy(), _reference_gram(paths[1], "0"), rtol=1e-12, atol=1e-9)
    assert cache.hits == 7 and warm.layer_statistics.reused == 6  # reloaded after release: not reused twice
    uncached = Engine([ZarrStore(p) for p in paths], device="cpu", precision="float64")
    _all_pairs(uncached, measures)
    assert len(uncached.layer_statistics.held("gram")) == 6  # nothing to reload them from: kept


def test_cli_loads_each_cached_gram_once_across_measures(tmp_path, capsys):
    # the CLI runs the engine once per measure: Grams are kept until the last measure that needs them
    from pipeline import main

    make_zoo(tmp_path / "zoo", [0, 1])
    args = ["measure", str(tmp_path / "zoo"), "--measures", "cka", "cka_rbf", "cka_debiased", "--out",
            str(tmp_path / "res"), "--no-plots", "--no-report"]
    assert main(args) == 0
    assert "statistics: 4 computed, 0 reused" in capsys.readouterr().out
    assert main(args) == 0
    assert "statistics: 0 computed, 4 reused" in capsys.readouterr().out


def test_scalar_entries_and_rewritten_entries(tmp_path):
    paths = make_zoo(tmp_path, [0])
    store = ZarrStore(paths[0])
    cache = StatisticsCache(tmp_path / "c.zarr")
    assert cache.put(store, "0", np.float64(2.5), "scalar")
    assert StatisticsCache(tmp_path / "c.zarr").get(store, "0", "scalar") == 2.5
    value = np.arange(N * N, dtype=np.float64).reshape(N, N)
    cache.put(store, "0", value)
    assert cache.contains(store, "0")  # remembered for the get that follows...
    cache.put(store, "0", value + 1)  # ...but the entry is rewritten before it
    np.testing.assert_array_equal(cache.get(store, "0"), value + 1)


def test_cli_cache_given_as_a_file_url_is_written_and_reused(tmp_path, capsys):
    from pipeline import main

    make_zoo(tmp_path / "zoo", [0, 1])
    url = (tmp_path / "url cache.zarr").as_uri()  # file:///.../url%20cache.zarr
    args = ["measure", str(tmp_path / "zoo"), "--measures", "cka(route=gram)", "--out", str(tmp_path / "r"),
            "--no-plots", "--no-report", "--cache", url]
    assert main(args) == 0
    assert "Could not write" not in capsys.readouterr().err
    assert len(StatisticsCache(tmp_path / "url cache.zarr").entries()) == 4
    assert main(args) == 0
    assert "statistics: 0 computed, 4 reused" in capsys.readouterr().out
