"""The store engine: streamed statistics from real Zarr stores on disk equal ``compare`` on the same arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _stores import write_store

import measure.engine.streaming as statistics
from extract.store import StoreError
from measure import MeasureError, compare
from measure.engine import Engine, default_device

N = 45  # not a multiple of the chunk sizes or of the minibatch size below


def zoo(seed=0, n=N):
    """Inputs and two models' layers (float32, per-sample shapes kept), some wider than n."""
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, 12)).astype(np.float32)
    h = np.maximum(inputs @ rng.normal(size=(12, 60)), 0)
    a = {
        "conv": (h[:, :48].reshape(n, 3, 4, 4) + 0.1 * rng.normal(size=(n, 3, 4, 4))).astype(np.float32),
        "wide": np.tanh(h @ rng.normal(size=(60, 90))).astype(np.float32),
        "fc": (h @ rng.normal(size=(60, 5)) + 4.0).astype(np.float32),
    }
    b = {
        "l1": (inputs @ rng.normal(size=(12, 20)) + rng.normal(size=(n, 20))).astype(np.float32),
        "l2": np.maximum(h @ rng.normal(size=(60, 8)), 0).astype(np.float32),
    }
    return inputs, a, b


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    inputs, a, b = zoo()
    made = {}
    for chunk in (5, 16, N):
        made[chunk] = (write_store(root / f"a{chunk}.zarr", "A", a, inputs, chunk=chunk),
                       write_store(root / f"b{chunk}.zarr", "B", b, inputs, chunk=chunk))
    return inputs, a, b, made


MEASURES = [
    ("cka", {"route": "gram"}), ("cka", {"route": "features"}), ("cka_debiased", {"route": "gram"}),
    ("cka_debiased", {"route": "features"}), ("cka_rbf", {"threshold": 0.6}), ("cka_minibatch", {"batch_size": 8}),
    ("dcka", {}), ("dcka", {"psd": True}),
]


def _expected(a, b, inputs, name, options):
    kw = {"confounder": inputs} if name == "dcka" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the minibatch estimator warns about the dropped partial batch
        return np.array([[compare(x, y, name, **kw, **options, precision="float64") for y in b.values()]
                         for x in a.values()])


