"""Permutation tests and bootstrap intervals (measure.inference): calibration, power, reproducibility, the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from _stores import write_store

from extract.store import ZarrStore
from measure import MEASURES, MeasureError, bootstrap, compare, permutation_test
from measure.engine import Engine
from measure.inference import _take, pair_statistics
from measure.measures.base import statistic_of


def _independent(rng, n, widths):
    return [rng.standard_normal((n, w)) for w in widths]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- permutation test
def test_pvalues_are_uniform_under_the_null_and_the_max_is_calibrated():
    rng = np.random.default_rng(0)
    trials, n_perm = 300, 39
    per_entry, family, smallest = [], [], []
    for t in range(trials):
        xs, ys = _independent(rng, 12, (3, 5)), _independent(rng, 12, (2, 4))
        result = permutation_test(xs, ys, "cka", n_permutations=n_perm, seed=t)
        per_entry.append(result.pvalues[0, 1])
        family.append(result.pvalue_max)
        smallest.append(result.pvalues.min())
    per_entry, family, smallest = np.array(per_entry), np.array(family), np.array(smallest)
    # p-values live on the grid k/40 and are uniform on it under H0
    assert scipy.stats.kstest(per_entry, "uniform").pvalue > 1e-3
    assert 0.03 <= np.mean(per_entry <= 0.1) <= 0.2
    # the max-statistic p-value controls the family-wise error over all four layer pairs
    assert 0.02 <= np.mean(family <= 0.1) <= 0.2
    # while the smallest unadjusted p-value of the four does not
    assert np.mean(smallest <= 0.1) > np.mean(family <= 0.1) + 0.07


def test_pvalues_are_uniform_for_a_spectral_measure():
    rng = np.random.default_rng(1)
    pvalues = [permutation_test(*_independent(rng, 14, (2, 3)), "cca", n_permutations=29, seed=t).pvalues[0, 0]
               for t in range(120)]
    assert scipy.stats.kstest(pvalues, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", ["cka", "cka_debiased", "procrustes", "procrustes_euclidean", "cca", "svcca",
                                  "pwcca", "linreg", "rsa", "mutual_knn"])
def test_pvalues_are_small_for_related_data(name):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 5))
    y = x @ rng.standard_normal((5, 4)) + 0.5 * rng.standard_normal((40, 4))
    options = {"k": 5} if name == "mutual_knn" else {}
    result = permutation_test(x, y, name, n_permutations=99, seed=0, **options)
    assert result.pvalues[0, 0] == pytest.approx(0.01)
    assert result.pvalues_fwer[0, 0] == pytest.approx(0.01)
    assert result.observed[0, 0] == pytest.approx(compare(x, y, name, **options), abs=1e-12)


def test_one_permutation_is_shared_by_every_layer_of_b():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((15, 3)), rng.standard_normal((15, 3))
    result = permutation_test([x], [y, y.copy()], "cka", n_permutations=199, seed=4)
    # identical layers of B see the same permutation in every round, so their p-values agree exactly
    assert result.pvalues[0, 0] == result.pvalues[0, 1]
    lone = permutation_test([x], [y], "cka", n_permutations=199, seed=4)
    assert lone.pvalues[0, 0] == result.pvalues[0, 0]


def test_dcka_permutes_the_confounder_with_b():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((30, 6))
    x = z @ rng.standard_normal((6, 4)) + rng.standard_normal((30, 4))
    y = x @ rng.standard_normal((4, 3)) + 0.3 * rng.standard_normal((30, 3))
    related = permutation_test(x, y, "dcka", confounder=z, n_permutations=49, seed=0)
    assert related.pvalues[0, 0] == pytest.approx(0.02)
    with pytest.raises(MeasureError, match="confounder"):
        permutation_test(x, y, "dcka", n_permutations=9)


def test_permutation_and_bootstrap_are_reproducible_from_the_seed():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 4))
    a = permutation_test(x, y, "procrustes", n_permutations=30, seed=7)
    b = permutation_test(x, y, "procrustes", n_permutations=30, seed=7)
    c = permutation_test(x, y, "procrustes", n_permutations=30, seed=8)
    np.testing.assert_array_equal(a.null_max, b.null_max)
    assert not np.array_equal(a.null_max, c.null_max)
    u = bootstrap(x, y, "cka", n_resamples=20, seed=7)
    v = bootstrap(x, y, "cka", n_resamples=20, seed=7)
    np.testing.assert_array_equal(u.samples, v.samples)


@pytest.mark.parametrize("name", ["procrustes", "cca", "pwcca", "rsa", "mutual_knn"])
def test_permuting_a_prepared_layer_equals_preparing_the_permuted_statistic(name):
    spec = MEASURES[name]
    options = spec.resolve_options({"k": 4} if name == "mutual_knn" else {})
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.standard_normal((18, 5)))
    y = torch.from_numpy(rng.standard_normal((18, 3)))
    rows = [spec.prepare(statistic_of(spec, x, options), **options)]
    stat = statistic_of(spec, y, options)
    index = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    fast = spec.pair_matrix(rows, [spec.prepare(stat, **options).permuted(index)])
    slow = spec.pair_matrix(rows, [spec.prepare(_take(stat, index, spec.statistic), **options)])
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    assert float(slow[0, 0]) == pytest.approx(compare(x, y[index], name, **options), abs=1e-10)


def test_minibatch_measures_are_refused_with_a_reason():
    x = np.random.default_rng(0).standard_normal((16, 3))
    with pytest.raises(MeasureError, match="per-batch Grams"):
        permutation_test(x, x, "cka_minibatch", batch_size=8)
    with pytest.raises(MeasureError, match="n_permutations must be a positive integer"):
        permutation_test(x, x, "cka", n_permutations=0)
    with pytest.raises(MeasureError, match="level must be"):
        bootstrap(x, x, "cka", level=95)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_intervals_cover_the_full_data_value_at_about_the_nominal_rate():
    rng = np.random.default_rng(10)
    population = 20000
    x_all = rng.standard_normal((population, 3)) * np.array([3.0, 1.5, 1.0])
    y_all = x_all @ rng.standard_normal((3, 3)) + 2.0 * rng.standard_normal((population, 3))
    xc, yc = x_all - x_all.mean(0), y_all - y_all.mean(0)
    truth = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    trials, covered = 60, 0
    for t in range(trials):
        pick = rng.choice(population, size=100, replace=False)
        result = bootstrap(x_all[pick], y_all[pick], "cka", n_resamples=150, level=0.9, seed=t)
        covered += int(result.low[0, 0] <= truth <= result.high[0, 0])
    # 90 % nominal; 60 trials give a binomial standard error of about 4 %
    assert 0.75 <= covered / trials <= 0.99


def test_bootstrap_minds_duplicated_samples():
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((60, 4)), rng.standard_normal((60, 4))
    observed = compare(x, y, "mutual_knn", k=5)
    result = bootstrap(x, y, "mutual_knn", n_resamples=40, seed=0, k=5)
    # copies of a sample would be each other's nearest neighbours in both representations (≈ 0.3 inflation)
    assert abs(result.samples.mean() - observed) < 0.05
    rsa = bootstrap(x, y, "rsa", n_resamples=40, seed=0)
    assert abs(rsa.samples.mean() - compare(x, y, "rsa")) < 0.05
    assert np.all(rsa.low <= rsa.high)


# --------------------------------------------------------------------------- stores, engine and CLI
def _zoo(tmp_path, n=24):
    rng = np.random.default_rng(12)
    z = rng.standard_normal((n, 5))
    a = {"h1": z @ rng.standard_normal((5, 6)), "h2": np.tanh(z @ rng.standard_normal((5, 3)))}
    b = {"g1": z @ rng.standard_normal((5, 4)) + 0.2 * rng.standard_normal((n, 4)), "g2": rng.standard_normal((n, 2))}
    paths = [write_store(tmp_path / "a.zarr", "a", a, z, chunk=8, fingerprint="test:stats").path,
             write_store(tmp_path / "b.zarr", "b", b, chunk=8, fingerprint="test:stats").path]
    return paths, a, b, z


def test_engine_statistics_equal_the_in_memory_ones(tmp_path):
    paths, a, b, z = _zoo(tmp_path)
    engine = Engine([ZarrStore(p) for p in paths], device="cpu")
    for name in ("linreg", "rsa", "dcka"):
        got = pair_statistics(engine, name, {}, 0, 1, n_permutations=19, n_resamples=15, seed=3)
        perm = permutation_test(list(a.values()), list(b.values()), name, n_permutations=19, seed=3, confounder=z)
        boot = bootstrap(list(a.values()), list(b.values()), name, n_resamples=15, seed=3, confounder=z)
        # p-values are counts of null ≥ observed: the two paths' ~1e-15 round-off flips one only for a null
        # statistic that close to the observed one, which these seeded data do not have; the bounds get a tolerance
        np.testing.assert_array_equal(got["pvalues"], perm.pvalues)
        np.testing.assert_array_equal(got["pvalues_fwer"], perm.pvalues_fwer)
        np.testing.assert_allclose(got["ci_low"], boot.low, atol=1e-12)
        np.testing.assert_allclose(got["ci_high"], boot.high, atol=1e-12)


def test_cli_writes_pvalues_and_intervals_beside_the_matrices(tmp_path, capsys):
    from measure.report import read_matrix_csv
    from pipeline import main

    paths, a, b, _ = _zoo(tmp_path)
    out = tmp_path / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["measure", *map(str, paths), "--measures", "cka", "linreg", "--out", str(out), "--no-plots",
                     "--quiet", "--permutations", "19", "--bootstrap", "10", "--seed", "5"])
    assert code in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {(e["measure"], e["store_a"], e["store_b"]): e for e in manifest["results"]}
    entry = entries["linreg", "b", "a"]
    files = entry["statistics"]
    assert set(files) >= {"pvalues", "pvalues_fwer", "ci_low", "ci_high"}
    assert entry["statistics_options"]["n_permutations"] == 19 and entry["statistics_options"]["seed"] == 5
    rows, cols, pvalues = read_matrix_csv(out / files["pvalues"])
    assert rows == ["g1", "g2"] and cols == ["h1", "h2"]
    expected = permutation_test(list(b.values()), list(a.values()), "linreg", n_permutations=19, seed=5)
    np.testing.assert_allclose(pvalues, expected.pvalues)
    _, _, low = read_matrix_csv(out / files["ci_low"])
    _, _, high = read_matrix_csv(out / files["ci_high"])
    assert np.all(low <= high)
    assert str(files["pvalues"]).endswith("linreg/b__a.pvalues.csv")


def test_cli_rejects_a_bad_count(tmp_path, capsys):
    from pipeline import main

    paths, *_ = _zoo(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["measure", *map(str, paths), "--permutations", "-3", "--out", str(tmp_path / "r"), "--quiet"])
    assert info.value.code != 0
    assert "error:" in capsys.readouterr().err
