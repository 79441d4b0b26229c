"""The CKA family and dCKA against direct float64 NumPy transcriptions of their formulas (DESIGN.md §4).

The references (``measure_references``) build the centering matrix H explicitly and follow the
papers' formulas literally; the library never forms H, streams, and uses other algebra, so
agreement to 1e-10 is evidence that both are right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from measure_references import (
    ref_cka,
    ref_cka_debiased,
    ref_cka_minibatch,
    ref_cka_rbf,
    ref_dcka,
    ref_hsic_unbiased,
    unit_gram,
)

from measure import MeasureError, cka, cka_debiased, cka_minibatch, cka_rbf, compare, dcka

# ----------------------------------------------------------------------------- data

SHAPES = [(12, 5, 7), (40, 100, 30), (64, 20, 300), (30, 30, 1)]


def _data(kind: str, n: int, p: int, q: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.normal(size=(n, p))
        y = rng.normal(size=(n, q))
        z = rng.normal(size=(n, 6))
    else:  # structured: y a nonlinear function of x, low-rank inputs, non-zero means
        z = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 6)) + 2.0
        x = np.maximum(z @ rng.normal(size=(6, p)), 0) + 0.1 * rng.normal(size=(n, p)) + 3.0
        y = np.tanh(x @ rng.normal(size=(p, q)) / np.sqrt(p)) + 0.2 * rng.normal(size=(n, q)) - 1.0
    return x, y, z


CASES = [(kind, *shape) for kind in ("random", "structured") for shape in SHAPES]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind,n,p,q", CASES)
def test_linear_cka_both_routes_match_reference(kind, n, p, q):
    x, y, _ = _data(kind, n, p, q)
    expected = ref_cka(x, y)
    assert compare(x, y, "cka", route="gram") == pytest.approx(expected, abs=1e-10)
    assert compare(x, y, "cka", route="features") == pytest.approx(expected, abs=1e-10)
    assert cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("kind,n,p,q", CASES)
def test_debiased_cka_both_routes_match_reference(kind, n, p, q):
    x, y, _ = _data(kind, n, p, q)
    expected = ref_cka_debiased(x, y)
    assert compare(x, y, "cka_debiased", route="gram") == pytest.approx(expected, abs=1e-10)
    assert compare(x, y, "cka_debiased", route="features") == pytest.approx(expected, abs=1e-10)
    assert cka_debiased(x, y) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.8])
@pytest.mark.parametrize("kind,n,p,q", CASES[:3] + CASES[4:7])
def test_rbf_cka_matches_reference(kind, n, p, q, threshold):
    x, y, _ = _data(kind, n, p, q)
    expected = ref_cka_rbf(x, y, threshold)
    assert compare(x, y, "cka_rbf", threshold=threshold) == pytest.approx(expected, abs=1e-10)
    assert cka_rbf(x, y, threshold) == pytest.approx(expected, abs=1e-10)


def test_rbf_default_threshold_is_kornblith_04():
    x, y, _ = _data("structured", 40, 10, 12)
    assert compare(x, y, "cka_rbf") == pytest.approx(ref_cka_rbf(x, y, 0.4), abs=1e-10)
    assert compare(x, y, "cka_rbf") != pytest.approx(ref_cka_rbf(x, y, 0.8), abs=1e-6)


@pytest.mark.parametrize("batch_size", [4, 7, 11])
@pytest.mark.parametrize("kind,n,p,q", CASES[:3] + CASES[4:7])
def test_minibatch_cka_matches_reference(kind, n, p, q, batch_size):
    x, y, _ = _data(kind, n, p, q)
    expected = ref_cka_minibatch(x, y, batch_size)
    with pytest.warns(UserWarning, match="do not fill a batch") if n % batch_size else _nothing():
        got = compare(x, y, "cka_minibatch", batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-10)
    assert cka_minibatch(x, y, batch_size) == pytest.approx(expected, abs=1e-10)


def test_minibatch_is_not_the_mean_of_per_batch_cka():
    x, y, _ = _data("structured", 64, 20, 30)
    mean_of_batches = np.mean([ref_cka_debiased(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    got = compare(x, y, "cka_minibatch", batch_size=16)
    assert got == pytest.approx(ref_cka_minibatch(x, y, 16), abs=1e-10)
    assert abs(got - mean_of_batches) > 1e-4


@pytest.mark.parametrize("psd", [False, True])
@pytest.mark.parametrize("kind,n,p,q", CASES[:3] + CASES[4:7])
def test_dcka_matches_reference(kind, n, p, q, psd):
    x, y, z = _data(kind, n, p, q)
    expected = ref_dcka(x, y, z, psd)
    assert compare(x, y, "dcka", confounder=z, psd=psd) == pytest.approx(expected, abs=1e-10)
    assert dcka(x, y, z, psd=psd) == pytest.approx(expected, abs=1e-10)


def test_dcka_psd_option_changes_the_value():
    x, y, z = _data("structured", 40, 100, 30)
    assert compare(x, y, "dcka", confounder=z, psd=True) != pytest.approx(
        compare(x, y, "dcka", confounder=z, psd=False), abs=1e-6)


@pytest.mark.parametrize("name,options", [
    ("cka", {}), ("cka_debiased", {}), ("cka_rbf", {}), ("cka_minibatch", {"batch_size": 10}), ("dcka", {}),
])
@pytest.mark.parametrize("n,p,q", [(40, 100, 30), (50, 8, 12)])
def test_float32_inputs_within_1e5(name, options, n, p, q):
    x, y, z = _data("structured", n, p, q, seed=3)
    kwargs = {"confounder": z} if name == "dcka" else {}
    exact = compare(x, y, name, **kwargs, **options)
    f32 = compare(x.astype(np.float32), torch.from_numpy(y.astype(np.float32)), name,
                  **({"confounder": z.astype(np.float32)} if name == "dcka" else {}), **options)
    assert f32 == pytest.approx(exact, abs=1e-5)


# ----------------------------------------------------------------------------- properties


def _orthogonal(p: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return q


@pytest.mark.parametrize("name,options", [
    ("cka", {"route": "gram"}), ("cka", {"route": "features"}), ("cka_debiased", {"route": "gram"}),
    ("cka_debiased", {"route": "features"}), ("cka_rbf", {}), ("cka_minibatch", {"batch_size": 8}), ("dcka", {}),
])
def test_invariances_symmetry_and_identity(name, options):
    x, y, z = _data("structured", 40, 12, 50, seed=5)
    kw = {"confounder": z} if name == "dcka" else {}
    base = compare(x, y, name, **kw, **options)
    rotated = x @ _orthogonal(12, 1)
    assert compare(rotated, y, name, **kw, **options) == pytest.approx(base, abs=1e-10)
    assert compare(7.5 * x, y, name, **kw, **options) == pytest.approx(base, abs=1e-10)
    assert compare(y, x, name, **kw, **options) == pytest.approx(base, abs=1e-10)
    assert compare(x, x, name, **kw, **options) == pytest.approx(1.0, abs=1e-10)
    assert compare(x, 3 * x @ _orthogonal(12, 2), name, **kw, **options) == pytest.approx(1.0, abs=1e-10)


def test_linear_cka_is_translation_invariant_on_both_routes():
    x, y, _ = _data("random", 30, 10, 20)
    for route in ("gram", "features"):
        base = compare(x, y, "cka_debiased", route=route)
        assert compare(x + 1e3, y - 50, "cka_debiased", route=route) == pytest.approx(base, abs=1e-9)


def test_debiased_cka_of_independent_gaussians_is_near_zero_where_biased_is_large():
    rng = np.random.default_rng(11)
    n, d = 50, 2000
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    biased = compare(x, y, "cka")
    debiased = compare(x, y, "cka_debiased")
    assert biased > 0.9  # ≈ d / (n + d) for independent data
    assert abs(debiased) < 0.05
    assert compare(x, y, "cka_debiased", route="features") == pytest.approx(debiased, abs=1e-10)


def test_dcka_can_be_negative_and_the_input_explains_variance():
    from measure.functional.dcka import _dcka_prepare, confounder_gram
    from measure.functional.gram import linear_gram

    x, _, z = _data("structured", 40, 30, 5, seed=2)
    k0 = confounder_gram(torch.from_numpy(z))
    prepared = _dcka_prepare(linear_gram(torch.from_numpy(x)), k0)
    explained = prepared.extras["variance_explained"]
    kx, k0n = unit_gram(x), unit_gram(z)
    r2 = np.corrcoef(kx.ravel(), k0n.ravel())[0, 1] ** 2  # R² of a simple regression with intercept
    assert explained == pytest.approx(r2, abs=1e-10)
    # dCKA can be negative: representations sharing the input directions but with other residual structure
    rng = np.random.default_rng(7)
    for _ in range(500):
        z = rng.normal(size=(8, 2))
        x = np.c_[z, rng.normal(size=(8, 1))]
        y = np.c_[z * rng.normal(size=2) * 3, rng.normal(size=(8, 1))]
        value = compare(x, y, "dcka", confounder=z)
        if value < -0.1:
            break
    assert value < -0.1
    assert value == pytest.approx(ref_dcka(x, y, z), abs=1e-10)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_problem():
    x, y, z = _data("random", 20, 5, 6)
    with pytest.raises(MeasureError, match="same samples"):
        compare(x, y[:10], "cka")
    with pytest.raises(MeasureError, match="Unknown measure 'ckaa'; valid measures: .*cka"):
        compare(x, y, "ckaa")
    with pytest.raises(MeasureError, match="Unknown option.*'treshold'.*valid options: threshold=0.4"):
        compare(x, y, "cka_rbf", treshold=0.2)
    with pytest.raises(MeasureError, match="route of 'cka' must be 'auto', 'gram' or 'features'"):
        compare(x, y, "cka", route="fast")
    with pytest.raises(MeasureError, match="needs the inputs: pass confounder="):
        compare(x, y, "dcka")
    with pytest.raises(MeasureError, match="needs option"):
        compare(x, y, "cka_minibatch")
    bad = x.copy()
    bad[7, 2] = np.nan
    bad[9, 0] = np.inf
    for name, route in [("cka", "gram"), ("cka", "features"), ("cka_rbf", None), ("cka_debiased", "gram")]:
        for data in (bad, bad.astype(np.float32)):  # float64, and the float32 scheme (auto)
            kw = {"route": route} if route else {}
            with pytest.raises(MeasureError, match=r"x holds NaN or Inf in 2 sample\(s\), between sample 7 and 9"):
                compare(data, y, name, **kw)
            with pytest.raises(MeasureError, match=r"y holds NaN or Inf in 2 sample\(s\)"):
                compare(y, data, name, **kw)
    # finite activations whose float32 products overflow: named, with the fix
    huge = (x * 1e20).astype(np.float32)
    with pytest.raises(MeasureError, match=r"Gram of x overflows in float32 products.*precision='float64'"):
        compare(huge, y.astype(np.float32), "cka", route="gram")
    assert np.isfinite(compare(huge, y.astype(np.float32), "cka", route="gram", precision="float64"))
    with pytest.raises(MeasureError, match="shape"):
        compare(x[:, 0], y, "cka")


@pytest.mark.parametrize("route", ["gram", "features"])
def test_fewer_than_four_samples_for_debiased(route):
    x, y, _ = _data("random", 3, 5, 6)
    with pytest.raises(MeasureError, match="at least 4 samples"):
        compare(x, y, "cka_debiased", route=route)
    assert np.isfinite(compare(x, y, "cka", route=route))


@pytest.mark.parametrize("name,options", [
    ("cka", {"route": "gram"}), ("cka", {"route": "features"}), ("cka_debiased", {"route": "gram"}),
    ("cka_debiased", {"route": "features"}), ("cka_rbf", {}), ("dcka", {}),
])
def test_zero_variance_layer_is_undefined(name, options):
    x, y, z = _data("random", 20, 5, 6)
    constant = np.full_like(y, 3.25)
    kw = {"confounder": z} if name == "dcka" else {}
    with pytest.raises(MeasureError, match="undefined for y"):
        compare(x, constant, name, **kw, **options)
    with pytest.warns(UserWarning, match="undefined for y"):
        assert np.isnan(compare(x, constant, name, undefined="nan", **kw, **options))


@pytest.mark.parametrize("route", ["gram", "features"])
@pytest.mark.parametrize("n", [4, 9])
def test_zero_unbiased_self_hsic_is_reported_undefined(route, n):
    # a layer that differs from a constant in one sample has HSIC₁(K, K) = 0 exactly (not constant, yet undefined)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    y = np.zeros((n, 2)) + 1.5
    y[2] = [4.0, -1.0]
    yc = y - y.mean(0)
    assert ref_hsic_unbiased(yc @ yc.T, yc @ yc.T) == pytest.approx(0, abs=1e-12)
    with pytest.raises(MeasureError, match="undefined for y"):
        compare(x, y, "cka_debiased", route=route)
    with pytest.warns(UserWarning, match="undefined for y"):
        assert np.isnan(compare(x, y, "cka_debiased", route=route, undefined="nan"))
    assert np.isfinite(compare(x, y, "cka", route=route))  # biased CKA is defined


def test_constant_confounder_is_refused():
    x, y, z = _data("random", 20, 5, 6)
    with pytest.raises(MeasureError, match="confounder .*constant"):
        compare(x, y, "dcka", confounder=np.ones_like(z) * 4.0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