@pytest.mark.parametrize("chunk,budget", [(5, None), (16, None), (N, None), (16, 1), (5, 4000)])
def test_store_path_equals_compare(stores, chunk, budget, monkeypatch):
    inputs, a, b, made = stores
    if budget == 1:
        # a budget of one byte forces the blocked Gram path of layer_gram: it never builds the one-shot Gram
        one_shot = statistics.linear_gram

        def refuse(x, *args):
            if len(x) == N:  # (per-batch Grams of the minibatch estimator are fine)
                raise AssertionError("the one-shot Gram path was used despite the small memory budget")
            return one_shot(x, *args)

        monkeypatch.setattr(statistics, "linear_gram", refuse)
    engine = Engine(list(made[chunk]), device="cpu", memory_budget=budget or statistics.DEFAULT_MEMORY_BUDGET,
                    precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = engine.run(MEASURES, [(0, 1)])
    for (name, options), result in zip(MEASURES, results, strict=True):
        assert result.rows == list(a) and result.cols == list(b)
        np.testing.assert_allclose(result.matrix, _expected(a, b, inputs, name, options), atol=1e-10, rtol=0,
                                   err_msg=f"{name} {options}")
        if options.get("route") == "features":
            assert result.extras == {"route": "features"}


def test_pairs_of_many_stores_are_slices_of_one_product(stores, tmp_path, monkeypatch):
    """Three stores, some pairs in either order: every matrix equals ``compare`` of the arrays, and every
    store's layers were paired through one shared product (one product for all pairs, not one per pair)."""
    from measure.functional import _bilinear

    inputs, a, b, made = stores
    _, c, _ = zoo(seed=3)
    c["fc"][:, :] = 1.5  # a constant layer: undefined, its row / column NaN in the shared product too
    engine = Engine([*made[16], write_store(tmp_path / "c.zarr", "C", c, inputs, chunk=16)], device="cpu",
                    undefined="nan", precision="float64")
    grouped = []
    original = _bilinear.SharedProducts.compute

    def compute(self):
        grouped.append(self.rows)
        original(self)

    monkeypatch.setattr(_bilinear.SharedProducts, "compute", compute)
    arrays = [a, b, c]
    pairs = [(0, 2), (2, 1), (1, 1), (0, 1)]
    for name, options in [("cka", {"route": "gram"}), ("cka_debiased", {"route": "gram"}), ("dcka", {})]:
        grouped.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = engine.run([(name, options)], pairs)
        assert grouped == [len(a) + len(b) + len(c)], name
        for (i, j), result in zip(pairs, results, strict=True):
            rows = [k for k, layer in enumerate(arrays[i]) if not (i == 2 and layer == "fc")]
            cols = [k for k, layer in enumerate(arrays[j]) if not (j == 2 and layer == "fc")]
            defined = {k: v for k, v in arrays[i].items() if not (i == 2 and k == "fc")}, \
                {k: v for k, v in arrays[j].items() if not (j == 2 and k == "fc")}
            np.testing.assert_allclose(result.matrix[np.ix_(rows, cols)],
                                       _expected(*defined, inputs, name, options),
                                       atol=1e-10, rtol=0, err_msg=f"{name} {(i, j)}")
            assert np.isnan(np.delete(np.delete(result.matrix, rows, 0), [], 1)).all()
            assert np.isnan(np.delete(result.matrix, cols, 1)).all()


@pytest.mark.parametrize("budget", [1, 100_000, 10**9])
def test_layer_gram_blocked_equals_numpy(stores, budget):
    _, a, _, made = stores
    for chunk in (5, 16):
        got = statistics.layer_gram(made[chunk][0], "wide", torch.device("cpu"), budget).numpy()
        x = a["wide"].astype(np.float64)
        np.testing.assert_allclose(got, x @ x.T, atol=1e-10, rtol=1e-12)


def test_each_statistic_is_computed_once_and_reused(stores):
    _, a, b, made = stores
    engine = Engine(list(made[16]), device="cpu")
    engine.run([("cka", {"route": "gram"}), ("cka_debiased", {"route": "gram"}), ("cka_rbf", {}), ("dcka", {})],
               [(0, 0), (0, 1), (1, 1)])
    assert engine.statistics_computed == len(a) + len(b)  # one Gram per layer, shared by 4 measures × 3 pairs


def test_self_comparison_is_symmetric_with_unit_diagonal(stores):
    _, a, _, made = stores
    engine = Engine(list(made[5]), device="cpu")
    for name, options in [("cka", {"route": "gram"}), ("cka", {"route": "features"}), ("cka_debiased", {}),
                          ("cka_rbf", {}), ("dcka", {})]:
        m = engine.run([(name, options)], [(0, 0)])[0].matrix
        np.testing.assert_allclose(m, m.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-10)


def test_feature_route_streams_with_budget_smaller_than_a_chunk(stores):
    _, a, b, made = stores
    gram = Engine(list(made[16]), device="cpu", precision="float64").run([("cka_debiased", {"route": "gram"})],
                                                                         [(0, 1)])[0].matrix
    tiny = Engine(list(made[16]), device="cpu", memory_budget=2000, precision="float64")
    feat = tiny.run([("cka_debiased", {"route": "features"}), ("cka", {"route": "features"})], [(0, 1)])
    np.testing.assert_allclose(feat[0].matrix, gram, atol=1e-10, rtol=0)
    # each layer's own moments once, and per pair one pass of cross products shared by both estimators plus
    # one of the fourth-order cross terms only the debiased one needs
    assert tiny.statistics_computed == len(a) + len(b) + 2
    auto = Engine(list(made[16]), device="cpu", memory_budget=2000).run([("cka_debiased", {"route": "features"})],
                                                                       [(0, 1)])[0].matrix
    np.testing.assert_allclose(auto, gram, atol=1e-6, rtol=0)  # float32 products of the float32 stores


def test_auto_route_takes_features_for_narrow_layers(tmp_path):
    rng = np.random.default_rng(4)
    n = 700
    a = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=(n, 2)).astype(np.float32)}
    b = {"z": (a["x"][:, :2] + rng.normal(size=(n, 2))).astype(np.float32)}
    engine = Engine([write_store(tmp_path / "a.zarr", "A", a, chunk=128),
                     write_store(tmp_path / "b.zarr", "B", b, chunk=128)], device="cpu", precision="float64")
    auto, gram = engine.run([("cka_debiased", {}), ("cka_debiased", {"route": "gram"})], [(0, 1)])
    assert auto.extras == {"route": "features"} and gram.extras.get("route") is None
    np.testing.assert_allclose(auto.matrix, gram.matrix, atol=1e-10, rtol=0)


