"""Stores open with xarray: every array names its axes (Zarr v3 ``dimension_names``), chunk files unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_models import images, small_cnn
from _stores import write_store

from extract import ZarrStore, extract
from extract.store.chunk_files import ChunkFiles

xr = pytest.importorskip("xarray")

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def open_layers(path: Path):
    """The documented call (extract.store.format)."""
    return xr.open_zarr(path, group="layers", zarr_format=3, consolidated=False)


@pytest.fixture(scope="module")
def cnn_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xr") / "cnn.zarr"
    extract(small_cnn(), images(23), path, layers=LAYERS, batch_size=5, chunk_bytes=4 * 512, progress=False)
    return path


def chunk_digests(path: Path) -> dict[str, str]:
    """SHA-256 of every chunk file (everything but the zarr.json documents)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != "zarr.json"}


def test_each_layer_is_a_dataarray_with_named_dims_and_the_stored_values(cnn_store):
    store = ZarrStore(cnn_store)
    ds = open_layers(cnn_store)
    assert sorted(ds.data_vars) == sorted(LAYERS)
    expected = {
        "conv1": ("sample", "conv1.channel", "conv1.height", "conv1.width"),
        "conv2": ("sample", "conv2.channel", "conv2.height", "conv2.width"),
        "fc1": ("sample", "fc1.feature"),
        "fc2": ("sample", "fc2.feature"),
    }
    for layer, dims in expected.items():
        da = ds[layer]
        assert da.dims == dims
        assert da.shape == (23, *store.layer_shape(layer))
        np.testing.assert_array_equal(da.values, store.read_layer(layer), err_msg=layer)
    root = xr.open_zarr(cnn_store, zarr_format=3, consolidated=False)
    assert root["inputs"].dims == ("sample", "feature")
    np.testing.assert_array_equal(root["inputs"].values, store.read_inputs())
    # one sample axis for the whole store: layers line up sample by sample
    assert ds.sizes["sample"] == root.sizes["sample"] == 23


def test_text_store_names_tokens_and_the_mask(tmp_path):
    """A token layer kept whole is (sample, token, feature); the attention mask is (sample, token)."""

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(20, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids))

    ids = torch.randint(1, 20, (9, 5))
    mask = torch.ones(9, 5, dtype=torch.long)
    mask[::2, 3:] = 0

    class Texts(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "attention_mask": mask[i]}

    data = torch.utils.data.DataLoader(Texts(), batch_size=3)
    path = tmp_path / "t.zarr"
    torch.manual_seed(0)
    extract(Tokens(), data, path, layers=["embed", "head"], reduce=["embed=flatten", "head=mean"], progress=False)
    ds = open_layers(path)
    assert ds["embed"].dims == ("sample", "embed.token", "embed.feature")
    assert ds["head"].dims == ("sample", "head.feature")
    root = xr.open_zarr(path, zarr_format=3, consolidated=False)
    assert root["mask"].dims == ("sample", "token")
    np.testing.assert_array_equal(root["mask"].values, mask.numpy())
    np.testing.assert_array_equal(ds["embed"].values, ZarrStore(path).read_layer("embed"))


def test_dimension_names_change_only_zarr_json(cnn_store, tmp_path, monkeypatch):
    """The same extraction without dimension names writes the same chunk files; the fast path still applies."""
    import zarr

    store = ZarrStore(cnn_store)
    for layer in LAYERS:
        assert ChunkFiles.of(store.zarr_array(f"layers/{layer}")) is not None, layer
    original = zarr.Group.create_array

    def without_names(self, *args, **kwargs):
        kwargs.pop("dimension_names", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", without_names)
    plain = tmp_path / "cnn.zarr"
    extract(small_cnn(), images(23), plain, layers=LAYERS, batch_size=5, chunk_bytes=4 * 512, progress=False)
    monkeypatch.undo()
    assert chunk_digests(plain) == chunk_digests(cnn_store)
    named = json.loads((cnn_store / "layers" / "conv1" / "zarr.json").read_text())
    unnamed = json.loads((plain / "layers" / "conv1" / "zarr.json").read_text())
    assert named.pop("dimension_names") == ["sample", "conv1.channel", "conv1.height", "conv1.width"]
    assert unnamed.pop("dimension_names", None) is None
    assert named == unnamed


def test_a_store_without_dimension_names_still_opens(tmp_path, monkeypatch):
    """Stores written before the names existed open in simtorch (integrity checked) and in zarr as before.

    xarray needs the names: it refuses such a store (the format notes say so and how to read one).
    """
    import zarr

    original = zarr.Group.create_array

    def without_names(self, *args, **kwargs):
        kwargs.pop("dimension_names", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", without_names)
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    write_store(tmp_path / "old.zarr", "old", {"a": a})
    monkeypatch.undo()
    assert "dimension_names" not in json.loads((tmp_path / "old.zarr" / "layers" / "a" / "zarr.json").read_text())
    store = ZarrStore(tmp_path / "old.zarr")  # read-only open verifies the metadata digests
    np.testing.assert_array_equal(store.read_layer("a"), a)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "old.zarr" / "layers" / "a", mode="r")[:], a)
    with pytest.raises(KeyError, match="dimension_names"):
        open_layers(tmp_path / "old.zarr")
    # the documented way to read such a store with xarray: name the axes by hand
    da = xr.DataArray(store.read_layer("a"), dims=("sample", "a.feature"))
    np.testing.assert_array_equal(da.values, a)


def test_layer_names_with_slashes_keep_their_folder_and_names(tmp_path):
    """A '/' in a layer name (legal in torch) is a nested array path; its dimension names carry the full name."""
    a = np.ones((6, 3), dtype=np.float32)
    write_store(tmp_path / "s.zarr", "s", {"enc/fc": a})
    doc = json.loads((tmp_path / "s.zarr" / "layers" / "enc" / "fc" / "zarr.json").read_text())
    assert doc["dimension_names"] == ["sample", "enc/fc.feature"]
