"""The engine's feature route: each layer's own moments once per run (and cached), only cross products per
pair, in the precision chosen — against float64 NumPy transcriptions of linear CKA and Song et al.'s HSIC₁."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _stores import write_store
from measure_references import ref_cka, ref_cka_debiased

from measure.engine import Engine
from measure.engine.cache import StatisticsCache
from measure.functional.moments import cross_moments, pack_self_moments, self_moments, unpack_self_moments

PAIRS = [(0, 0), (0, 1), (1, 1)]
MEASURES = [("cka", {"route": "features"}), ("cka_debiased", {"route": "features"})]
REFERENCES = {"cka": ref_cka, "cka_debiased": ref_cka_debiased}


def _layers(rng: np.random.Generator, n: int, widths: list[int], offset: float) -> dict[str, np.ndarray]:
    latent = rng.normal(size=(n, 4))
    return {f"l{k}": (np.maximum(latent @ rng.normal(size=(4, p)) + rng.normal(size=(n, p)), 0) * 10.0 ** k
                      + offset) for k, p in enumerate(widths)}


def _check(results, layers, atol):
    for result in results:
        i, j = ("a" if result.store_a == "A" else "b"), ("a" if result.store_b == "A" else "b")
        want = np.array([[REFERENCES[result.measure](layers[i][r].reshape(len(layers[i][r]), -1),
                                                     layers[j][c].reshape(len(layers[j][c]), -1))
                          for c in result.cols] for r in result.rows])
        np.testing.assert_allclose(result.matrix, want, rtol=0, atol=atol, err_msg=f"{result.measure} {i}{j}")


# (n, widths of A, widths of B): more samples than features, more features than samples, single columns
SHAPES = [(90, [3, 7], [5]), (40, [60], [45, 2]), (301, [16, 1], [8, 8, 30])]


@pytest.mark.parametrize("n,widths_a,widths_b", SHAPES)
@pytest.mark.parametrize("precision,dtype,atol", [("float64", np.float64, 1e-10), ("auto", np.float32, 1e-6),
                                                  ("float32", np.float32, 1e-6)])
def test_feature_route_matches_numpy(tmp_path, n, widths_a, widths_b, precision, dtype, atol):
    rng = np.random.default_rng(n)
    layers = {"a": _layers(rng, n, widths_a, 100.0), "b": _layers(rng, n, widths_b, -3.0)}
    layers = {k: {name: v.astype(dtype) for name, v in d.items()} for k, d in layers.items()}
    stores = [write_store(tmp_path / f"{k}.zarr", k.upper(), layers[k], chunk=13) for k in ("a", "b")]
    engine = Engine(stores, device="cpu", precision=precision, memory_budget=4000)  # blocks of a few chunks
    results = engine.run(MEASURES, PAIRS)
    reference = {k: {name: v.astype(np.float64) for name, v in d.items()} for k, d in layers.items()}
    _check(results, reference, atol)
    # each layer's own moments once, one pass of cross products per pair, one of the fourth-order terms
    assert engine.statistics_computed == len(widths_a) + len(widths_b) + 2 * len(PAIRS)


def test_a_float32_store_pairs_with_a_float64_store(tmp_path):
    rng = np.random.default_rng(2)
    layers = {"a": _layers(rng, 120, [9, 4], 50.0), "b": _layers(rng, 120, [6], 0.0)}
    layers["a"] = {name: v.astype(np.float32) for name, v in layers["a"].items()}
    stores = [write_store(tmp_path / f"{k}.zarr", k.upper(), layers[k], chunk=16) for k in ("a", "b")]
    _check(Engine(stores, device="cpu").run(MEASURES, PAIRS),
           {k: {name: v.astype(np.float64) for name, v in d.items()} for k, d in layers.items()}, 1e-6)


def test_own_moments_are_cached_and_only_cross_products_recomputed(tmp_path):
    rng = np.random.default_rng(3)
    layers = {"a": _layers(rng, 80, [5, 3], 1.0), "b": _layers(rng, 80, [4], 2.0)}
    stores = [write_store(tmp_path / f"{k}.zarr", k.upper(), layers[k], chunk=9) for k in ("a", "b")]
    cache = StatisticsCache(tmp_path / "cache.zarr")
    first = Engine(stores, device="cpu", cache=cache, precision="float64")
    cold = first.run(MEASURES[:1], PAIRS)
    assert first.statistics_computed == 3 + len(PAIRS) and cache.writes == 3  # the 3 layers' own moments
    again = Engine(stores, device="cpu", cache=StatisticsCache(tmp_path / "cache.zarr"), precision="float64")
    warm = again.run(MEASURES[:1], PAIRS)
    assert again.statistics_computed == len(PAIRS) and again.layer_statistics.reused == 3
    for a, b in zip(cold, warm, strict=True):
        np.testing.assert_array_equal(a.matrix, b.matrix)  # cached moments: the same bits, the same cross products
    _check(warm, layers, 1e-10)


def test_blocks_sum_to_the_moments_of_all_rows():
    """Adding the moments of row blocks gives those of all rows (float64), and they pack and unpack losslessly."""
    rng = np.random.default_rng(4)
    z = torch.from_numpy(rng.normal(size=(50, 6)))
    w = torch.from_numpy(rng.normal(size=(50, 2)))
    total = None
    fourth = None
    for rows in torch.arange(50).split(17):
        total = self_moments(z[rows], out=total)
        fourth = cross_moments([z[rows]], [w[rows]], "fourth", out=fourth)
    zn, wn = z.numpy(), w.numpy()
    a, b = (zn ** 2).sum(1), (wn ** 2).sum(1)
    np.testing.assert_allclose(total["g"].numpy(), zn.T @ zn, rtol=1e-12)
    np.testing.assert_allclose(total["az"].numpy(), zn.T @ a, rtol=1e-12)
    np.testing.assert_allclose(float(total["aa"]), (a * a).sum(), rtol=1e-12)
    np.testing.assert_allclose(fourth["bx"].numpy()[:, 0], zn.T @ b, rtol=1e-12)
    np.testing.assert_allclose(fourth["ay"].numpy()[:, 0], wn.T @ a, rtol=1e-12)
    np.testing.assert_allclose(fourth["ab"].numpy(), [[(a * b).sum()]], rtol=1e-12)
    shift = torch.arange(6, dtype=torch.float64)
    back_shift, back = unpack_self_moments(pack_self_moments(shift, total))
    assert torch.equal(back_shift, shift) and all(torch.equal(back[k], total[k]) for k in total)
    with pytest.raises(ValueError, match="terms must be"):
        cross_moments([z], [w], "all")


def test_a_nan_is_named_by_sample_on_the_feature_route(tmp_path):
    from measure import MeasureError

    x = np.random.default_rng(5).normal(size=(60, 3))
    x[41, 1] = np.nan
    stores = [write_store(tmp_path / "a.zarr", "A", {"l": x}, chunk=8),
              write_store(tmp_path / "b.zarr", "B", {"l": np.ones((60, 2)) + np.arange(60)[:, None]}, chunk=8)]
    with pytest.raises(MeasureError, match=r"between sample 41 and 41"):
        Engine(stores, device="cpu").run(MEASURES[:1], [(0, 1)])


def test_auto_route_takes_the_grams_another_planned_measure_forms(tmp_path):
    rng = np.random.default_rng(6)
    layers = {k: _layers(rng, 200, [10], 0.0) for k in ("a", "b")}
    stores = [write_store(tmp_path / f"{k}.zarr", k.upper(), layers[k], chunk=50) for k in ("a", "b")]
    alone = Engine(stores, device="cpu").run([("cka", {})], [(0, 1)])[0]
    assert alone.extras == {"route": "features"}  # narrow layers, many samples: the cheaper route
    planned = Engine(stores, device="cpu")
    planned.plan(["cka", "cka_rbf"])  # cka_rbf forms the Grams anyway
    together = planned.run([("cka", {})], [(0, 1)])[0]
    assert together.extras.get("route") != "features"
    np.testing.assert_allclose(together.matrix, alone.matrix, rtol=0, atol=1e-6)