def test_layer_selection_and_best_matches(stores):
    _, a, b, made = stores
    engine = Engine(list(made[16]), device="cpu", layers=["c*", "fc", "l?"])
    result = engine.run([("cka", {})], [(0, 1)])[0]
    assert result.rows == ["conv", "fc"] and result.cols == ["l1", "l2"]
    for row, col, value in result.best_matches():
        i = result.rows.index(row)
        assert value == result.matrix[i].max() and col == result.cols[int(np.argmax(result.matrix[i]))]
    distance = engine.run([("procrustes_euclidean", {})], [(0, 1)])[0]  # a distance: the best match is the smallest
    assert distance.spec.kind == "distance" and not np.array_equal(distance.matrix.argmin(1), distance.matrix.argmax(1))
    for row, col, value in distance.best_matches():
        i = distance.rows.index(row)
        assert value == distance.matrix[i].min() and col == distance.cols[int(np.argmin(distance.matrix[i]))]
    with pytest.raises(MeasureError, match="match no layer"):
        Engine(list(made[16]), device="cpu", layers=["nothing*"])


def test_pair_matrices_sync_to_host_per_layer_not_per_entry(stores, monkeypatch):
    _, a, b, made = stores
    engine = Engine(list(made[16]), device="cpu")
    calls = {"n": 0}
    for name in ("item", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    engine.run([("cka", {"route": "gram"}), ("cka", {"route": "features"})], [(0, 1)])
    n_layers = len(a) + len(b)
    assert calls["n"] <= n_layers + 2  # one per layer (its self-similarity check) plus one per feature-route result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_equals_cpu_path(stores):
    inputs, a, b, made = stores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = Engine(list(made[16]), device="cpu").run(MEASURES, [(0, 1)])
        gpu = Engine(list(made[16]), device="cuda", memory_budget=4000).run(MEASURES, [(0, 1)])
    for c, g in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(g.matrix, c.matrix, atol=1e-10, rtol=0, err_msg=c.measure)
    x, y = torch.from_numpy(a["wide"]).cuda(), torch.from_numpy(b["l1"]).cuda()
    for route in ("gram", "features"):
        assert compare(x, y, "cka_debiased", route=route) == pytest.approx(
            compare(a["wide"], b["l1"], "cka_debiased"), abs=1e-10)


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(MeasureError, match="CUDA is not available; use cpu"):
        default_device("cuda")
    assert default_device(None).type == "cpu"


# ----------------------------------------------------------------------------- bad input


def test_incomparable_and_incomplete_stores_are_refused(tmp_path):
    inputs, a, b = zoo()
    good = write_store(tmp_path / "a.zarr", "A", a, inputs)
    other_data = write_store(tmp_path / "b.zarr", "B", b, inputs, fingerprint="sha256:other")
    with pytest.raises(StoreError, match="not extracted from the same data"):
        Engine([good, other_data], device="cpu")
    _, _, b_short = zoo(n=30)
    fewer = write_store(tmp_path / "c.zarr", "C", b_short, fingerprint="sha256:test")
    with pytest.raises(StoreError, match="45 vs 30 samples"):
        Engine([good, fewer], device="cpu")
    partial = write_store(tmp_path / "d.zarr", "D", b, inputs, complete=False)
    with pytest.raises(StoreError, match="incomplete .*rerun the same `pipeline.py extract`"):
        Engine([good, partial], device="cpu")
    with pytest.raises(StoreError, match="incomplete"):
        Engine([partial], device="cpu")


@pytest.mark.parametrize("route", ["gram", "features"])
def test_nan_in_a_store_names_layer_and_samples(tmp_path, route):
    inputs, a, b = zoo()
    a["wide"][17, 3] = np.nan
    a["wide"][19, 0] = np.inf
    engine = Engine([write_store(tmp_path / "a.zarr", "A", a, inputs, chunk=5),
                     write_store(tmp_path / "b.zarr", "B", b, inputs, chunk=5)], device="cpu")
    with pytest.raises(MeasureError, match=r"layer 'wide' of store .*a\.zarr holds NaN or Inf in 2 sample\(s\), "
                                           r"between sample 17 and 19"):
        engine.run([("cka", {"route": route})], [(0, 1)])


@pytest.mark.parametrize("name,options", [("cka", {"route": "gram"}), ("cka", {"route": "features"}),
                                          ("cka_debiased", {"route": "features"}), ("cka_rbf", {}), ("dcka", {})])
def test_constant_layer_raises_or_gives_nan_with_a_warning(tmp_path, name, options):
    inputs, a, b = zoo()
    b["l2"] = np.full_like(b["l2"], 0.5)
    engine = Engine([write_store(tmp_path / "a.zarr", "A", a, inputs),
                     write_store(tmp_path / "b.zarr", "B", b, inputs)], device="cpu")
    with pytest.raises(MeasureError, match=r"undefined for layer 'l2' .*--layers, or pass --undefined nan"):
        engine.run([(name, options)], [(0, 1)])
    lenient = Engine(engine.stores, device="cpu", undefined="nan")
    with pytest.warns(UserWarning, match="undefined for layer 'l2'"):
        m = lenient.run([(name, options)], [(0, 1)])[0].matrix
    assert np.isnan(m[:, 1]).all() and np.isfinite(m[:, 0]).all()


def test_dcka_without_inputs_and_debiased_with_too_few_samples(tmp_path):
    inputs, a, b = zoo()
    engine = Engine([write_store(tmp_path / "a.zarr", "A", a), write_store(tmp_path / "b.zarr", "B", b)],
                    device="cpu")
    with pytest.raises(MeasureError, match="none of the stores holds them"):
        engine.run([("dcka", {})], [(0, 1)])
    _, a3, b3 = zoo(n=3)
    tiny = Engine([write_store(tmp_path / "a3.zarr", "A", a3), write_store(tmp_path / "b3.zarr", "B", b3)],
                  device="cpu")
    for route in ("gram", "features"):
        with pytest.raises(MeasureError, match="at least 4 samples"):
            tiny.run([("cka_debiased", {"route": route})], [(0, 1)])
    with pytest.raises(MeasureError, match="Unknown measure"):
        engine.run([("cca_typo", {})], [(0, 1)])
    with pytest.raises(MeasureError, match="Unknown option"):
        engine.run([("cka", {"bandwidth": 1})], [(0, 1)])


def test_engine_config_is_the_same_as_keywords(stores):
    """``Engine(stores, config=EngineConfig(...))`` equals ``Engine(stores, **options)``; both at once is refused."""
    from measure.engine import EngineConfig

    made = stores[3][16]
    config = EngineConfig(device="cpu", layers=["wide", "l*"], undefined="nan", memory_budget=4000, precision="float64")
    by_config, by_keywords = Engine(list(made), config=config), Engine(list(made), **config.__dict__)
    assert by_config.layers == by_keywords.layers == [["wide"], ["l1", "l2"]]
    assert by_config.memory_budget == 4000 and by_config.undefined == "nan" and by_config.precision == "float64"
    got, want = (e.run([("cka", {"route": "gram"})], [(0, 1)])[0].matrix for e in (by_config, by_keywords))
    np.testing.assert_array_equal(got, want)  # one configuration, so the same path on the same data
    with pytest.raises(TypeError, match="not both"):
        Engine(list(made), config=config, device="cpu")


def test_layer_statistics_answer_from_memory_then_compute(stores):
    """One statistic, asked twice, is computed once; per-batch Grams and features are not held."""
    made = stores[3][16]
    engine = Engine(list(made), device="cpu")
    stats = engine.layer_statistics
    key = stats.key("gram", 0, "wide")
    assert stats.get(key) is stats.get(key) and stats.computed == 1 and stats.held() == [key]
    blocks = stats.key("gram_blocks", 0, "wide", batch_size=8)
    assert len(stats.get(blocks)) == N // 8 and stats.computed == 2 and blocks not in stats.held()
    features = stats.get(stats.key("features", 1, "l1"))
    assert features.shape == (N, 20) and stats.computed == 3 and stats.held() == [key]
    stats.release("gram", 0)  # nothing to reload it from (no cache): kept
    assert stats.held("gram") == [key]
    with pytest.raises(ValueError, match="Unknown statistic kind"):
        stats.key("moment", 0)


def test_undefined_value_raises_or_warns_naming_measure_and_place():
    from measure.undefined import API_ADVICE, undefined_value

    with pytest.raises(MeasureError, match=r"^cka is undefined for layer 'b' of S: a reason\. Drop the layer"):
        undefined_value("cka", "layer 'b' of S", "a reason")
    with pytest.warns(UserWarning, match=r"^cka is undefined for x: a reason\.$"):
        undefined_value("cka", "x", "a reason", "nan", advice=API_ADVICE)
