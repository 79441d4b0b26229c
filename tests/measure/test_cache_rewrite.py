"""A store rewritten with --force is another store to the statistics cache, even with the same weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from extract.runner import extract
from extract.store import ZarrStore
from measure.engine import Engine
from measure.engine.cache import StatisticsCache

N = 32


def _extract(path, activation: type[nn.Module], force: bool) -> ZarrStore:
    """A 12 → 16 → 4 MLP of seed 0 (the same weights whatever ``activation``, which has no parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), activation(), nn.Linear(16, 4))
    data = torch.from_numpy(np.random.default_rng(0).standard_normal((N, 12)).astype(np.float32))
    extract(model, data, path, name="m", layers=["1"], batch_size=16, progress=False, device="cpu", force=force)
    return ZarrStore(path)


def test_a_store_rewritten_with_other_model_code_gets_its_grams_computed_again(tmp_path):
    path = tmp_path / "m.zarr"
    first = _extract(path, nn.Tanh, force=False)
    cache = StatisticsCache(tmp_path / "cache.zarr")
    engine = Engine([first], device="cpu", precision="float64", cache=cache)
    tanh_gram = engine.gram(0, "1").numpy().copy()
    second = _extract(path, nn.ReLU, force=True)  # same weights, data and options; other activations
    assert second.info.weights_digest == first.info.weights_digest
    assert second.info.write_id != first.info.write_id
    relu = Engine([second], device="cpu", precision="float64", cache=StatisticsCache(tmp_path / "cache.zarr"))
    x = second.read_layer("1").astype(np.float64)
    np.testing.assert_allclose(relu.gram(0, "1").numpy(), x @ x.T, rtol=1e-12, atol=1e-12)
    assert relu.statistics_computed == 1
    assert not np.allclose(tanh_gram, x @ x.T)
