"""precision="float32": Gram products in float32 after a float64 shift, checked against float64 NumPy.

The bound each test asserts is one a plain float32 product X Xᵀ fails on the same data (activations with
a large mean, as after a ReLU), so the tests fail if the shift or the float64 offsets are dropped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _stores import write_store

import pipeline
from measure import MeasureError
from measure.engine import Engine
from measure.engine.cache import StatisticsCache
from measure.functional.gram import cross_gram, linear_gram

SHAPES = [(40, 7), (64, 300), (300, 9000), (600, 700)]  # p > n, p above the 4096-feature block, n above 512


def _relu_like(rng: np.random.Generator, n: int, p: int, mean: float = 30.0) -> np.ndarray:
    """Non-negative float32 activations with a large common mean and a few informative directions."""
    latent = rng.normal(size=(n, 5))
    x = np.abs(latent @ rng.normal(size=(5, p)) + rng.normal(size=(n, p))) + mean
    return x.astype(np.float32)


def _centred_cka(k: np.ndarray, m: np.ndarray) -> float:
    """Linear CKA from two Grams, with an explicit centring matrix (float64 NumPy)."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    kc, mc = h @ k @ h, h @ m @ h
    return float((kc * mc).sum() / np.sqrt((kc * kc).sum() * (mc * mc).sum()))


