"""precision="auto" (the default): float32/float16 data get the compensated float32 Gram scheme, float64 data
and the measures that need float64 Grams get float64, and every Gram measure stays within 1e-6 of float64.

The data are chosen to be hard for float32 products: a large common offset (+1e3), column scales spread over
six decades, nearly collinear features, and real ReLU/conv activations of small CNNs. A plain float32 product
X Xᵀ misses the 1e-6 bound on the offset data (checked below), so the tests fail if auto used it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _extract_models import SmallCNN, images
from _stores import write_store

import pipeline
from measure import MeasureError, compare
from measure.engine import Engine
from measure.functional.gram import linear_gram, resolve_precision
from measure.registry import MEASURES

N = 256
KERNEL = [name for name, spec in MEASURES.items() if spec.float32_grams and spec.statistic in ("gram", "gram_blocks")]
FLOAT64_ONLY = [name for name, spec in MEASURES.items()
                if not spec.float32_grams and spec.statistic in ("gram", "gram_blocks")]
OPTIONS = {"cka_minibatch": {"batch_size": 64}, "mutual_knn": {}}


def _random(rng: np.random.Generator, p: int) -> np.ndarray:
    latent = rng.normal(size=(N, 6))
    return latent @ rng.normal(size=(6, p)) + 0.5 * rng.normal(size=(N, p))


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    x, y = _random(rng, 300), _random(rng, 5000)  # y above the 4096-feature block of the float32 scheme
    scales = 10.0 ** rng.uniform(-3, 3, size=300)
    base = rng.normal(size=(N, 3))
    collinear_x = base @ rng.normal(size=(3, 200)) + 1e-4 * rng.normal(size=(N, 200))
    collinear_y = collinear_x[:, ::-1] * 2.0 + 1e-3 * rng.normal(size=(N, 200))
    model_a, model_b = _cnn_activations(0), _cnn_activations(1)
    cases = {
        "random": (x, y),
        "offset_1e3": (x + 1e3, np.abs(y) + 1e3),
        "column_scales_1e-3_1e3": (x * scales, y),
        "offset_and_scales": (x * scales + 1e3 * scales, y + 1e3),
        "nearly_collinear": (collinear_x, collinear_y),
        **{f"cnn_{layer}": (model_a[layer], model_b[layer]) for layer in model_a},
    }
    return {name: (a.astype(np.float32), b.astype(np.float32)) for name, (a, b) in cases.items()}


def _cnn_activations(seed: int) -> dict[str, np.ndarray]:
    """Outputs of the ReLU, conv2 and fc1 layers of a small CNN (width 16) on N seeded images."""
    torch.manual_seed(seed)
    model = SmallCNN(width=16).eval()
    out: dict[str, np.ndarray] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: out.__setitem__(name, output.reshape(N, -1).numpy().copy()))
        for name in ("relu", "conv2", "fc1")]
    with torch.inference_mode():
        model(images(N, seed=5))
    for hook in hooks:
        hook.remove()
    return out


CASES = _cases()


def _value(x, y, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare(x, y, name, **OPTIONS.get(name, {}), **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", KERNEL)
def test_auto_is_within_1e6_of_float64_for_every_gram_measure(case, name):
    x, y = CASES[case]
    kw = {"confounder": images(N, seed=5)} if MEASURES[name].needs_confounder else {}  # the CNNs' inputs
    # the measure's kernel route: the feature route (narrow layers) does not form Grams
    kw.update({"route": "gram"} if "route" in MEASURES[name].options else {})
    auto = _value(torch.from_numpy(x), torch.from_numpy(y), name, **kw)
    reference = _value(torch.from_numpy(x), torch.from_numpy(y), name, precision="float64", **kw)
    assert abs(auto - reference) <= 1e-6, (case, name, auto, reference)


def test_auto_takes_the_float32_scheme_for_float32_data_only():
    assert resolve_precision("auto", torch.float32) == resolve_precision("auto", "float16") == "float32"
    assert resolve_precision("auto", "float64") == resolve_precision("auto", torch.int64) == "float64"
    assert resolve_precision("auto", "float32", float32_grams=False) == "float64"
    assert resolve_precision("float32", "float64") == "float32" and resolve_precision("float64", "float32") == "float64"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "float32")
    # on float32 data auto is the float32 scheme itself, not float64 in disguise
    x, y = (torch.from_numpy(a) for a in CASES["offset_1e3"])
    assert compare(x, y, "cka", route="gram") == compare(x, y, "cka", route="gram", precision="float32")
    assert compare(x.double(), y.double(), "cka", route="gram") == compare(x, y, "cka", route="gram",
                                                                         precision="float64")


def test_a_plain_float32_product_misses_the_bound_that_auto_meets():
    """The cases are hard enough: float32 X Xᵀ without the shift errs by more than 1e-6 in CKA."""
    x, y = (torch.from_numpy(a) for a in CASES["offset_1e3"])

    def cka_of(k, m):
        from measure.functional.gram import center_gram

        kc, mc = center_gram(k), center_gram(m)
        return float((kc * mc).sum() / (kc.norm() * mc.norm()))

    reference = cka_of(linear_gram(x), linear_gram(y))
    plain = cka_of((x @ x.T).double(), (y @ y.T).double())
    assert abs(plain - reference) > 1e-6
    assert abs(cka_of(linear_gram(x, "float32"), linear_gram(y, "float32")) - reference) <= 1e-6


@pytest.fixture
def stores(tmp_path):
    x, y = CASES["offset_and_scales"]
    a, b = CASES["cnn_relu"]
    inputs = np.asarray(images(N, seed=5))
    return {
        "float32": [write_store(tmp_path / "a32.zarr", "A", {"h": x, "r": a}, inputs, chunk=64),
                    write_store(tmp_path / "b32.zarr", "B", {"h": y, "r": b}, inputs, chunk=64)],
        "float64": [write_store(tmp_path / "a64.zarr", "A", {"h": x.astype(np.float64), "r": a.astype(np.float64)},
                                inputs, chunk=64),
                    write_store(tmp_path / "b64.zarr", "B", {"h": y.astype(np.float64), "r": b.astype(np.float64)},
                                inputs, chunk=64)],
    }


def _measures(names):
    return [(name, {**OPTIONS.get(name, {}), **({"route": "gram"} if "route" in MEASURES[name].options else {})})
            for name in names]


def test_engine_auto_uses_float32_grams_for_float32_stores_and_float64_for_the_rest(stores):
    measures = _measures(KERNEL + FLOAT64_ONLY)
    budget = N * 1000 * 8  # blocked Grams for "h"
    auto = Engine(stores["float32"], device="cpu", memory_budget=budget)
    assert auto.precision == "auto"
    # the same budget: the same row blocks, so the float64 Grams are the same products summed in the same order
    reference = Engine(stores["float32"], device="cpu", precision="float64", memory_budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = auto.run(measures, [(0, 1)], release=False)
        want = reference.run(measures, [(0, 1)])
    for g, w in zip(got, want, strict=True):
        if g.measure in FLOAT64_ONLY:  # silently float64 under auto: the very same Grams, bit for bit
            np.testing.assert_array_equal(g.matrix, w.matrix, err_msg=g.measure)
        else:
            np.testing.assert_allclose(g.matrix, w.matrix, rtol=0, atol=1e-6, err_msg=g.measure)
    held = {dict(key.options)["precision"] for key in auto.layer_statistics.held("gram")}
    assert held == {"float32", "float64"}  # kernel measures on float32 Grams, the others on float64 ones
    # float64 stores: float64 Grams under auto, equal to an explicit float64 run (same budget, same blocks; the
    # float32 data widen to float64 exactly, so the products are the same numbers in the same order)
    auto64 = Engine(stores["float64"], device="cpu", memory_budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = auto64.run(_measures(["cka"]), [(0, 1)], release=False)[0]
    assert {dict(key.options)["precision"] for key in auto64.layer_statistics.held("gram")} == {"float64"}
    np.testing.assert_array_equal(cka.matrix, want[KERNEL.index("cka")].matrix)


def test_explicit_float32_still_refuses_the_float64_measures(stores):
    engine = Engine(stores["float32"], device="cpu", precision="float32")
    for name in FLOAT64_ONLY:
        with pytest.raises(MeasureError, match="needs float64 Gram products"):
            engine.run(_measures([name]), [(0, 1)])
    with pytest.raises(MeasureError, match="needs float64 Gram products"):
        compare(*(torch.from_numpy(a) for a in CASES["random"]), "procrustes", precision="float32")


def test_cli_default_is_auto_and_runs_procrustes_on_float32_stores(stores, tmp_path, capsys):
    paths = [str(s.path) for s in stores["float32"]]
    out = tmp_path / "out"
    code = pipeline.main(["measure", *paths, "--measures", "cka", "procrustes", "--out", str(out), "--no-plots",
                          "--quiet", "--no-cache"])
    assert code == 0, capsys.readouterr().err
    code = pipeline.main(["measure", *paths, "--measures", "procrustes", "--precision", "float32", "--out",
                          str(tmp_path / "refused"), "--no-plots", "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "--precision float64" in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_feature_route_over_stores_is_within_1e6_of_float64(case, tmp_path):
    """The engine's feature route on float32 stores: float32 products summed in float64 (``auto``)
    against float64 throughout, both estimators, every pair of the two stores."""
    x, y = (data[:, :400] for data in CASES[case])  # the feature route's products grow as the width squared
    stores = [write_store(tmp_path / f"{name}.zarr", name, {"layer": data, "half": data[:, ::2]}, chunk=48)
              for name, data in (("a", x), ("b", y))]
    measures = [("cka", {"route": "features"}), ("cka_debiased", {"route": "features"})]
    pairs = [(0, 0), (0, 1), (1, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = Engine(stores, device="cpu").run(measures, pairs)
        reference = Engine(stores, device="cpu", precision="float64").run(measures, pairs)
    for got, want in zip(auto, reference, strict=True):
        np.testing.assert_allclose(got.matrix, want.matrix, rtol=0, atol=1e-6, err_msg=f"{case} {got.measure}")
