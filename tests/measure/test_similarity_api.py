"""The original simtorch API (CKA / DeconfoundedCKA on SimilarityModel) runs on the same engine, exactly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from extract import SimilarityModel
from measure import CKA, DeconfoundedCKA, DeltaCKA, MeasureError, compare

N = 40


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 12), nn.Tanh(),
        nn.Linear(12, 5),
    ).double()


LAYERS = ["1", "2", "5", "6"]  # ReLU (4×8×8), pool (4×4×4), tanh (12), logits (5)


def _inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _by_hand(model: nn.Sequential, loader: DataLoader) -> dict[str, np.ndarray]:
    """Layer outputs batch by batch without hooks, concatenated: the reference activations."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}
    with torch.no_grad():
        for (x,) in loader:
            h = x
            for i, module in enumerate(model):
                h = module(h)
                if str(i) in out:
                    out[str(i)].append(h.numpy().copy())
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("batch_size", [7, 16, N])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_compute_equals_compare_on_concatenated_activations(batch_size, unbiased):
    m1, m2 = _cnn(0), _cnn(1)
    loader = DataLoader(TensorDataset(_inputs()), batch_size=batch_size, shuffle=False)
    cka = CKA(SimilarityModel(m1, model_name="net A", layers_to_include=LAYERS),
              SimilarityModel(m2, model_name="net B", layers_to_include=LAYERS), device="cpu", unbiased=unbiased)
    matrix = cka.compute(loader)
    acts1, acts2 = _by_hand(m1, loader), _by_hand(m2, loader)
    name = "cka_debiased" if unbiased else "cka"
    expected = np.array([[compare(acts1[a], acts2[b], name) for b in LAYERS] for a in LAYERS])
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(matrix, expected, atol=1e-10, rtol=0)
    assert cka.result.rows == LAYERS and cka.result.cols == LAYERS


def test_result_does_not_depend_on_the_batch_size():
    m1, m2 = _cnn(2), _cnn(3)
    values = []
    for batch_size in (3, 11, N):
        loader = DataLoader(TensorDataset(_inputs(1)), batch_size=batch_size, shuffle=False)
        values.append(CKA(SimilarityModel(m1, layers_to_include=LAYERS),
                          SimilarityModel(m2, layers_to_include=LAYERS), device="cpu").compute(loader))
    np.testing.assert_allclose(values[0], values[1], atol=1e-12)
    np.testing.assert_allclose(values[0], values[2], atol=1e-12)


@pytest.mark.parametrize("psd", [False, True])
def test_deconfounded_cka_uses_the_loader_inputs(psd):
    m1, m2 = _cnn(4), _cnn(5)
    x = _inputs(2)
    loader = DataLoader(TensorDataset(x, torch.zeros(N)), batch_size=9, shuffle=False)  # (input, target) batches
    dcka = DeconfoundedCKA(SimilarityModel(m1, layers_to_include=LAYERS), SimilarityModel(m2, layers_to_include=LAYERS),
                           device="cpu", remove_negative_eig=psd)
    matrix = dcka.compute(loader)
    plain = DataLoader(TensorDataset(x), batch_size=9, shuffle=False)
    acts1, acts2 = _by_hand(m1, plain), _by_hand(m2, plain)
    expected = np.array([[compare(acts1[a], acts2[b], "dcka", confounder=x.numpy(), psd=psd) for b in LAYERS]
                         for a in LAYERS])
    np.testing.assert_allclose(matrix, expected, atol=1e-10, rtol=0)
    assert DeltaCKA is DeconfoundedCKA
    extras = dcka.result.extras["rows"]
    assert set(extras) == set(LAYERS) and all(0 <= e["variance_explained"] <= 1 for e in extras.values())


def test_plot_similarity(tmp_path):
    m1, m2 = _cnn(6), _cnn(7)
    cka = CKA(SimilarityModel(m1, model_name="DenseNet", layers_to_include=LAYERS),
              SimilarityModel(m2, model_name="ResNet", layers_to_include=LAYERS[:3]), device="cpu")
    with pytest.raises(RuntimeError, match="call compute"):
        cka.plot_similarity()
    cka.compute(DataLoader(TensorDataset(_inputs()), batch_size=13))
    ax = cka.plot_similarity(savefig=True, save_path=tmp_path)
    assert "DenseNet" in ax.get_title() and "ResNet" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS[:3]
    saved = list(tmp_path.glob("*.png"))
    assert len(saved) == 1 and saved[0].stat().st_size > 1000
    target = tmp_path / "sub" / "heat.pdf"
    cka.plot_similarity(title="custom", savefig=True, save_path=target)
    assert target.exists()


def test_bad_arguments():
    m = _cnn(0)
    with pytest.raises(TypeError, match="sim_model1 must be an extract.SimilarityModel"):
        CKA(m, SimilarityModel(m, layers_to_include=LAYERS))
    cka = CKA(SimilarityModel(m, layers_to_include=LAYERS), SimilarityModel(_cnn(1), layers_to_include=LAYERS),
              device="cpu", bandwidth=3)
    with pytest.raises(MeasureError, match="Unknown option"):
        cka.compute(DataLoader(TensorDataset(_inputs()), batch_size=8))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("route,layers,n", [("features", LAYERS, N), ("auto", ["5", "6"], 200)])
def test_feature_route_streams_from_the_hooks_without_storing(monkeypatch, unbiased, route, layers, n):
    import measure.similarity as similarity

    def no_store(*args, **kwargs):
        raise AssertionError("the feature route must not keep the activations")

    monkeypatch.setattr(similarity, "_to_stores", no_store)
    m1, m2 = _cnn(8), _cnn(9)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loader = DataLoader(TensorDataset(x), batch_size=17, shuffle=False)
    cka = CKA(SimilarityModel(m1, layers_to_include=layers), SimilarityModel(m2, layers_to_include=layers),
              device="cpu", unbiased=unbiased, route=route)
    matrix = cka.compute(loader)
    name = "cka_debiased" if unbiased else "cka"
    acts1, acts2 = _by_hand(m1, loader), _by_hand(m2, loader)
    expected = np.array([[compare(acts1[a], acts2[b], name, route="gram") for b in layers] for a in layers])
    np.testing.assert_allclose(matrix, expected, atol=1e-10, rtol=0)
    assert cka.result.extras == {"route": "features"} and cka.result.rows == layers


def test_feature_route_from_hooks_reports_nan_and_constant_layers():
    m1 = _cnn(0)
    with torch.no_grad():
        m1[4].weight.zero_()  # layer "5" (tanh of a constant) is constant over samples
    loader = DataLoader(TensorDataset(_inputs()), batch_size=8)
    cka = CKA(SimilarityModel(m1, model_name="broken", layers_to_include=LAYERS),
              SimilarityModel(_cnn(1), layers_to_include=LAYERS), device="cpu", route="features")
    with pytest.raises(MeasureError, match="undefined for layer '5' of 'broken'"):
        cka.compute(loader)
    x = _inputs()
    x[13, 0, 2, 2] = float("nan")
    cka = CKA(SimilarityModel(_cnn(0), model_name="A", layers_to_include=LAYERS),
              SimilarityModel(_cnn(1), layers_to_include=LAYERS), device="cpu", route="features")
    with pytest.raises(MeasureError, match=r"layer '1' of sim_model1 \(A\) holds NaN or Inf .*sample 13 and 13"):
        cka.compute(DataLoader(TensorDataset(x), batch_size=8))