@pytest.mark.parametrize("n,p", SHAPES)
def test_float32_gram_matches_float64_numpy(n, p):
    rng = np.random.default_rng(n + p)
    x, y = _relu_like(rng, n, p), _relu_like(rng, n, p // 2 + 1)
    k_ref = x.astype(np.float64) @ x.astype(np.float64).T
    m_ref = y.astype(np.float64) @ y.astype(np.float64).T
    k32 = linear_gram(torch.from_numpy(x), "float32").numpy()
    m32 = linear_gram(torch.from_numpy(y), "float32").numpy()
    assert k32.dtype == np.float64 and np.array_equal(k32, k32.T)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    scale = np.abs(xc @ xc.T).max()  # the centred Gram's scale: what every measure here depends on
    assert np.abs(k32 - k_ref).max() <= 1e-6 * scale
    assert abs(_centred_cka(k32, m32) - _centred_cka(k_ref, m_ref)) <= 5e-8
    # the bound is meaningful: a plain float32 product misses it by 10-100x on the same data
    plain = (torch.from_numpy(x) @ torch.from_numpy(x).T).double().numpy()
    assert np.abs(plain - k_ref).max() > 1e-6 * scale


def test_float32_scheme_ignores_a_tf32_setting_and_restores_it():
    x = torch.from_numpy(_relu_like(np.random.default_rng(2), 80, 600))
    reference = linear_gram(x, "float32")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        # equal by construction: the scheme switches TF32 off, so the same float32 products run again
        assert torch.equal(linear_gram(x, "float32"), reference)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_matmul_precision_is_restored_by_the_last_of_overlapping_users():
    """Threads share the process-wide setting: the first to leave must not restore it under the other."""
    from measure.functional.gram import _ieee_float32_matmul

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        first, second = _ieee_float32_matmul(), _ieee_float32_matmul()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # as a thread that finishes first
        assert torch.get_float32_matmul_precision() == "highest"
        second.__exit__(None, None, None)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_float16_input_to_the_float32_scheme():
    x = torch.from_numpy(_relu_like(np.random.default_rng(5), 4000, 50)).half()  # a float16 column sum overflows
    k32 = linear_gram(x, "float32")
    ref = x.double() @ x.double().T
    xc = x.double() - x.double().mean(dim=0)
    assert bool(torch.isfinite(k32).all())
    assert float((k32 - ref).abs().max()) <= 1e-6 * float((xc @ xc.T).abs().max())


def test_float32_blocks_assemble_the_gram_with_any_shift():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(_relu_like(rng, 90, 5000))
    k_ref = x.double() @ x.double().T
    shift = x[:30].mean(dim=0, dtype=torch.float64)  # the first block's means, as the out-of-core path uses
    top = linear_gram(x[:30], "float32", shift)
    cross = cross_gram(x[:30], x[30:], "float32", shift)
    xc = x.double() - x.double().mean(dim=0)
    scale = float((xc @ xc.T).abs().max())
    assert float((top - k_ref[:30, :30]).abs().max()) <= 1e-6 * scale
    assert float((cross - k_ref[:30, 30:]).abs().max()) <= 1e-6 * scale
    # equal by construction: the float64 cross block is this very product (one matmul of the same operands)
    assert torch.equal(cross_gram(x[:30], x[30:]), x[:30].double() @ x[30:].double().T)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        linear_gram(torch.ones(4, 3), "float16")
    with pytest.raises(MeasureError, match="precision must be one of"):
        Engine([], precision="half")


@pytest.fixture(scope="module")
def pair_stores(tmp_path_factory):
    return _pair_stores(tmp_path_factory.mktemp("precision"))


def _pair_stores(root):
    rng = np.random.default_rng(7)
    n = 70
    inputs = rng.normal(size=(n, 6)).astype(np.float32)
    a = {"wide": _relu_like(rng, n, 5000), "fc": (inputs @ rng.normal(size=(6, 9)) + 50).astype(np.float32)}
    b = {"conv": _relu_like(rng, n, 200).reshape(n, 2, 10, 10), "out": np.tanh(a["fc"] - 50).astype(np.float32)}
    return (write_store(root / "a.zarr", "A", a, inputs, chunk=16),
            write_store(root / "b.zarr", "B", b, inputs, chunk=16))


FLOAT32_MEASURES = [("cka", {"route": "gram"}), ("cka_debiased", {"route": "gram"}), ("cka_rbf", {}),
                    ("cka_minibatch", {"batch_size": 16}), ("dcka", {}), ("mutual_knn", {"k": 5})]


@pytest.mark.parametrize("budget", [None, 1])
def test_engine_float32_matches_float64(pair_stores, budget):
    """Every measure that accepts float32 Grams agrees with float64, in core and out of core (budget=1)."""
    kwargs = {"memory_budget": budget} if budget else {}
    exact = Engine(list(pair_stores), device="cpu", **kwargs).run(FLOAT32_MEASURES, [(0, 1)])
    fast = Engine(list(pair_stores), device="cpu", precision="float32", **kwargs).run(FLOAT32_MEASURES, [(0, 1)])
    for e, f in zip(exact, fast, strict=True):
        np.testing.assert_allclose(f.matrix, e.matrix, atol=1e-7, rtol=0, err_msg=e.measure)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_matches_cpu_float64(pair_stores):
    """The float32 scheme on a GPU (TF32 off, as torch's default for matmul) agrees with CPU float64."""
    exact = Engine(list(pair_stores), device="cpu").run(FLOAT32_MEASURES, [(0, 1)])
    fast = Engine(list(pair_stores), device="cuda", precision="float32", memory_budget=4000).run(FLOAT32_MEASURES,
                                                                                                 [(0, 1)])
    for e, f in zip(exact, fast, strict=True):
        np.testing.assert_allclose(f.matrix, e.matrix, atol=1e-7, rtol=0, err_msg=e.measure)


@pytest.mark.parametrize("name", ["procrustes", "cca", "svcca", "linreg"])
def test_spectral_measures_refuse_float32(pair_stores, name):
    engine = Engine(list(pair_stores), device="cpu", precision="float32")
    with pytest.raises(MeasureError, match="--precision float64"):
        engine.run([(name, {})], [(0, 1)])
    assert engine.statistics_computed == 0


def test_float32_nan_names_the_bad_samples(tmp_path):
    """The float32 Gram mixes rows through the column means; the error must still name the bad samples."""
    x = _relu_like(np.random.default_rng(3), 50, 40)
    x[33, 5] = np.nan
    store = write_store(tmp_path / "nan.zarr", "N", {"h": x}, chunk=8)
    with pytest.raises(MeasureError, match="1 sample\\(s\\), between sample 33 and 33"):
        Engine([store], device="cpu", precision="float32").run([("cka", {"route": "gram"})], [(0, 0)])
    with pytest.raises(MeasureError, match="between sample 33 and 33"):
        Engine([store], device="cpu", precision="float32").run([("cka_minibatch", {"batch_size": 10})], [(0, 0)])


def test_float32_overflow_is_an_error_not_inf(tmp_path):
    x = np.full((12, 3), 3e19, dtype=np.float32)
    x[::2] *= -1
    store = write_store(tmp_path / "big.zarr", "B", {"h": x}, chunk=4)
    with pytest.raises(MeasureError, match="overflows in float32 products"):
        Engine([store], device="cpu", precision="float32").run([("cka", {"route": "gram"})], [(0, 0)])


def test_cache_keeps_float32_and_float64_grams_apart(pair_stores, tmp_path):
    cache = StatisticsCache(tmp_path / "cache.zarr")
    measures = [("cka", {"route": "gram"})]
    first = Engine(list(pair_stores), device="cpu", cache=cache, precision="float64")
    first.run(measures, [(0, 1)])
    fast = Engine(list(pair_stores), device="cpu", cache=cache, precision="float32")
    fast.run(measures, [(0, 1)])
    assert first.statistics_computed == 4 and fast.statistics_computed == 4  # nothing reused across precisions
    again = Engine(list(pair_stores), device="cpu", cache=cache, precision="float32")
    again.run(measures, [(0, 1)])
    assert again.statistics_computed == 0
    for s, layers in enumerate(again.layers):
        for layer in layers:
            assert torch.equal(again.gram(s, layer), fast.gram(s, layer))  # a cache hit: the stored bits


def test_cli_precision_flag(pair_stores, tmp_path, capsys):
    paths = [str(s.path) for s in pair_stores]
    out = tmp_path / "out"
    assert pipeline.main(["measure", *paths, "--measures", "cka", "--precision", "float32", "--out", str(out),
                          "--no-plots", "--no-cache", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "float32"
    bad = tmp_path / "bad"
    assert pipeline.main(["measure", *paths, "--measures", "cka", "cca", "--precision", "float32", "--out", str(bad),
                          "--no-cache", "--quiet"]) != 0
    assert "cca needs float64 Gram products" in capsys.readouterr().err
    assert not bad.exists()  # refused before anything was computed or written
