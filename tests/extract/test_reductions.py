"""Per-layer reductions of wide layers: pooling equals its direct torch computation, stores record it,
extraction-time and measurement-time reductions agree, and mixed reductions are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extract import ZarrStore, extract
from extract.store import StoreError
from extract.store.reductions import ReducedStore, Reduction, ReductionError, parse_rules, reduce_store
from measure.engine import Engine


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv1d(4, 5, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))  # (B, 8, 10, 10)
        c = self.conv3(b[:, :4].flatten(2))  # (B, 5, 98): a 1-d map
        return self.fc(b.mean((2, 3))) + c.mean((1, 2))[:, None]


LAYERS = ["conv1", "conv2", "conv3", "fc"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(30, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def outputs(images):
    """The layers of a plain forward pass in the stores' batches of 7: a layer's rows then come from the same
    products as the extracted ones (another batch size may round differently), so ``full`` equals them exactly."""
    model = _Net(0).eval()
    captured = {n: [] for n in LAYERS}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: captured[n].append(o.detach()))
             for n in LAYERS]
    with torch.no_grad():
        for start in range(0, len(images), 7):
            model(images[start:start + 7])
    for h in hooks:
        h.remove()
    return {n: torch.cat(parts) for n, parts in captured.items()}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("red")
    out = {}
    for name, reduce in (("full", None), ("gap", "gap"), ("pool2", ["conv*=pool2"]), ("mixed", {"conv2": "pool3"})):
        r = extract(_Net(0), images, root / f"{name}.zarr", name=name, layers=LAYERS, reduce=reduce,
                    batch_size=7, progress=False)
        out[name] = ZarrStore(r.path)
    r = extract(_Net(1), images, root / "other.zarr", name="other", layers=LAYERS, batch_size=7, progress=False)
    out["other"] = ZarrStore(r.path)
    return out


@pytest.mark.parametrize("shape", [(4, 3, 7, 9), (4, 5, 12), (2, 2, 4, 6, 5)])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_pool_and_gap_equal_their_direct_torch_computation(shape, size):
    x = torch.randn(*shape, dtype=torch.float64)
    pool = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[len(shape)]
    torch.testing.assert_close(Reduction("pool", size).apply(x), pool(x, size))
    torch.testing.assert_close(Reduction("gap").apply(x), x.mean(dim=tuple(range(2, len(shape)))))
    assert Reduction("pool", size).output_shape(shape[1:]) == tuple(pool(x, size).shape[1:])
    assert Reduction("flatten").apply(x) is x


def test_token_reductions_with_and_without_a_mask():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    numpy_x, numpy_m = x.numpy(), mask.numpy()
    mean = np.stack([numpy_x[i][numpy_m[i]].mean(0) for i in range(3)])
    first = np.stack([numpy_x[i][numpy_m[i]][0] for i in range(3)])
    last = np.stack([numpy_x[i][numpy_m[i]][-1] for i in range(3)])
    np.testing.assert_allclose(Reduction("mean").apply(x, mask, True).numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(Reduction("first").apply(x, mask, True).numpy(), first)
    np.testing.assert_allclose(Reduction("last").apply(x, mask, True).numpy(), last)
    compact = Reduction("flatten").apply(x, mask, True).numpy()
    for i in range(3):
        k = numpy_m[i].sum()
        np.testing.assert_array_equal(compact[i, :k], numpy_x[i][numpy_m[i]])
        assert not compact[i, k:].any()
    np.testing.assert_allclose(Reduction("mean").apply(x).numpy(), numpy_x.mean(1), rtol=1e-12)
    with pytest.raises(ReductionError, match="no valid token"):
        Reduction("mean").apply(x, torch.zeros(3, 5, dtype=torch.bool), True)


def test_stores_record_their_reductions_and_hold_the_pooled_arrays(stores, outputs):
    assert stores["full"].info.reductions == dict.fromkeys(LAYERS, "flatten")
    assert stores["gap"].info.reductions == {"conv1": "gap", "conv2": "gap", "conv3": "gap", "fc": "flatten"}
    assert stores["pool2"].info.reductions == {"conv1": "pool2", "conv2": "pool2", "conv3": "pool2",
                                               "fc": "flatten"}
    assert stores["mixed"].info.reductions == {"conv1": "flatten", "conv2": "pool3", "conv3": "flatten",
                                               "fc": "flatten"}
    # tolerance: torch's float32 pairwise mean of ≤ 100 values errs by ≤ γ₇·mean|x| ≈ 4e-7·mean|x| (Higham §4.2)
    # (the stores reduce in float64, then round once), inside atol=1e-6 here (mean|x| < 0.6)
    for layer in ("conv1", "conv2"):
        np.testing.assert_allclose(stores["gap"].read_layer(layer), outputs[layer].mean((2, 3)).numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stores["pool2"].read_layer(layer),
                                   F.adaptive_avg_pool2d(outputs[layer], 2).numpy(), rtol=1e-5, atol=1e-6)
        # equal by construction: the same forward pass over the same batches of 7
        np.testing.assert_array_equal(stores["full"].read_layer(layer), outputs[layer].numpy())
    np.testing.assert_allclose(stores["pool2"].read_layer("conv3"), F.adaptive_avg_pool1d(outputs["conv3"], 2),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stores["mixed"].read_layer("conv2"), F.adaptive_avg_pool2d(outputs["conv2"], 3),
                               rtol=1e-5, atol=1e-6)
    # smaller stores: the gap store holds C numbers per sample where the full one holds C·H·W
    assert stores["gap"].layer_shape("conv2") == (8,) and stores["full"].layer_shape("conv2") == (8, 10, 10)


def test_measurement_time_reduction_equals_extraction_time(stores):
    for spec, stored in (("gap", "gap"), (["conv*=pool2"], "pool2")):
        at_measure = Engine([stores["full"], stores["other"]], reduce=spec).run([("cka", {})], [(0, 1)])[0]
        at_extract = Engine([stores[stored], stores["other"]], reduce=spec).run([("cka", {})], [(0, 1)])[0]
        np.testing.assert_allclose(at_measure.matrix, at_extract.matrix, atol=1e-6)
        cross = Engine([stores["full"], stores[stored]], reduce=spec).run([("cka", {})], [(0, 1)])[0]
        np.testing.assert_allclose(cross.matrix.diagonal(), 1.0, atol=1e-6)
    view = ReducedStore(stores["full"], "gap")
    assert view.info.reductions == {"conv1": "gap", "conv2": "gap", "conv3": "gap", "fc": "flatten"}
    assert view.layer_shape("conv2") == (8,)
    assert reduce_store(view) is view


def test_different_reductions_of_one_layer_are_refused_unless_asked(stores):
    with pytest.raises(StoreError, match=r"'conv1' is reduced with 'flatten'.*'gap'.*--reduce.*--mixed-reductions"):
        Engine([stores["full"], stores["gap"]])
    with pytest.warns(UserWarning, match="compared anyway"):
        engine = Engine([stores["full"], stores["gap"]], mixed_reductions=True)
    assert len(engine.mixed_reductions) == 3
    # gap at measurement time makes them the same representation again
    Engine([stores["full"], stores["gap"]], reduce="gap")


def test_reduction_errors_name_the_problem(stores):
    with pytest.raises(ReductionError, match="Unknown reduction 'avg'.*pool4"):
        parse_rules("avg")
    with pytest.raises(ReductionError, match="matches no layer"):
        ReducedStore(stores["full"], "nothing*=gap")
    with pytest.raises(ReductionError, match="'fc'.*'gap' pools maps"):
        ReducedStore(stores["full"], "fc=gap")
    with pytest.raises(ReductionError, match="stored reduced with 'gap' at extraction; 'pool2' cannot"):
        ReducedStore(stores["gap"], "conv1=pool2")
    # a bare rule skips layers it does not fit, and layers already reduced
    assert ReducedStore(stores["gap"], "pool2").info.reductions["conv1"] == "gap"
    assert parse_rules({"block*": "pool(4)"})[0][1] == Reduction("pool", 4)
    assert str(Reduction.parse("POOL:3")) == "pool3"


def test_extract_refuses_a_reduction_that_does_not_fit(tmp_path, images):
    with pytest.raises(ReductionError, match="'fc'.*'gap' pools maps"):
        extract(_Net(0), images, tmp_path / "bad.zarr", layers=LAYERS, reduce="fc=gap", progress=False)
    assert not (tmp_path / "bad.zarr").exists()
    # resuming with other reductions is refused
    extract(_Net(0), images, tmp_path / "a.zarr", layers=LAYERS, reduce="gap", progress=False)
    with pytest.raises(StoreError, match="different reduce"):
        extract(_Net(0), images, tmp_path / "a.zarr", layers=LAYERS, reduce="pool2", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extraction_time_reductions_on_cuda_equal_cpu(tmp_path, images):
    spec = ["conv1=gap", "conv2=pool2", "conv3=pool3"]
    cpu = extract(_Net(0), images, tmp_path / "cpu.zarr", layers=LAYERS, reduce=spec, progress=False)
    gpu = extract(_Net(0), images, tmp_path / "gpu.zarr", layers=LAYERS, reduce=spec, device="cuda", progress=False)
    for layer in LAYERS:
        np.testing.assert_allclose(ZarrStore(gpu.path).read_layer(layer), ZarrStore(cpu.path).read_layer(layer),
                                   rtol=1e-4, atol=1e-5)
    assert ZarrStore(gpu.path).info.reductions == ZarrStore(cpu.path).info.reductions
