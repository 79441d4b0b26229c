"""Activation stores: one behaviour class for every backend, the on-disk format, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from extract import ActivationStore, MemoryStore, StoreError, StoreInfo, ZarrStore, open_store
from extract.store import chunk_samples


class StoreTests:
    """Behaviour every ``ActivationStore`` backend shares; subclasses set ``make``."""

    def make(self, tmp_path: Path) -> ActivationStore:
        raise NotImplementedError

    def test_roundtrip_rows_and_info(self, tmp_path):
        store = self.make(tmp_path)
        info = StoreInfo(model_name="m", layers=["a", "b"], n_samples=10, chunk_samples=4)
        store.write_info(info)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((10, 3, 2)).astype(np.float32)
        b = rng.standard_normal((10, 5)).astype(np.float16)
        store.create_array("layers/a", a.shape, "float32", 4)
        store.create_array("layers/b", b.shape, "float16", 4)
        for start in (0, 4, 8):  # whole chunks, the last one partial
            store.write("layers/a", start, a[start : start + 4])
            store.write("layers/b", start, b[start : start + 4])
        assert store.layers == ["a", "b"] and store.n_samples == 10 and store.name == "m"
        assert store.layer_shape("a") == (3, 2)
        np.testing.assert_array_equal(store.read_layer("a"), a)
        np.testing.assert_array_equal(store.read_layer("a", 3, 7), a[3:7])
        assert store.read_layer("b").dtype == np.float16
        np.testing.assert_array_equal(store.read_layer("b"), b)
        assert store.has_array("layers/a") and not store.has_array("layers/zzz")

    def test_read_into_a_buffer(self, tmp_path):
        store = self.make(tmp_path)
        store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=10, chunk_samples=4))
        a = np.random.default_rng(2).standard_normal((10, 3, 2)).astype(np.float32)
        store.create_array("layers/a", a.shape, "float32", 4)
        for start in (0, 4, 8):
            store.write("layers/a", start, a[start : start + 4])
        assert store.array_dtype("layers/a") == np.float32
        out = np.full((5, 3, 2), np.nan, np.float32)
        assert store.read_layer("a", 3, 8, out=out) is out  # across a chunk boundary, not chunk-aligned
        np.testing.assert_array_equal(out, a[3:8])
        whole = np.empty_like(a)
        np.testing.assert_array_equal(store.read("layers/a", out=whole), a)

    def test_an_all_zero_chunk_is_stored(self, tmp_path):
        # a dead ReLU layer has all-zero chunks; the complete store must still read (zarr skips writing
        # chunks equal to the fill value unless told not to, and a complete store refuses missing chunks)
        store = self.make(tmp_path)
        store.create_array("layers/a", (8, 3), "float32", 4)
        store.write("layers/a", 0, np.zeros((4, 3), np.float32))
        store.write("layers/a", 4, np.ones((4, 3), np.float32))
        store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=8, chunk_samples=4,
                                   samples_done=8, complete=True))
        expected = np.concatenate([np.zeros((4, 3)), np.ones((4, 3))]).astype(np.float32)
        np.testing.assert_array_equal(store.read_layer("a"), expected)

    def test_an_all_zero_chunk_written_in_parts_is_stored(self, tmp_path):
        # rows written in pieces smaller than a chunk go through zarr, which skips an all-zero chunk unless told not to
        store = self.make(tmp_path)
        store.create_array("layers/a", (6, 3), "float32", 4)
        store.write("layers/a", 0, np.zeros((2, 3), np.float32))
        store.write("layers/a", 2, np.zeros((2, 3), np.float32))
        store.write("layers/a", 4, np.zeros((2, 3), np.float32))  # the edge chunk, also all zero
        store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=6, chunk_samples=4,
                                   samples_done=6, complete=True))
        np.testing.assert_array_equal(store.read_layer("a"), np.zeros((6, 3), np.float32))

    def test_unknown_layer_names_the_layers(self, tmp_path):
        store = self.make(tmp_path)
        store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=2))
        with pytest.raises(StoreError, match=r"has no layer 'b'; its layers are \['a'\]"):
            store.read_layer("b")

    def test_missing_inputs_explain_the_fix(self, tmp_path):
        store = self.make(tmp_path)
        store.write_info(StoreInfo(model_name="m", layers=[], n_samples=2, inputs_stored=False))
        with pytest.raises(StoreError, match="holds no inputs.*--no-inputs"):
            store.read_inputs()

    def test_incomplete_store_is_refused(self, tmp_path):
        store = self.make(tmp_path)
        store.create_array("layers/a", (10, 2), "float32", 4)
        store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=10, samples_done=4))
        with pytest.raises(StoreError, match="incomplete \\(4 of 10 samples"):
            store.require_complete()
        info = store.info
        info.complete, info.samples_done = True, 10
        store.write_info(info)
        store.require_complete()


class TestMemoryStore(StoreTests):
    def make(self, tmp_path):
        return MemoryStore()


class TestZarrStore(StoreTests):
    def make(self, tmp_path):
        return ZarrStore(tmp_path / "s.zarr", read_only=False, create=True)

    def test_read_only_refuses_writes(self, tmp_path):
        store = self.make(tmp_path)
        store.write_info(StoreInfo(model_name="m"))
        store.create_array("layers/a", (2, 2), "float32", 2)
        reopened = ZarrStore(tmp_path / "s.zarr")
        with pytest.raises(StoreError, match="read-only; open it with read_only=False"):
            reopened.write("layers/a", 0, np.zeros((2, 2), np.float32))
        with pytest.raises(StoreError, match="read-only"):
            reopened.write_info(StoreInfo(model_name="x"))


def _complete_store(tmp_path: Path, n: int = 50, chunk: int = 8) -> tuple[Path, np.ndarray]:
    path = tmp_path / "c.zarr"
    store = ZarrStore(path, read_only=False, create=True)
    x = np.random.default_rng(1).standard_normal((n, 6, 5)).astype(np.float32)
    store.create_array("layers/conv", x.shape, "float32", chunk)
    for start in range(0, n, chunk):
        store.write("layers/conv", start, x[start : start + chunk])
    store.write_info(StoreInfo(model_name="m", layers=["conv"], n_samples=n, chunk_samples=chunk,
                               samples_done=n, complete=True))
    return path, x


def test_format_is_plain_zarr_and_dask(tmp_path):
    import dask.array as da
    import zarr

    path, x = _complete_store(tmp_path)
    group = zarr.open_group(path, mode="r")
    attrs = group.attrs["simtorch"]
    assert attrs["layers"] == ["conv"] and attrs["complete"] is True and attrs["n_samples"] == 50
    array = group["layers/conv"]
    assert array.chunks == (8, 6, 5)  # chunked along samples only
    codecs = json.loads((path / "layers" / "conv" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"]
    assert codecs[1]["configuration"]["cname"] == "lz4" and codecs[1]["configuration"]["shuffle"] == "noshuffle"
    np.testing.assert_array_equal(array[:], x)
    np.testing.assert_allclose(da.from_zarr(array).mean(axis=0).compute(), x.mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_index", [0, 3, 6])
def test_flipped_byte_in_a_chunk_is_detected(tmp_path, chunk_index):
    path, x = _complete_store(tmp_path)
    chunk_file = path / "layers" / "conv" / "c" / str(chunk_index) / "0" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk_file.write_bytes(bytes(raw))
    store = ZarrStore(path)
    rows = f"{chunk_index * 8}:{min(50, chunk_index * 8 + 8)}"
    with pytest.raises(StoreError) as excinfo:
        store.read_layer("conv")
    message = str(excinfo.value)
    assert str(path) in message and "'layers/conv'" in message
    assert f"chunk {chunk_index} (rows {rows}, file layers/conv/c/{chunk_index}/0/0)" in message
    assert "checksum mismatch (crc32c)" in message
    assert "--force" in message
    # the other chunks still read
    other = 1 if chunk_index == 0 else 0
    np.testing.assert_array_equal(store.read_layer("conv", other * 8, other * 8 + 8), x[other * 8 : other * 8 + 8])


def test_open_store_by_type(tmp_path):
    path, _ = _complete_store(tmp_path)
    assert isinstance(open_store(path), ZarrStore)
    assert isinstance(open_store(str(path)), ZarrStore)
    memory = MemoryStore()
    assert open_store(memory) is memory
    with pytest.raises(TypeError, match="got int"):
        open_store(3)
    with pytest.raises(StoreError, match="No store at"):
        open_store(tmp_path / "missing.zarr")


def test_a_zarr_group_that_is_not_a_store(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not a simtorch store"):
        ZarrStore(tmp_path / "plain.zarr")


@pytest.mark.parametrize(("bytes_per_sample", "n", "chunk_bytes", "expected"), [
    (4096, 540, 4 * 2**20, 540),  # fits in one chunk
    (4096, 1797, 4 * 2**20, 899),  # two even chunks, not 1024 + 773
    (10, 7, 1, 1),  # at least one row per chunk
    (100, 1000, 1000, 10),
])
def test_chunk_rows_are_even_and_bounded(bytes_per_sample, n, chunk_bytes, expected):
    rows = chunk_samples(bytes_per_sample, n, chunk_bytes)
    assert rows == expected
    assert rows * bytes_per_sample <= max(chunk_bytes, bytes_per_sample)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_chunk_files_are_byte_identical_to_zarr(tmp_path, dtype):
    # ZarrStore.write encodes whole chunks itself (extract.store.chunk_files); zarr must have written the same bytes
    import zarr

    from extract.store.chunk_files import ChunkFiles

    x = np.maximum(np.random.default_rng(5).standard_normal((23, 6, 5)), 0).astype(dtype)  # ReLU-like zeros
    store = ZarrStore(tmp_path / "ours.zarr", read_only=False, create=True)
    store.create_array("layers/a", x.shape, dtype, 4)
    store.write("layers/a", 0, x[:9])  # two whole chunks directly, one row through zarr
    store.write("layers/a", 9, x[9:12])  # the rest of that chunk through zarr
    store.write("layers/a", 12, x[12:])  # two whole chunks directly, the partial edge chunk through zarr
    reference = ZarrStore(tmp_path / "zarr.zarr", read_only=False, create=True)
    reference.create_array("layers/a", x.shape, dtype, 4)
    zarr.open_group(tmp_path / "zarr.zarr", mode="r+")["layers/a"].with_config({"write_empty_chunks": True})[:] = x
    ours, theirs = (sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
                    for folder in (tmp_path / "ours.zarr/layers/a/c", tmp_path / "zarr.zarr/layers/a/c"))
    assert ours == theirs and len(ours) == 6
    for name in ours:
        assert (tmp_path / "ours.zarr/layers/a/c" / name).read_bytes() == \
            (tmp_path / "zarr.zarr/layers/a/c" / name).read_bytes(), name
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
    array = zarr.open_array(tmp_path / "ours.zarr/layers/a", mode="r")
    np.testing.assert_array_equal(array[:], x)
    files = ChunkFiles.of(array)
    assert files.whole_chunks(12, 11) == 8 and files.whole_chunks(13, 8) == 0
    assert files.whole_chunks(24, 8) == 0  # past the end: left to zarr, which refuses it


def test_direct_chunk_files_only_for_the_chain_they_reproduce(tmp_path):
    import zarr
    from zarr.codecs import ZstdCodec

    from extract.store.chunk_files import ChunkFiles
    from extract.store.format import chunk_codecs

    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    other = group.create_array("zstd", shape=(8, 3), chunks=(4, 3), dtype="float32", compressors=[ZstdCodec()])
    rows = group.create_array("rows", shape=(8, 6), chunks=(4, 6), dtype="float32", compressors=chunk_codecs())
    # the store's own codecs, but chunked along the features too: a chunk file holds part of each row
    grid = group.create_array("grid", shape=(8, 6), chunks=(4, 3), dtype="float32", compressors=chunk_codecs())
    assert ChunkFiles.of(rows) is not None
    assert ChunkFiles.of(other) is None and ChunkFiles.of(grid) is None


@pytest.mark.parametrize(("start", "stop"), [(0, 23), (0, 8), (3, 9), (5, 23), (20, 23), (7, 7)])
def test_direct_chunk_reads_match_the_rows(tmp_path, start, stop):
    # ZarrStore.read decodes chunk files straight into the result (extract.store.chunk_files), zarr only as fallback
    import zarr

    from extract.store.chunk_files import ChunkFiles

    x = np.random.default_rng(6).standard_normal((23, 6, 5)).astype(np.float32)
    store = ZarrStore(tmp_path / "s.zarr", read_only=False, create=True)
    store.write_info(StoreInfo(model_name="m", layers=["a"], n_samples=23, chunk_samples=4))
    store.create_array("layers/a", x.shape, "float32", 4)
    zarr.open_array(tmp_path / "s.zarr/layers/a", mode="r+")[:] = x  # written by zarr, read by ChunkFiles
    files = ChunkFiles.of(zarr.open_array(tmp_path / "s.zarr/layers/a", mode="r"))
    out = np.full((stop - start, 6, 5), np.nan, np.float32)
    assert files.read(start, out)
    np.testing.assert_array_equal(out, x[start:stop])
    np.testing.assert_array_equal(store.read("layers/a", start, stop), x[start:stop])
    assert not files.read(start, np.empty((stop - start, 6, 5), np.float64))  # another dtype: zarr converts
    assert not files.read(20, np.empty((5, 6, 5), np.float32))  # past the end


def test_direct_chunk_reads_give_way_to_zarr_on_a_bad_chunk(tmp_path):
    import zarr

    from extract.store.chunk_files import ChunkFiles

    path, x = _complete_store(tmp_path)
    files = ChunkFiles.of(zarr.open_array(path / "layers/conv", mode="r"))
    out = np.empty((16, *x.shape[1:]), np.float32)
    assert files.read(0, out)
    chunk_file = path / "layers" / "conv" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk_file.write_bytes(bytes(raw))
    assert not files.read(0, out)  # CRC-32C mismatch
    import crc32c
    import numcodecs

    short = numcodecs.Blosc(cname="lz4").encode(x[:3].tobytes())  # a valid frame with a valid CRC, 3 rows not 8
    chunk_file.write_bytes(short + crc32c.crc32c(short).to_bytes(4, "little"))
    assert not files.read(0, out)
    chunk_file.unlink()
    assert not files.read(0, out)  # missing file


def test_layer_names_that_only_share_a_prefix_can_both_be_stored():
    from extract.store.format import layer_name_problem

    layers = ["conv1", "conv10", "block", "block_2", "a", "a/b"]
    assert layer_name_problem("conv1", layers) == "" and layer_name_problem("conv10", layers) == ""
    assert layer_name_problem("block", layers) == ""  # 'block_2' is a sibling, not a layer inside 'block'
    assert "would be the folder of layer 'a/b'" in layer_name_problem("a", layers)


def test_store_attributes_from_a_later_version_still_open():
    """Fields this version does not know (written by a later one) are left out, not refused."""
    from dataclasses import asdict

    info = StoreInfo(model_name="m", layers=["a"], n_samples=4, chunk_samples=2)
    assert StoreInfo.from_dict({**asdict(info), "added_in_a_later_version": {"x": 1}}) == info


def test_flipped_byte_in_an_uncompressed_chunk_is_detected(tmp_path):
    """Arrays stored without compression (the statistics cache's) are read straight from their chunk files only
    while each file's CRC-32C matches; a flipped byte sends the read to zarr, which raises."""
    import zarr
    from zarr.codecs import Crc32cCodec

    from extract.store.chunk_files import ChunkFiles

    x = np.random.default_rng(8).standard_normal((8, 5))
    array = zarr.open_group(tmp_path / "g.zarr", mode="w").create_array(
        "raw", shape=x.shape, chunks=(4, 5), dtype="float64", compressors=[Crc32cCodec()])
    array[:] = x
    files = ChunkFiles.of(zarr.open_array(tmp_path / "g.zarr" / "raw", mode="r"))
    out = np.empty_like(x)
    assert files is not None and files.read(0, out)
    np.testing.assert_array_equal(out, x)
    chunk_file = tmp_path / "g.zarr" / "raw" / "c" / "1" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[0] ^= 0x01  # the lowest mantissa bit of row 4's first value: still a valid float64, only the CRC tells
    chunk_file.write_bytes(bytes(raw))
    assert not files.read(0, out)
    assert files.read(0, out[:4])  # the first chunk is intact


def test_edited_array_metadata_of_a_complete_store_is_refused(tmp_path):
    path, _ = _complete_store(tmp_path)
    document = path / "layers" / "conv" / "zarr.json"
    metadata = json.loads(document.read_text())
    metadata["dimension_names"] = ["sample", "edited", "edited_too"]  # still a valid array: only the digest tells
    document.write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match=r"metadata layers/conv/zarr.json does not match the digest"):
        ZarrStore(path).read_layer("conv")
