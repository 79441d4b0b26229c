"""``cka_sketch``: the sketch equals its NumPy transcription, is unbiased within its stated variance, its
error falls as 1/√s, it agrees with exact CKA on CNN activations within the stated bound, and the
statistics cache reuses a sketch only for the same size, width and seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from measure_references import ref_cka, ref_cka_sketch, ref_sketch_vectors

from measure import MeasureError, bootstrap, compare, permutation_test
from measure.engine import Engine
from measure.engine.cache import StatisticsCache
from measure.functional import sketch as sk
from measure.functional.sketch import chebyshev_bound, sketch_from_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _low_rank(n: int, p: int, rank: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, p)) + noise * rng.standard_normal((n, p)) + 2.0


def _centred_gram(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    return xc @ xc.T


def _products(stat_a: torch.Tensor, stat_b: torch.Tensor) -> float:
    """½(⟨φ₁(A), φ₂(B)⟩ + ⟨φ₂(A), φ₁(B)⟩): the unnormalised estimate of ⟨K̃_A, K̃_B⟩."""
    s = stat_a.shape[1] - 1
    a, b = stat_a[:, :s], stat_b[:, :s]
    return float(0.5 * (a[0] @ b[1] + a[1] @ b[0]))


# (n, p, width, sketch_size): p > n hashed, p > n unhashed, the direct route and the FFT route, and
# features across a boundary of the seeded hash blocks (HASH_BLOCK = 65,536)
SHAPES = [(20, 50, 16, 512), (24, 60, 64, 4096), (30, 10, 64, 64), (200, 30, 4, 16), (9, 70_000, 16, 256)]


@pytest.mark.parametrize("n,p,width,s", SHAPES)
def test_sketch_equals_its_float64_numpy_transcription(n, p, width, s):
    x = _low_rank(n, p, 3, 0.5, seed=n + p)
    got = sketch_from_features(torch.from_numpy(x), s, width, seed=7)
    phis = ref_sketch_vectors(x, s, width, seed=7)
    scale = max(np.abs(phi).max() for phi in phis)
    for c in (0, 1):
        np.testing.assert_allclose(got[c, :s].numpy(), phis[c], rtol=0, atol=1e-11 * scale)
    if p <= width:  # ‖Z‖²_F of the uncentred Z, here X itself
        assert float(got[0, s]) == pytest.approx(float(np.sum(x**2)), rel=1e-12)
    y = _low_rank(n, p, 3, 1.0, seed=n + p + 1)
    value = compare(x, y, "cka_sketch", sketch_size=s, width=width, seed=7)
    assert value == pytest.approx(ref_cka_sketch(x, y, s, width, 7), abs=1e-10)


def test_both_tensor_sketch_routes_give_the_same_vector():
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((300, 5)))
    buckets, signs = sk.sample_hashes(300, 128, seed=3)
    direct = sk._tensor_sketch_direct(z, buckets, signs, 128)
    old = sk.FFT_BLOCK_ELEMENTS
    sk.FFT_BLOCK_ELEMENTS = 128 * 2  # two columns per FFT block: the blocked sum is exercised too
    try:
        fft = sk.tensor_sketch(z, buckets, signs, 128)  # 300² · 21 > 24 · 5 · 128 · 8: the FFT route
    finally:
        sk.FFT_BLOCK_ELEMENTS = old
    torch.testing.assert_close(fft, direct, atol=1e-10 * float(direct.abs().max()), rtol=0)


@pytest.mark.parametrize("width", [8, 64])  # hashed (p = 30 > 8) and not hashed
def test_products_are_unbiased_within_the_stated_variance(width):
    n, p, s, seeds = 24, 30, 64, 400
    x, y = _low_rank(n, p, 2, 0.7, seed=1), _low_rank(n, p, 2, 0.7, seed=2)
    x[:, :2] += 0.5 * y[:, :2]
    ka, kb = _centred_gram(x), _centred_gram(y)
    exact = {"ab": float(np.sum(ka * kb)), "aa": float(np.sum(ka * ka))}
    unit = math.sqrt(np.sum(ka * ka) * np.sum(kb * kb))
    rank = max(np.trace(k) ** 2 / np.sum(k * k) for k in (ka, kb))
    estimates: dict[str, list[float]] = {"ab": [], "aa": []}
    for seed in range(seeds):
        sa = sketch_from_features(torch.from_numpy(x), s, width, seed)
        sb = sketch_from_features(torch.from_numpy(y), s, width, seed)
        estimates["ab"].append(_products(sa, sb))
        estimates["aa"].append(_products(sa, sa))
    v = 11 / s * ((1 + (1 + rank) / width) ** 2 if width < p else 1) + (4 * (1 + 1 / width) / width if width < p else 0)
    for name, values in estimates.items():
        values = np.array(values)
        scale = unit if name == "ab" else float(np.sum(ka * ka))
        assert values.var() / scale**2 <= v, (name, values.var() / scale**2, v)  # the stated variance holds
        # the mean is within 4 standard errors of the exact product (unbiased)
        assert abs(values.mean() - exact[name]) <= 4 * values.std() / math.sqrt(seeds), name


def test_error_falls_as_one_over_root_s():
    n, p = 48, 20
    x, y = _low_rank(n, p, 4, 1.0, seed=3), _low_rank(n, p, 4, 1.0, seed=4)
    y[:, :4] += x[:, :4]
    exact = ref_cka(x, y)
    rms = []
    for s in (256, 1024, 4096):
        errors = [compare(x, y, "cka_sketch", sketch_size=s, seed=seed) - exact for seed in range(60)]
        rms.append(math.sqrt(np.mean(np.square(errors))))
    for coarse, fine in zip(rms, rms[1:], strict=False):  # 4× the size: half the error (1/√s), within sampling
        assert 1.4 <= coarse / fine <= 2.9, rms


def _cnn_activations(n: int = 256) -> list[np.ndarray]:
    """Four layers of a small random-init CNN on smooth random images (real conv/ReLU/pool structure)."""
    torch.manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.randn(n, 3, 34, 34), 3, stride=1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
    out, x = [], images
    with torch.no_grad():
        for k, module in enumerate(net):
            x = module(x)
            if k in (1, 4, 7, 8):
                out.append(x.reshape(n, -1).double().numpy())
    return out  # widths 16384, 2048, 2048, 128: the first is hashed at the default width


def test_agrees_with_exact_cka_on_cnn_activations_within_the_bound():
    layers = _cnn_activations()
    errors, bounds = [], []
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            x, y = layers[a], layers[b]
            ranks = [np.trace(k) ** 2 / np.sum(k * k) for k in (_centred_gram(x), _centred_gram(y))]
            hashed = max(x.shape[1], y.shape[1]) > sk.DEFAULT_WIDTH
            bounds.append(chebyshev_bound(sk.DEFAULT_SKETCH_SIZE, sk.DEFAULT_WIDTH if hashed else None, max(ranks)))
            errors.append(abs(compare(x, y, "cka_sketch") - ref_cka(x, y)))
    assert all(e <= bound for e, bound in zip(errors, bounds, strict=True)), (errors, bounds)
    assert max(errors) <= 0.02, errors  # the measured spread is far inside the bound (benchmarks/README.md)


def _stores(tmp_path, write_store):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((40, 3))
    layers = [{"wide": z @ rng.standard_normal((3, 90)) + rng.standard_normal((40, 90)),
               "narrow": z @ rng.standard_normal((3, 6)) + 0.3 * rng.standard_normal((40, 6))} for _ in range(3)]
    return [write_store(tmp_path / f"m{k}.zarr", f"m{k}", layer, chunk=7) for k, layer in enumerate(layers)], layers


def test_streamed_from_chunked_stores_equals_in_memory_with_hashing(tmp_path, write_store):
    stores, layers = _stores(tmp_path, write_store)
    options = {"sketch_size": 512, "width": 32, "seed": 4}
    result = Engine(stores, device="cpu").run([("cka_sketch", options)], [(0, 2)])[0]
    for i, a in enumerate(result.rows):
        for j, b in enumerate(result.cols):
            expected = ref_cka_sketch(layers[0][a], layers[2][b], **options)
            assert result.matrix[i, j] == pytest.approx(expected, abs=1e-10)
    marked = result.extras["approximate"]
    assert (marked["sketch_size"], marked["width"], marked["seed"]) == (512, 32, 4)
    assert marked["std"] == pytest.approx(512**-0.5)
    assert marked["bound_95"] is None  # the Chebyshev bound exceeds 1 at s = 512: no information, not written


def test_cache_reuses_a_sketch_and_keys_its_size_width_and_seed(tmp_path, write_store):
    stores, _ = _stores(tmp_path, write_store)
    cache = StatisticsCache(tmp_path / "cache.zarr")
    pairs = [(i, j) for i in range(3) for j in range(3)]
    options = {"sketch_size": 256, "width": 32, "seed": 1}

    def run(**changed):
        engine = Engine(stores, device="cpu", cache=cache)
        results = engine.run([("cka_sketch", {**options, **changed})], pairs)
        return engine, {(r.store_a, r.store_b): r.matrix for r in results}

    first, values = run()
    assert first.statistics_computed == 6 and first.layer_statistics.reused == 0
    again, same = run()
    assert again.statistics_computed == 0 and again.layer_statistics.reused == 6
    assert all(np.array_equal(values[k], same[k], equal_nan=True) for k in values)
    for changed in ({"seed": 2}, {"sketch_size": 512}, {"width": 16}):
        other, differing = run(**changed)
        assert other.statistics_computed == 6 and other.layer_statistics.reused == 0, changed  # not served
        assert not np.allclose(values[("m0", "m1")], differing[("m0", "m1")]), changed
    key = {"sketch_size": 256, "width": 32, "seed": 1}
    store = first.stores[0]
    assert cache.contains(store, "wide", "sketch", key)
    assert not cache.contains(store, "wide", "sketch", {**key, "seed": 3})


def test_identity_symmetry_and_range():
    x, y = _low_rank(30, 80, 3, 1.0, seed=8), _low_rank(30, 40, 3, 1.0, seed=9)
    assert compare(x, x, "cka_sketch", width=16) == pytest.approx(1.0, abs=1e-12)
    forward = compare(x, y, "cka_sketch", width=16, sketch_size=128)
    assert forward == pytest.approx(compare(y, x, "cka_sketch", width=16, sketch_size=128), abs=1e-12)
    values = [compare(x, _low_rank(30, 5, 1, 1.0, seed=s), "cka_sketch", sketch_size=16, seed=s) for s in range(30)]
    assert all(0.0 <= v <= 1.0 for v in values)


def test_options_and_unsupported_uses_are_refused():
    x, y = _low_rank(20, 6, 2, 1.0, seed=10), _low_rank(20, 6, 2, 1.0, seed=11)
    with pytest.raises(MeasureError, match="sketch_size must be an integer ≥ 16"):
        compare(x, y, "cka_sketch", sketch_size=8)
    with pytest.raises(MeasureError, match="seed must be a non-negative integer"):
        compare(x, y, "cka_sketch", seed=-1)
    with pytest.raises(MeasureError, match="width must be a positive integer"):
        compare(x, y, "cka_sketch", width=0)
    with pytest.raises(MeasureError, match="cannot be permuted"):
        permutation_test(x, y, "cka_sketch", n_permutations=9)
    with pytest.raises(MeasureError, match="cannot be permuted"):
        bootstrap(x, y, "cka_sketch", n_resamples=9)


def test_constant_layer_is_undefined():
    x = np.ones((20, 6))
    with pytest.raises(MeasureError, match="constant"):
        compare(x, _low_rank(20, 6, 2, 1.0, seed=12), "cka_sketch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_gives_the_cpu_sketch(tmp_path, write_store):
    stores, _ = _stores(tmp_path, write_store)
    options = {"sketch_size": 1024, "width": 32, "seed": 0}
    cpu = Engine(stores, device="cpu").run([("cka_sketch", options)], [(0, 1)])[0].matrix
    gpu = Engine(stores, device="cuda").run([("cka_sketch", options)], [(0, 1)])[0].matrix
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-10)


def test_a_nan_in_a_stored_layer_is_named_by_its_sample(tmp_path, write_store):
    x = _low_rank(30, 50, 2, 1.0, seed=13)
    x[17, 41] = np.nan
    stores = [write_store(tmp_path / "a.zarr", "a", {"l": x}, chunk=7),
              write_store(tmp_path / "b.zarr", "b", {"l": _low_rank(30, 50, 2, 1.0, seed=14)}, chunk=7)]
    for width in (8, 64):  # hashed and not
        with pytest.raises(MeasureError, match="NaN or Inf in 1 sample.*between sample 17 and 17"):
            Engine(stores, device="cpu").run([("cka_sketch", {"width": width, "sketch_size": 64})], [(0, 1)])
