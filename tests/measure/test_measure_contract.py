"""The contract every registered measure keeps, checked for each entry of ``measure.MEASURES``.

A measure added under ``measure/measures/`` is picked up here with no edit to this file: it must
equal its float64 NumPy reference (``measure_references.REFERENCES``; a measure without one fails),
give the same value streamed from a chunked store as in memory, be symmetric exactly when it says
so, keep the invariances it declares, stay in its value range, and refuse bad input with
``MeasureError``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from measure_references import REFERENCES, REQUIRED_OPTIONS

from measure import MEASURES, MeasureError, compare
from measure.engine import Engine
from measure.measures.base import STATISTICS

NAMES = list(MEASURES)
# (n, p, q): more features than samples on both sides; fewer on both; mixed
SHAPES = [(30, 45, 38), (48, 6, 9), (36, 50, 5)]
INVARIANCES = {"orthogonal", "isotropic_scaling", "translation", "invertible_linear"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int, p: int, q: int, seed: int = 0, coupling: float = 1.0):
    """Two representations sharing a 4-d latent, with offsets (so centring matters) and the inputs z."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, p)) + rng.standard_normal((n, p)) + 3.0
    y = coupling * z @ rng.standard_normal((4, q)) + rng.standard_normal((n, q)) - 1.0
    inputs = z @ rng.standard_normal((4, 7)) + 0.5 * rng.standard_normal((n, 7))
    return x, y, inputs


def _options(name: str) -> dict:
    return dict(REQUIRED_OPTIONS.get(name, {}))


def _compare(x, y, name: str, inputs=None, **options) -> float:
    """``compare`` with the measure's required options and the inputs where it needs them; warnings (CCA's
    saturation when features reach samples) are the documented behaviour, not part of the contract."""
    kwargs = {**_options(name), **options}
    if MEASURES[name].needs_confounder:
        kwargs["confounder"] = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare(x, y, name, **kwargs)


def _reference(x, y, name: str, inputs) -> float:
    if name not in REFERENCES:
        pytest.fail(f"measure {name!r} has no float64 reference: add one to tests/measure/measure_references.py")
    args = (x, y, inputs) if MEASURES[name].needs_confounder else (x, y)
    return float(REFERENCES[name](*args, **_options(name)))


def _orthogonal(p: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))[0]


@pytest.mark.parametrize("name", NAMES)
def test_declares_its_properties(name):
    cls = MEASURES[name]
    assert isinstance(cls, type) and cls.__module__.startswith("measure.measures."), cls
    assert cls.name == name
    assert cls.statistic in STATISTICS
    assert cls.kind in ("similarity", "distance")
    lo, hi = cls.value_range
    assert lo < hi
    assert isinstance(cls.symmetric, bool)
    assert set(cls.invariances) <= INVARIANCES, set(cls.invariances) - INVARIANCES
    assert cls.reference.strip(), f"{name} names no paper"
    assert cls.describe()["name"] == name


@pytest.mark.parametrize("n,p,q", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_equals_its_float64_reference(name, n, p, q):
    x, y, inputs = _data(n, p, q)
    assert _compare(x, y, name, inputs) == pytest.approx(_reference(x, y, name, inputs), abs=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_streaming_from_a_chunked_store_equals_one_shot(name, tmp_path, write_store):
    x, y, inputs = _data(40, 12, 50, seed=1)
    stores = [write_store(tmp_path / "a.zarr", "a", {"l": x}, inputs=inputs, chunk=6),
              write_store(tmp_path / "b.zarr", "b", {"l": y}, inputs=inputs, chunk=9)]
    routes = [{"route": "gram"}, {"route": "features"}] if MEASURES[name].feature_route else [{}]
    for route in routes:
        options = {**_options(name), **route}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamed = Engine(stores, device="cpu").run([(name, options)], [(0, 1)])[0].matrix[0, 0]
        assert streamed == pytest.approx(_compare(x, y, name, inputs, **route), abs=1e-10), route


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_exactly_when_declared(name):
    x, y, inputs = _data(40, 7, 3, seed=2)
    forward, backward = _compare(x, y, name, inputs), _compare(y, x, name, inputs)
    if MEASURES[name].symmetric:
        assert forward == pytest.approx(backward, abs=1e-10)
    else:
        assert abs(forward - backward) > 1e-6, "declared asymmetric but symmetric on generic data"


def _transform(kind: str, x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(3)
    p = x.shape[1]
    if kind == "orthogonal":
        return x @ _orthogonal(p, 4)
    if kind == "isotropic_scaling":
        return 3.7 * x
    if kind == "translation":
        return x + rng.standard_normal(p) * 5
    return x @ (rng.standard_normal((p, p)) + 3 * np.eye(p))  # invertible_linear


@pytest.mark.parametrize("name", NAMES)
def test_declared_invariances_hold(name):
    x, y, inputs = _data(60, 8, 10, seed=5)
    base = _compare(x, y, name, inputs)
    for kind in sorted(MEASURES[name].invariances):
        assert _compare(_transform(kind, x), y, name, inputs) == pytest.approx(base, abs=1e-8), kind
        assert _compare(x, _transform(kind, y), name, inputs) == pytest.approx(base, abs=1e-8), kind


@pytest.mark.parametrize("name", NAMES)
def test_stays_in_its_value_range_and_identity_is_an_extreme(name):
    cls = MEASURES[name]
    lo, hi = cls.value_range
    for seed, coupling in ((6, 1.0), (7, 0.0), (8, 5.0)):
        x, y, inputs = _data(40, 9, 14, seed=seed, coupling=coupling)
        assert lo - 1e-12 <= _compare(x, y, name, inputs) <= hi + 1e-12
    x, _, inputs = _data(40, 9, 14, seed=9)
    identity = _compare(x, x, name, inputs)
    if cls.kind == "distance":
        assert identity == pytest.approx(lo, abs=1e-6)
    else:
        assert identity == pytest.approx(hi, abs=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_measure_error(name):
    x, y, inputs = _data(30, 5, 6, seed=10)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(MeasureError, match="NaN"):
        _compare(bad, y, name, inputs)
    with pytest.raises(MeasureError, match="same samples"):
        _compare(x[:-1], y, name, inputs[:-1])
    with pytest.raises(MeasureError):
        _compare(x[:1], y[:1], name, inputs[:1])
    with pytest.raises(MeasureError, match="Unknown option"):
        _compare(x, y, name, inputs, no_such_option=1)
