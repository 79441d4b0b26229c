"""extract(): the store equals a direct forward pass, element for element in the stored dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from _extract_models import Counting, MixedOutputs, Reordered, Twice, images, other_cnn, small_cnn
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from extract import StoreError, ZarrStore, extract
from extract.writer import ChunkWriter


def direct_outputs(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, list[torch.Tensor]]:
    """Every call's output of each named module, from plain hooks of our own (an independent capture)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    modules = dict(model.named_modules())

    def grab(name):
        def hook(module, args, output):
            if isinstance(output, tuple):
                output = output[0]
            elif isinstance(output, dict):
                output = output["hidden"]
            elif hasattr(output, "last_hidden_state"):
                output = output.last_hidden_state
            seen[name].append(output.detach().clone())
        return hook

    handles = [modules[name].register_forward_hook(grab(name)) for name in layers]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def expected_arrays(model, x, layers, dtype=torch.float32, batch_size=None) -> dict[str, np.ndarray]:
    """Direct forward passes over the same batches (BLAS results depend on the batch shape)."""
    batch_size = batch_size or len(x)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), batch_size):
        for name, calls in direct_outputs(model, x[start : start + batch_size], layers).items():
            for i, tensor in enumerate(calls):
                parts.setdefault(name if i == 0 else f"{name}#{i}", []).append(tensor.to(dtype).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


CASES = {
    "conv and linear": (small_cnn, ["conv1", "conv2", "fc1", "fc2"], ["conv1", "conv2", "fc1", "fc2"]),
    "tuple, dict and dataclass blocks": (
        lambda: (torch.manual_seed(1), MixedOutputs())[1],
        ["conv", "tuple_block", "dict_block", "dataclass_block"],
        ["conv", "tuple_block", "dict_block", "dataclass_block"],
    ),
    "module called twice": (lambda: (torch.manual_seed(2), Twice())[1], ["shared", "head"],
                            ["shared", "shared#1", "head"]),
    "execution order differs from registration": (Reordered, ["first", "second", "third"],
                                                  ["third", "first", "second"]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_equals_a_direct_forward_pass(tmp_path, case, dtype):
    factory, patterns, stored_layers = CASES[case]
    model = factory()
    x = images(37)
    # small chunks and a batch size that does not divide them: several chunks, a partial last one
    result = extract(model, x, tmp_path / "m.zarr", layers=patterns, batch_size=5, dtype=dtype,
                     chunk_bytes=2000, progress=False)
    store = ZarrStore(tmp_path / "m.zarr")
    info = store.info
    assert info.complete and info.samples_done == 37 and info.n_samples == 37
    assert store.layers == stored_layers == result.layers  # capture order = execution order
    assert info.dtype == dtype and info.chunk_samples < 37
    base = {name.split("#")[0] for name in stored_layers}
    expected = expected_arrays(model, x, sorted(base), getattr(torch, dtype), batch_size=5)
    assert set(expected) == set(stored_layers)
    for layer in stored_layers:
        got = store.read_layer(layer)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, expected[layer], err_msg=layer)
    np.testing.assert_array_equal(store.read_inputs(), x.numpy().reshape(37, -1))


def test_attributes_and_plain_zarr_layout(tmp_path):
    model = small_cnn()
    extract(model, images(20), tmp_path / "m.zarr", name="cnn", layers=["conv*", "fc1"], progress=False,
            model_spec="tests:small_cnn")
    attrs = zarr.open_group(tmp_path / "m.zarr", mode="r").attrs["simtorch"]
    assert attrs["model_name"] == "cnn" and attrs["model_spec"] == "tests:small_cnn"
    assert attrs["layers"] == ["conv1", "conv2", "fc1"]
    assert attrs["complete"] is True and attrs["n_samples"] == 20 and attrs["dtype"] == "float32"
    assert attrs["fingerprint"].startswith("sha256:") and attrs["fingerprint"].endswith(":n=20")
    assert len(attrs["weights_digest"]) == 64
    assert {"simtorch", "torch", "zarr", "numpy"} <= set(attrs["versions"])
    group = zarr.open_group(tmp_path / "m.zarr", mode="r")
    assert group["layers/conv2"].shape == (20, 8, 8, 8)  # per-sample shape kept
    assert group["inputs"].shape == (20, 64)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batches_that_straddle_chunks(tmp_path, batch_size):
    model, x = small_cnn(), images(23)
    extract(model, x, tmp_path / "ref.zarr", layers=["conv2", "fc2"], batch_size=23, progress=False)
    extract(model, x, tmp_path / "b.zarr", layers=["conv2", "fc2"], batch_size=batch_size, chunk_bytes=3000,
            progress=False)
    ref, other = ZarrStore(tmp_path / "ref.zarr"), ZarrStore(tmp_path / "b.zarr")
    assert other.info.chunk_samples == 1  # conv2 is 2 KB per sample: one row per chunk
    assert ref.info.fingerprint == other.info.fingerprint  # independent of batching and chunking
    expected = expected_arrays(model, x, ["conv2", "fc2"], batch_size=batch_size)
    for layer in ref.layers:
        np.testing.assert_array_equal(other.read_layer(layer), expected[layer])


def test_dataset_dataloader_and_dict_batches(tmp_path):
    x = images(12)

    class Pairs(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return x[i], i  # (inputs, target)

    model = small_cnn()
    extract(model, Pairs(), tmp_path / "ds.zarr", layers=["fc1"], batch_size=4, progress=False)
    extract(model, DataLoader(TensorDataset(x), batch_size=4), tmp_path / "dl.zarr", layers=["fc1"], progress=False)
    expected = expected_arrays(model, x, ["fc1"], batch_size=4)["fc1"]
    for name in ("ds", "dl"):
        np.testing.assert_array_equal(ZarrStore(tmp_path / f"{name}.zarr").read_layer("fc1"), expected)
    with pytest.raises(ValueError, match="shuffles its data.*shuffle=False"):
        extract(model, DataLoader(TensorDataset(x), shuffle=True), tmp_path / "s.zarr", layers=["fc1"])


def test_rerun_is_a_cache_hit_without_inference_and_force_redoes_it(tmp_path):
    model = Counting(small_cnn())
    x = images(30)
    first = extract(model, x, tmp_path / "m.zarr", layers=["inner.fc1"], batch_size=10, progress=False)
    assert not first.cached and model.calls == 3
    again = extract(model, x, tmp_path / "m.zarr", layers=["inner.fc1"], batch_size=10, progress=False)
    assert again.cached and model.calls == 3  # no forward pass
    forced = extract(model, x, tmp_path / "m.zarr", layers=["inner.fc1"], batch_size=10, force=True, progress=False)
    assert not forced.cached and model.calls == 6
    assert ZarrStore(tmp_path / "m.zarr").info.complete


def test_store_from_a_different_model_or_data_is_refused(tmp_path):
    path = tmp_path / "m.zarr"
    extract(small_cnn(), images(16), path, layers=["fc1"], progress=False)
    with pytest.raises(StoreError, match="different weights_digest.*--force"):
        extract(small_cnn(seed=5), images(16), path, layers=["fc1"], progress=False)
    with pytest.raises(StoreError, match="different weights_digest.*--force"):
        extract(other_cnn(), images(16), path, layers=["fc1"], progress=False)
    with pytest.raises(StoreError, match="different layer_patterns"):
        extract(small_cnn(), images(16), path, layers=["fc2"], progress=False)
    with pytest.raises(StoreError, match="different data.*--force"):
        extract(small_cnn(), images(16, seed=9), path, layers=["fc1"], progress=False)
    with pytest.raises(StoreError, match="different data"):
        extract(small_cnn(), images(17), path, layers=["fc1"], progress=False)
    assert ZarrStore(path).info.complete  # the refusals left the store alone


def test_model_failure_names_the_batch_and_leaves_no_store(tmp_path):
    from _extract_models import failing

    with pytest.raises(RuntimeError, match=r"failed on batch 2 \(samples 8\.\.11\).*synthetic failure"):
        extract(failing(), images(20), tmp_path / "f.zarr", layers=["fc1"], batch_size=4, chunk_bytes=10**6,
                progress=False)
    assert not (tmp_path / "f.zarr").exists()


def test_wrong_input_shape_is_reported_with_the_fix(tmp_path):
    with pytest.raises(RuntimeError, match=r"batch 0.*shape \(4, 3, 8, 8\) float32.*shape and dtype the model expects"):
        extract(small_cnn(), torch.zeros(8, 3, 8, 8), tmp_path / "w.zarr", layers=["fc1"], batch_size=4,
                progress=False)
    assert not (tmp_path / "w.zarr").exists()
    with pytest.raises(TypeError, match="Expected a tensor, NumPy array, Dataset or DataLoader, got list"):
        extract(small_cnn(), [1, 2, 3], tmp_path / "w.zarr", layers=["fc1"])


def test_a_failed_write_surfaces_on_the_main_thread_and_stops_early(tmp_path):
    calls = []

    class Broken:
        def write(self, key, start, block):
            calls.append(start)
            raise OSError(28, "No space left on device")

    writer = ChunkWriter(Broken(), chunk_samples=2, start=0, on_chunk_written=lambda stop, i: None,
                         write_bytes=1)  # one chunk per write
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):
            writer.add({"a": np.zeros((2, 3), np.float32)})
    writer.abort()
    assert len(calls) <= 3  # the error stopped the loop within the queue's bound


def test_float16_overflow_is_stored_as_inf_like_torch(tmp_path):
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Identity()

        def forward(self, x):
            return self.scale(x * 1e6)

    x = images(6)
    extract(Big(), x, tmp_path / "h.zarr", layers=["scale"], dtype="float16", progress=False)
    np.testing.assert_array_equal(ZarrStore(tmp_path / "h.zarr").read_layer("scale"),
                                  (x * 1e6).to(torch.float16).numpy())


def test_no_inputs_option(tmp_path):
    extract(small_cnn(), images(5), tmp_path / "n.zarr", layers=["fc1"], store_inputs=False, progress=False)
    store = ZarrStore(tmp_path / "n.zarr")
    assert not store.info.inputs_stored and not store.has_array("inputs")


def test_a_full_disk_is_one_clear_error_and_the_store_stays_resumable(tmp_path, monkeypatch):
    import extract.store as store_module

    original = store_module.ZarrStore.write
    writes = []

    def write(self, key, start, block):
        writes.append(start)
        if start >= 10:  # the first chunk (rows 0..9) lands, then the disk is full
            raise OSError(28, "No space left on device")
        original(self, key, start, block)

    monkeypatch.setattr(store_module.ZarrStore, "write", write)
    monkeypatch.setattr("extract.writer.WRITE_BYTES", 1)  # one chunk per write, as on a store of wide layers
    path = tmp_path / "m.zarr"
    kwargs = dict(layers=["conv2", "fc1"], batch_size=4, chunk_bytes=10 * 2048, progress=False)
    with pytest.raises(StoreError, match=r"Writing the store at .*m.zarr failed \(No space left on device\); "
                                         r"free disk space or choose a writable --out, then rerun"):
        extract(small_cnn(), images(40), path, **kwargs)
    info = ZarrStore(path).info
    assert not info.complete and info.samples_done == 10
    monkeypatch.setattr(store_module.ZarrStore, "write", original)
    result = extract(small_cnn(), images(40), path, **kwargs)
    assert result.resumed_from == 10
    expected = expected_arrays(small_cnn(), images(40), ["conv2", "fc1"], batch_size=4)
    for layer in ("conv2", "fc1"):
        np.testing.assert_array_equal(ZarrStore(path).read_layer(layer), expected[layer])


def test_a_model_that_modifies_its_input_in_place(tmp_path):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 3)

        def forward(self, x):
            x.mul_(2)  # some models normalise their input in place
            return self.lin(x.flatten(1))

    x = images(9)
    original = x.clone()
    extract(InPlace(), x, tmp_path / "i.zarr", layers=["lin"], batch_size=4, chunk_bytes=10**6, progress=False)
    extract(small_cnn(), x, tmp_path / "ref.zarr", layers=["fc1"], progress=False)
    assert torch.equal(x, original)  # the caller's data is untouched
    store, ref = ZarrStore(tmp_path / "i.zarr"), ZarrStore(tmp_path / "ref.zarr")
    np.testing.assert_array_equal(store.read_inputs(), original.numpy().reshape(9, -1))  # inputs as given
    assert store.info.fingerprint == ref.info.fingerprint


def test_extract_options_object_is_the_keyword_options(tmp_path):
    import dataclasses
    import inspect

    from extract import ExtractOptions

    defaults = {name: p.default for name, p in inspect.signature(extract).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "options"}
    assert defaults == {f.name: f.default for f in dataclasses.fields(ExtractOptions)}
    x = images(20, seed=4)
    by_keywords = extract(small_cnn(), x, tmp_path / "kw.zarr", layers=["conv2", "fc2"], batch_size=6,
                          dtype="float16", chunk_bytes=4096, progress=False)
    options = ExtractOptions(layers=["conv2", "fc2"], batch_size=6, dtype="float16", chunk_bytes=4096, progress=False)
    by_object = extract(small_cnn(), x, tmp_path / "obj.zarr", options=options)
    assert by_keywords.layers == by_object.layers and not by_object.cached
    a, b = ZarrStore(tmp_path / "kw.zarr"), ZarrStore(tmp_path / "obj.zarr")
    assert a.info.request == b.info.request and a.info.chunk_samples == b.info.chunk_samples
    for layer in a.layers:
        np.testing.assert_array_equal(a.read_layer(layer), b.read_layer(layer))
    with pytest.raises(TypeError, match="either as options="):
        extract(small_cnn(), x, tmp_path / "both.zarr", options=options, batch_size=3)
