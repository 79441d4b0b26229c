"""Procrustes, CCA/SVCCA/PWCCA, linear regression, RSA and mutual k-NN against float64 NumPy/SciPy transcriptions."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from _stores import write_store
from measure_references import (
    ref_cca_rhos,
    ref_linreg,
    ref_mutual_knn,
    ref_procrustes,
    ref_pwcca,
    ref_rsa,
    ref_svcca,
)

import measure
from extract.store import ZarrStore
from measure import MEASURES, MeasureError, compare
from measure.engine import Engine

# (n, p, q): p < n, q < n; mixed; p > n and q > n
SHAPES = [(60, 5, 8), (45, 12, 3), (25, 40, 30)]
EPS = np.finfo(np.float64).eps


def _data(n, p, q, seed=0, coupling=1.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, p)) + rng.standard_normal((n, p)) + 3.0
    y = coupling * z @ rng.standard_normal((4, q)) + rng.standard_normal((n, q)) - 1.0
    return x, y


def _center(x):
    return x - x.mean(axis=0)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("n,p,q", SHAPES)
def test_procrustes_matches_numpy(n, p, q):
    x, y = _data(n, p, q)
    s = ref_procrustes(x, y)
    assert compare(x, y, "procrustes") == pytest.approx(s, abs=1e-9)
    assert compare(x, y, "procrustes_euclidean") == pytest.approx(math.sqrt(2 - 2 * s), abs=1e-8)
    assert compare(x, y, "procrustes_angular") == pytest.approx(math.acos(s), abs=1e-8)
    assert measure.procrustes(x, y, output="angular") == pytest.approx(math.acos(s), abs=1e-8)


@pytest.mark.parametrize("n,p,q", SHAPES)
def test_cca_family_matches_numpy(n, p, q):
    x, y = _data(n, p, q)
    rho = ref_cca_rhos(x, y)
    saturated = max(p, q) >= n - 1
    forced = min(p, n - 1) + min(q, n - 1) > n - 1
    ctx = pytest.warns(UserWarning, match="svcca") if forced else warnings.catch_warnings()
    with ctx:
        value = compare(x, y, "cca")
    assert value == pytest.approx(rho.mean(), abs=1e-8)
    if saturated:
        assert value == pytest.approx(1.0, abs=1e-8)  # the documented degenerate regime
    assert _quiet(compare, x, y, "cca", output="r2") == pytest.approx(np.mean(rho**2), abs=1e-8)
    assert _quiet(compare, x, y, "svcca") == pytest.approx(ref_svcca(x, y), abs=1e-8)
    assert _quiet(compare, x, y, "svcca", variance=0.6) == pytest.approx(ref_svcca(x, y, 0.6), abs=1e-8)
    assert _quiet(compare, x, y, "pwcca") == pytest.approx(ref_pwcca(x, y), abs=1e-8)
    assert _quiet(compare, y, x, "pwcca") == pytest.approx(ref_pwcca(y, x), abs=1e-8)


def test_svcca_dims_caps_the_components():
    x, y = _data(80, 10, 10, seed=3)
    ux = np.linalg.svd(_center(x), full_matrices=False)[0]
    uy = np.linalg.svd(_center(y), full_matrices=False)[0]
    expected = np.linalg.svd(ux[:, :3].T @ uy[:, :3], compute_uv=False).mean()
    assert compare(x, y, "svcca", dims=3) == pytest.approx(expected, abs=1e-9)
    assert measure.svcca(x, y, dims=3) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("n,p,q", SHAPES)
def test_linreg_matches_least_squares(n, p, q):
    x, y = _data(n, p, q)
    assert _quiet(compare, x, y, "linreg") == pytest.approx(ref_linreg(x, y), abs=1e-8)
    assert _quiet(compare, y, x, "linreg") == pytest.approx(ref_linreg(y, x), abs=1e-8)


@pytest.mark.parametrize("n,p,q", SHAPES)
@pytest.mark.parametrize("rdm", ["correlation", "euclidean"])
@pytest.mark.parametrize("how", ["spearman", "pearson"])
def test_rsa_matches_scipy(n, p, q, rdm, how):
    x, y = _data(n, p, q)
    assert compare(x, y, "rsa", rdm=rdm, compare=how) == pytest.approx(ref_rsa(x, y, rdm, how), abs=1e-9)


def test_rsa_spearman_handles_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(20, 2)).astype(float)  # many equal distances
    y = rng.integers(0, 3, size=(20, 2)).astype(float)
    assert compare(x, y, "rsa", rdm="euclidean") == pytest.approx(ref_rsa(x, y, "euclidean"), abs=1e-12)


@pytest.mark.parametrize("n,p,q", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_numpy(n, p, q, k):
    x, y = _data(n, p, q, coupling=3.0)
    assert compare(x, y, "mutual_knn", k=k) == pytest.approx(ref_mutual_knn(x, y, k), abs=1e-12)


# --------------------------------------------------------------------------- invariances and symmetry
def _orthogonal(p, seed):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))[0]


def test_cca_invariant_to_invertible_maps():
    x, y = _data(70, 6, 5, seed=4)
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    b = rng.standard_normal((5, 5)) + 3 * np.eye(5)
    for name in ("cca", "svcca"):
        opts = {"variance": 1.0} if name == "svcca" else {}
        base = compare(x, y, name, **opts)
        assert compare(x @ a + 7, y @ b - 2, name, **opts) == pytest.approx(base, abs=1e-9)
    assert compare(x @ a + 7, y @ b, "pwcca") == pytest.approx(ref_pwcca(x @ a + 7, y @ b), abs=1e-9)
    assert compare(x, x @ a, "cca") == pytest.approx(1.0, abs=1e-9)


def test_procrustes_invariances():
    x, y = _data(50, 7, 7, seed=6)
    q = _orthogonal(7, 1)
    base = compare(x, y, "procrustes")
    assert compare(2.5 * x @ q + 4, y, "procrustes") == pytest.approx(base, abs=1e-10)
    assert compare(x, 0.1 * y @ q, "procrustes") == pytest.approx(base, abs=1e-10)
    assert compare(x, 3 * x @ q - 1, "procrustes") == pytest.approx(1.0, abs=1e-10)
    assert compare(x, 3 * x @ q - 1, "procrustes_euclidean") == pytest.approx(0.0, abs=1e-6)
    assert compare(x, 3 * x @ q - 1, "procrustes_angular") == pytest.approx(0.0, abs=1e-6)
    # not invariant to a general linear map (unlike CCA)
    skew = np.diag([1, 1, 1, 1, 1, 1, 20.0])
    assert abs(compare(x @ skew, y, "procrustes") - base) > 1e-3
    # the angular distance is a metric: triangle inequality on random triples
    z = np.random.default_rng(2).standard_normal((50, 4))
    d = {(a, b): compare(u, v, "procrustes_angular") for a, u in enumerate((x, y, z)) for b, v in enumerate((x, y, z))}
    for a, b, c in [(0, 1, 2), (1, 2, 0), (2, 0, 1)]:
        assert d[a, c] <= d[a, b] + d[b, c] + 1e-9


def test_rsa_and_knn_invariances():
    x, y = _data(40, 6, 6, seed=7)
    q = _orthogonal(6, 3)
    assert compare(x, 5 * x @ q, "rsa", rdm="euclidean", compare="pearson") == pytest.approx(1.0, abs=1e-12)
    assert compare(x, 5 * x @ q, "mutual_knn", k=5) == pytest.approx(1.0, abs=1e-12)  # cosine: no centring
    assert compare(x, x + 3, "rsa") == pytest.approx(1.0, abs=1e-12)  # a Euclidean RDM, not cosine


@pytest.mark.parametrize("name", ["procrustes", "procrustes_euclidean", "procrustes_angular", "cca", "svcca",
                                  "rsa", "mutual_knn"])
def test_symmetric_measures(name):
    x, y = _data(40, 7, 3, seed=8)
    assert MEASURES[name].symmetric
    assert compare(x, y, name) == pytest.approx(compare(y, x, name), abs=1e-10)
    self_value = compare(x, x, name)
    if MEASURES[name].kind == "distance":
        assert self_value == pytest.approx(0.0, abs=1e-6)
    else:
        assert self_value == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("name", ["pwcca", "linreg"])
def test_asymmetric_measures(name):
    rng = np.random.default_rng(9)
    y = rng.standard_normal((60, 8))
    x = y[:, :2] @ rng.standard_normal((2, 5)) + 0.3 * rng.standard_normal((60, 5))
    assert not MEASURES[name].symmetric
    assert abs(compare(x, y, name) - compare(y, x, name)) > 0.05
    if name == "linreg":  # x is (nearly) a function of y, not the reverse
        assert compare(x, y, name) > 0.9 > compare(y, x, name)
    assert compare(x, x, name) == pytest.approx(1.0, abs=1e-10)


def test_cca_warns_when_features_reach_samples():
    x, y = _data(20, 30, 3)
    with pytest.warns(UserWarning, match=r"features ≥ samples.*at least 3 canonical.*svcca"):
        assert compare(x, y, "cca") == pytest.approx(1.0, abs=1e-9)
    u, v = _data(20, 12, 10)  # neither layer saturates, but 12 + 10 > 19: 3 correlations are forced to 1
    with pytest.warns(UserWarning, match="at least 3 canonical correlations are 1"):
        assert np.sum(ref_cca_rhos(u, v) > 1 - 1e-9) >= 3
        compare(u, v, "pwcca")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(x, y, "svcca", dims=5)  # the cure: no warning
    with pytest.warns(UserWarning, match="predicts any other layer exactly"):
        assert compare(y, x, "linreg") == pytest.approx(1.0, abs=1e-9)  # x (30 features) predicts anything


def test_independent_data_is_low_for_every_measure():
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((150, 4)), rng.standard_normal((150, 4))
    for name, bound in [("procrustes", 0.25), ("cca", 0.25), ("svcca", 0.25), ("pwcca", 0.25), ("linreg", 0.1),
                        ("rsa", 0.1), ("mutual_knn", 0.11)]:
        assert abs(compare(x, y, name)) < bound, name


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,options,match", [
    ("procrustes", {"output": "euclidean"}, "Unknown option"),
    ("cca", {"output": "r3"}, "output must be"),
    ("svcca", {"variance": 1.5}, "variance must be"),
    ("svcca", {"dims": -1}, "dims must be"),
    ("rsa", {"rdm": "cosine"}, "rdm must be"),
    ("rsa", {"compare": "kendall"}, "compare must be"),
    ("mutual_knn", {"k": 0}, "k must be a positive"),
    ("mutual_knn", {"k": 40}, "choose k ≤ 29"),
])
def test_bad_options_have_clear_errors(name, options, match):
    x, y = _data(30, 4, 4)
    with pytest.raises(MeasureError, match=match):
        compare(x, y, name, **options)


def test_constant_layer_is_undefined():
    x, _ = _data(30, 4, 4)
    const = np.ones((30, 3))
    for name in ("procrustes", "cca", "linreg", "rsa"):
        with pytest.raises(MeasureError, match="undefined|constant|same value"):
            compare(x, const, name)


# --------------------------------------------------------------------------- the engine path
def test_engine_on_disk_equals_compare(tmp_path):
    n = 36
    rng = np.random.default_rng(11)
    z = rng.standard_normal((n, 3))
    models = {
        "a": {"l1": z @ rng.standard_normal((3, 5)) + rng.standard_normal((n, 5)),
              "l2": rng.standard_normal((n, 2, 2, 2)), "l3": rng.standard_normal((n, 50))},
        "b": {"m1": z @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((n, 4)),
              "m2": np.tanh(z @ rng.standard_normal((3, 9)))},
    }
    paths = [write_store(tmp_path / f"{m}.zarr", m, layers, chunk=10, fingerprint="test:family").path
             for m, layers in models.items()]
    engine = Engine([ZarrStore(p) for p in paths], device="cpu")
    names = ["procrustes", "procrustes_angular", "cca", "svcca", "pwcca", "linreg", "rsa", "mutual_knn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # l3 has more features than samples
        results = engine.run([(m, {"k": 4} if m == "mutual_knn" else {}) for m in names], [(0, 1), (1, 0), (0, 0)])
        for r in results:
            a, b = models[r.store_a], models[r.store_b]
            expected = np.array([[compare(a[i], b[j], r.measure, **r.options) for j in r.cols] for i in r.rows])
            np.testing.assert_allclose(r.matrix, expected, atol=1e-10, err_msg=r.measure)
    # asymmetric measures give different (transposed-unequal) matrices for (a, b) and (b, a)
    lin = {(r.store_a, r.store_b): r.matrix for r in results if r.measure == "linreg"}
    assert not np.allclose(lin["a", "b"], lin["b", "a"].T)


def test_classes_use_the_registry_entries():
    from measure import CCA, PWCCA, RSA, SVCCA, LinearRegression, MutualKNN, Procrustes

    assert (CCA.measure, SVCCA.measure, PWCCA.measure) == ("cca", "svcca", "pwcca")
    assert (LinearRegression.measure, RSA.measure, MutualKNN.measure) == ("linreg", "rsa", "mutual_knn")
    assert Procrustes.measure == "procrustes"
    torch.manual_seed(0)
    from extract import SimilarityModel

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    sim = SimilarityModel(net, model_name="mlp", layers_to_include=["0", "2"])
    twin = SimilarityModel(copy.deepcopy(net), model_name="twin", layers_to_include=["0", "2"])
    data = [torch.randn(16, 4) for _ in range(3)]
    proc = Procrustes(sim, twin, device="cpu", output="angular")
    assert proc.measure == "procrustes_angular"
    matrix = proc.compute(data)
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 0, atol=1e-6)
    knn = MutualKNN(sim, twin, device="cpu", k=3).compute(data)
    np.testing.assert_allclose(np.diag(knn), 1.0)
    # feature-statistic measures go through the same in-memory engine; the asymmetric one keeps its orientation
    torch.nn.init.normal_(twin.model[0].weight)
    acts = {m: [torch.cat([m.model[: int(layer) + 1](b) for b in data]).detach().numpy() for layer in ("0", "2")]
            for m in (sim, twin)}
    pw = PWCCA(sim, twin, device="cpu").compute(data)
    expected = [[compare(a, b, "pwcca") for b in acts[twin]] for a in acts[sim]]
    np.testing.assert_allclose(pw, expected, atol=1e-6)
    rsa = RSA(sim, twin, device="cpu", rdm="euclidean").compute(data)
    np.testing.assert_allclose(rsa, [[compare(a, b, "rsa", rdm="euclidean") for b in acts[twin]] for a in acts[sim]],
                               atol=1e-6)
    with pytest.raises(MeasureError, match="output must be"):
        Procrustes(sim, sim, output="cosine")


def test_one_decomposition_per_gram_is_shared_by_the_spectral_measures():
    from measure.functional._spectral import spectral_prepare
    from measure.functional.gram import linear_gram

    x, _ = _data(30, 6, 2)
    gram = linear_gram(torch.from_numpy(x))
    first = spectral_prepare(gram)
    second = MEASURES["linreg"].prepare(gram)
    assert second.basis is first.basis  # reused, not recomputed
    gram.mul_(4)  # an in-place change invalidates it
    third = spectral_prepare(gram)
    assert third.basis is not first.basis
    torch.testing.assert_close(third.eigenvalues, 4 * first.eigenvalues)
    assert MEASURES["cca"].prepare(gram, output="r2").output == "r2" and spectral_prepare(gram).output == ""
