"""Accumulators: k-chunk updates and merges reproduce the one-shot (functional, Gram-route) values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from measure import MeasureError, compare
from measure.accumulators import Accumulator, LinearCKA, LinearCKAMatrix, choose_route


def _layers(n: int, widths: list[int], seed: int, mean: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    return [np.maximum(base @ rng.normal(size=(4, p)), 0) + 0.5 * rng.normal(size=(n, p)) + mean for p in widths]


def _expected(xs, ys, name):
    return np.array([[compare(x, y, name, route="gram") for y in ys] for x in xs])


@pytest.mark.parametrize("n,widths_a,widths_b", [(30, [3, 50], [7]), (25, [40], [2, 9, 60]), (60, [5, 5], [5, 80])])
@pytest.mark.parametrize("k", [1, 2, 5, 13])
def test_k_chunk_updates_equal_the_gram_route(n, widths_a, widths_b, k):
    xs, ys = _layers(n, widths_a, 0, mean=2.0), _layers(n, widths_b, 1, mean=-3.0)
    acc = LinearCKAMatrix()
    for rows in np.array_split(np.arange(n), k):
        acc.update([x[rows] for x in xs], [torch.from_numpy(y[rows]) for y in ys])
    assert acc.update_count == k
    out = acc.compute()
    np.testing.assert_allclose(out["cka"].numpy(), _expected(xs, ys, "cka"), atol=1e-10, rtol=0)
    np.testing.assert_allclose(out["cka_debiased"].numpy(), _expected(xs, ys, "cka_debiased"), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shift", ["first", "none"])
def test_merged_accumulators_equal_one_fed_everything(shift):
    n = 48
    xs, ys = _layers(n, [6, 30], 2, mean=5.0), _layers(n, [11], 3)
    whole = LinearCKAMatrix(shift=shift)
    whole.update(xs, ys)
    shards = []
    for rows in (np.arange(0, 5), np.arange(5, 30), np.arange(30, 48)):
        shard = LinearCKAMatrix(shift=shift)  # each picks its own shift from its first chunk
        for part in np.array_split(rows, 2):
            shard.update([x[part] for x in xs], [y[part] for y in ys])
        shards.append(shard)
    merged = shards[2].merge(shards[0]).merge(shards[1])
    assert merged.update_count == 6
    a, b = merged.compute(), whole.compute()
    for key in ("cka", "cka_debiased"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-10, rtol=0)
        np.testing.assert_allclose(a[key].numpy(), _expected(xs, ys, key), atol=1e-10, rtol=0)
    assert a["n_samples"] == n


def test_merge_into_an_empty_accumulator_and_of_an_empty_one():
    xs, ys = _layers(20, [4], 4), _layers(20, [5], 5)
    full = LinearCKAMatrix()
    full.update(xs, ys)
    empty = LinearCKAMatrix()
    empty.merge(full)
    assert float(empty.compute()["cka"][0, 0]) == pytest.approx(float(full.compute()["cka"][0, 0]), abs=1e-15)
    full.merge(LinearCKAMatrix())
    assert float(full.compute()["cka"][0, 0]) == pytest.approx(compare(xs[0], ys[0], "cka"), abs=1e-12)


def test_shift_keeps_digits_for_large_means():
    n = 40
    xs, ys = _layers(n, [8], 6, mean=0.0), _layers(n, [9], 7, mean=0.0)
    exact = compare(xs[0], ys[0], "cka_debiased", route="gram")
    far = [xs[0] + 1e5], [ys[0] - 1e5]
    shifted = LinearCKA(debiased=True)
    for rows in np.array_split(np.arange(n), 4):
        shifted.update(far[0][0][rows], far[1][0][rows])
    assert shifted.compute() == pytest.approx(exact, abs=1e-9)


def test_pair_accumulator_and_its_doctest_values():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(33, 6)), rng.normal(size=(33, 40))
    for debiased, name in ((False, "cka"), (True, "cka_debiased")):
        acc = LinearCKA(debiased=debiased)
        for rows in np.array_split(np.arange(33), 3):
            acc.update(x[rows], y[rows])
        assert acc.compute() == pytest.approx(compare(x, y, name), abs=1e-10)


def test_compute_cache_reset_and_warning():
    x, y = _layers(12, [3], 9)[0], _layers(12, [4], 10)[0]
    acc = LinearCKA()
    with pytest.warns(UserWarning, match="before any update"), pytest.raises(MeasureError, match="Nothing"):
        acc.compute()
    acc.update(x[:6], y[:6])
    first = acc.compute()
    assert acc.compute() is first  # cached
    acc.update(x[6:], y[6:])
    assert acc.compute() == pytest.approx(compare(x, y, "cka"), abs=1e-12)
    acc.reset()
    assert acc.update_count == 0 and acc.stats is None
    acc.update(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.compute() == pytest.approx(compare(x, y, "cka"), abs=1e-12)


def test_accumulator_errors():
    x, y = _layers(12, [3], 9)[0], _layers(12, [4], 10)[0]
    acc = LinearCKAMatrix()
    acc.update([x], [y])
    with pytest.raises(MeasureError, match="widths changed"):
        acc.update([x[:, :2]], [y])
    other = LinearCKAMatrix()
    other.update([x, x], [y])
    with pytest.raises(MeasureError, match="different layer widths"):
        acc.merge(other)
    with pytest.raises(TypeError, match="Cannot merge a LinearCKA into a LinearCKAMatrix"):
        acc.merge(LinearCKA())
    with pytest.raises(MeasureError, match="same samples"):
        acc.update([x], [y[:5]])
    with pytest.raises(MeasureError, match=r"is on meta .* states are on cpu.*\.to\('meta'\)"):
        acc.update([torch.empty(12, 3, device="meta")], [y])
    with pytest.raises(MeasureError, match="shift must be"):
        LinearCKAMatrix(shift="mean")
    small = LinearCKA(debiased=True)
    small.update(x[:3], y[:3])
    with pytest.raises(MeasureError, match="at least 4 samples"):
        small.compute()


class _Mean(Accumulator):
    """A running mean kept as (count, mean) and merged with the parallel formula: exercises callable rules."""

    def __init__(self, tag: str = "a") -> None:
        super().__init__()
        self.add_state("count_mean", (0, 0.0), merge=self._combine)
        self.add_state("total", 0.0, merge="sum")
        self.add_state("tag", tag, merge="equal")

    @staticmethod
    def _combine(a, b):
        n = a[0] + b[0]
        return (n, a[1] + (b[1] - a[1]) * b[0] / n if n else 0.0)

    def _update(self, values):
        self.count_mean = self._combine(self.count_mean, (len(values), float(np.mean(values))))
        self.total += float(np.sum(values))

    def _compute(self):
        return self.count_mean[1]


def test_base_class_merge_rules():
    a, b = _Mean(), _Mean()
    a.update([1.0, 2.0])
    b.update([3.0, 4.0, 5.0])
    b.update([6.0])
    a.merge(b)
    assert a.compute() == pytest.approx(3.5)
    assert a.total == pytest.approx(21.0)
    assert a.update_count == 3
    with pytest.raises(MeasureError, match="configuration differs"):
        a.merge(_Mean(tag="b"))
    with pytest.raises(ValueError, match="merge must be one of"):
        a.add_state("bad", 0, merge="max")


def test_route_rule():
    assert choose_route("gram", 10**6, [3], [3]) == "gram"
    assert choose_route("features", 10, [10**4], [10**4]) == "features"
    assert choose_route("auto", 540, [1024, 512, 64], [1024, 512, 64]) == "gram"  # S_f ≈ 5e6 > S_g / 16
    assert choose_route("auto", 5000, [64, 10], [64, 10]) == "features"  # narrow layers, many samples
    assert choose_route("auto", 20000, [2000], [2000]) == "features"  # n > 8192 and S_f ≤ S_g
    assert choose_route("auto", 20000, [50000], [50000]) == "gram"  # the features would be larger still
    wide = [1024, 1024, 64]  # the sweep of benchmarks/bench_features.py: features are faster from n ≈ 2,600
    assert choose_route("auto", 2048, wide, wide) == "gram" and choose_route("auto", 4096, wide, wide) == "features"
    assert choose_route("auto", 4096, wide, wide, grams_formed=True) == "gram"  # another measure forms them
    with pytest.raises(MeasureError, match="route must be"):
        choose_route("fastest", 10, [1], [1])


def test_docstring_examples():
    import doctest
    import importlib

    for name in ("measure.accumulators.cka", "measure.functional.cka", "measure.comparison", "measure.validation"):
        module = importlib.import_module(name)  # (the package re-exports functions named cka and compare)
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, name


def test_compare_auto_route_takes_features_for_many_samples_and_few_features(monkeypatch):
    import importlib

    compare_module = importlib.import_module("measure.comparison")
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(3000, 4)), rng.normal(size=(3000, 3))
    y[:, 0] += x[:, 0]
    calls = []
    original = compare_module._compare_features
    monkeypatch.setattr(compare_module, "_compare_features", lambda *a: calls.append(a[0].name) or original(*a))
    for name in ("cka", "cka_debiased"):
        auto = compare(x, y, name)
        assert auto == pytest.approx(compare(x, y, name, route="gram"), abs=1e-10)
    assert calls == ["cka", "cka_debiased"]
