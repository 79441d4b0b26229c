"""Inputs people have, through the real CLI: folders of image files (written with Pillow in several
modes and formats) and float64 / uint8 arrays, each giving a store equal to a plain forward pass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from _extract_models import rgb_net
from PIL import Image

import pipeline
from extract import ZarrStore
from extract.errors import StoreError
from extract.images import ImageFolder, ImagePreprocessing

LAYERS = ["conv", "fc"]


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _image_tree(root):
    """Random-pixel images of several modes and formats: two class folders (one nested), one top-level file."""
    rng = np.random.default_rng(1)

    def pixels(h, w, c=3):
        return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    _save(root / "cats" / "b.png", Image.fromarray(pixels(20, 28)))
    _save(root / "cats" / "a.jpg", Image.fromarray(pixels(30, 18)), quality=95)
    _save(root / "dogs" / "grey.png", Image.fromarray(pixels(19, 19, 1)))
    _save(root / "dogs" / "deep" / "alpha.png", Image.fromarray(pixels(24, 17, 4), "RGBA"))
    _save(root / "dogs" / "pal.gif", Image.fromarray(pixels(22, 22)).convert("P"))
    _save(root / "top.webp", Image.fromarray(pixels(25, 21)), lossless=True)
    (root / "README.txt").write_text("not an image, skipped by its suffix")
    return ["cats/a.jpg", "cats/b.png", "dogs/deep/alpha.png", "dogs/grey.png", "dogs/pal.gif", "top.webp"], \
        ["cats", "cats", "dogs", "dogs", "dogs", ""]


def _run(argv, capsys):
    code = pipeline.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _extract_args(data, out, name, *extra):
    return ["extract", "--model", "_extract_models:rgb_net", "--data", str(data), "--layers", *LAYERS,
            "--out", str(out), "--name", name, "--quiet", "--batch-size", "4", *extra]


def _forward(x: torch.Tensor) -> dict[str, np.ndarray]:
    """The layers of ``rgb_net`` on ``x``, by a plain forward pass with hooks (no simtorch)."""
    model, seen = rgb_net().eval(), {}
    for name in LAYERS:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        model(x)
    return {k: v.numpy() for k, v in seen.items()}


def _plain(path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", zarr_format=3)


def _assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ----------------------------------------------------------------------------- image folders
def test_image_folder_store_equals_forward_pass_and_records_paths_and_classes(tmp_path, capsys):
    files, classes = _image_tree(tmp_path / "stimuli")
    code, out, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "imgs", "--image-size", "16"), capsys)
    assert code == 0, err
    path = tmp_path / "out" / "imgs.zarr"
    # the same files, preprocessed alone: (3, 16, 16) each, shorter side 18, centre crop, ImageNet mean/std
    folder = ImageFolder(tmp_path / "stimuli", ImagePreprocessing(size=16))
    x = torch.stack([folder[i] for i in range(len(folder))])
    expected = _forward(x)
    group = _plain(path)
    for layer in LAYERS:
        np.testing.assert_allclose(group[f"layers/{layer}"][:], expected[layer], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(group["inputs"][:], x.flatten(1).numpy())
    assert [str(p) for p in group["sample_path"][:]] == files
    assert [str(c) for c in group["sample_class"][:]] == classes
    store = ZarrStore(path)
    assert store.info.complete and store.sample_labels() == (files, classes)
    # a second run reuses the finished store (same fingerprint) and keeps the labels
    code, out, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "imgs", "--image-size", "16"), capsys)
    assert code == 0 and "already complete" in out, (out, err)
    assert ZarrStore(path).sample_labels() == (files, classes)


def test_image_options_from_flags_and_toml(tmp_path, capsys):
    _image_tree(tmp_path / "stimuli")
    code, _, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "flags", "--image-size", "12",
                                      "--image-resize", "20", "--image-mean", "0.5", "0.4", "0.3",
                                      "--image-std", "0.2", "0.25", "0.3"), capsys)
    assert code == 0, err
    custom = ImageFolder(tmp_path / "stimuli", ImagePreprocessing(size=12, resize=20, mean=(0.5, 0.4, 0.3),
                                                                 std=(0.2, 0.25, 0.3)))
    want = torch.stack([custom[i] for i in range(len(custom))]).flatten(1).numpy()
    np.testing.assert_array_equal(_plain(tmp_path / "out" / "flags.zarr")["inputs"][:], want)

    config = tmp_path / "images.toml"
    config.write_text(f'data = "{tmp_path / "stimuli"}"\nout = "{tmp_path / "out"}"\nimage_size = 10\n'
                      'no_normalize = true\n[[models]]\nmodel = "_extract_models:rgb_net"\nname = "toml"\n'
                      'layers = ["conv", "fc"]\n')
    code, _, err = _run(["extract", "--config", str(config), "--quiet"], capsys)
    assert code == 0, err
    raw = ImageFolder(tmp_path / "stimuli", ImagePreprocessing(size=10, normalize=False))
    want = torch.stack([raw[i] for i in range(len(raw))]).flatten(1).numpy()
    stored = _plain(tmp_path / "out" / "toml.zarr")["inputs"][:]
    np.testing.assert_array_equal(stored, want)
    assert stored.min() >= 0 and stored.max() <= 1


def test_image_options_travel_to_dask_tasks(tmp_path, capsys):
    pytest.importorskip("dask")
    files, classes = _image_tree(tmp_path / "stimuli")
    code, _, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "dask", "--image-size", "12",
                                      "--no-normalize", "--scheduler", "threads"), capsys)
    assert code == 0, err
    raw = ImageFolder(tmp_path / "stimuli", ImagePreprocessing(size=12, normalize=False))
    store = ZarrStore(tmp_path / "out" / "dask.zarr")
    np.testing.assert_array_equal(store.read_inputs(), torch.stack([raw[i] for i in range(len(raw))]).flatten(1))
    assert store.sample_labels() == (files, classes)


def test_corrupt_image_is_named_and_no_store_is_written(tmp_path, capsys):
    _image_tree(tmp_path / "stimuli")
    bad = tmp_path / "stimuli" / "dogs" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    code, out, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "bad", "--image-size", "16"), capsys)
    _assert_one_line_error(code, err, str(bad), "is not a readable image", "remove or replace it")
    assert not (tmp_path / "out" / "bad.zarr").exists()


def test_truncated_image_stops_the_run_naming_the_file(tmp_path, capsys):
    """A JPEG cut in half passes the header check but fails while the model runs (after the first batch):
    the error names it and no complete store is left."""
    _image_tree(tmp_path / "stimuli")
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / "stimuli" / "zz" / "cut.jpg"  # the last sample, in the second batch
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert len(ImageFolder(tmp_path / "stimuli")) == 7  # listed and its header checked without complaint
    code, out, err = _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "cut", "--image-size", "16"), capsys)
    _assert_one_line_error(code, err, str(cut), "is not a readable image")
    store = tmp_path / "out" / "cut.zarr"
    assert not store.exists() or not ZarrStore(store).info.complete


def test_image_options_need_an_image_folder(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.float32))
    code, _, err = _run(_extract_args(tmp_path / "x.npy", tmp_path / "out", "x", "--image-size", "16"), capsys)
    _assert_one_line_error(code, err, "apply to a folder of images", "drop those options")
    code, _, err = _run(_extract_args(tmp_path, tmp_path / "out", "x", "--image-size", "0"), capsys)
    _assert_one_line_error(code, err, "--image-size", "positive integer")


def test_labels_are_covered_by_the_completion_digests(tmp_path, capsys):
    _image_tree(tmp_path / "stimuli")
    assert _run(_extract_args(tmp_path / "stimuli", tmp_path / "out", "m", "--image-size", "16"), capsys)[0] == 0
    path = tmp_path / "out" / "m.zarr"
    shutil.rmtree(path / "sample_class")
    with pytest.raises(StoreError, match="sample_class/zarr.json"):
        ZarrStore(path)


def test_stores_without_labels_keep_opening(write_store, tmp_path):
    write_store(tmp_path / "old.zarr", "old", {"fc": np.ones((5, 3), np.float32)})
    store = ZarrStore(tmp_path / "old.zarr")
    assert store.info.complete and store.sample_labels() is None


# ----------------------------------------------------------------------------- HF image processors
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny ViT built from a config with its image processor (16 px, its own mean/std), saved offline."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    model_dir = tmp_path_factory.mktemp("vit") / "vit"
    transformers.ViTModel(config, add_pooling_layer=False).eval().save_pretrained(model_dir)
    processor_class = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor_class(size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3],
                    image_std=[0.9, 0.8, 0.7]).save_pretrained(model_dir)
    return model_dir


def test_hf_image_processor_is_used_unless_image_options_are_given(vit_dir, tmp_path, capsys):
    files, _ = _image_tree(tmp_path / "stimuli")
    processor = transformers.AutoImageProcessor.from_pretrained(str(vit_dir), local_files_only=True)
    argv = ["extract", "--model", str(vit_dir), "--data", str(tmp_path / "stimuli"), "--layers", "embeddings",
            "--out", str(tmp_path / "out"), "--quiet"]
    code, _, err = _run([*argv, "--name", "own"], capsys)
    assert code == 0, err
    want = []
    for name in files:
        with Image.open(tmp_path / "stimuli" / name) as image:
            rgb = image.convert("RGBA").convert("RGB") if image.mode in ("P", "RGBA") else image.convert("RGB")
            want.append(processor(images=rgb, return_tensors="pt")["pixel_values"][0].flatten().numpy())
    np.testing.assert_allclose(_plain(tmp_path / "out" / "own.zarr")["inputs"][:], np.stack(want), atol=1e-6)
    # with an image option, simtorch's preprocessing replaces the processor
    code, _, err = _run([*argv, "--name", "flags", "--image-size", "16"], capsys)
    assert code == 0, err
    folder = ImageFolder(tmp_path / "stimuli", ImagePreprocessing(size=16))
    np.testing.assert_array_equal(_plain(tmp_path / "out" / "flags.zarr")["inputs"][:],
                                  torch.stack([folder[i] for i in range(len(folder))]).flatten(1).numpy())


# ----------------------------------------------------------------------------- dtypes of arrays
def test_float64_arrays_are_cast_to_the_model_dtype_with_one_note(tmp_path, capsys):
    x32 = np.random.default_rng(3).standard_normal((9, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x32.npy", x32)
    np.save(tmp_path / "x64.npy", x32.astype(np.float64))
    torch.save(torch.from_numpy(x32.astype(np.float64)), tmp_path / "x64.pt")
    code, _, err = _run(_extract_args(tmp_path / "x32.npy", tmp_path / "out", "f32"), capsys)
    assert code == 0 and "note:" not in err, err
    reference = ZarrStore(tmp_path / "out" / "f32.zarr")
    for name in ("x64.npy", "x64.pt"):
        store_name = name.replace(".", "_")
        code, _, err = _run(_extract_args(tmp_path / name, tmp_path / "out", store_name), capsys)
        assert code == 0, err
        assert err.count("note: --data holds float64; cast to the model's float32") == 1, err
        store = ZarrStore(tmp_path / "out" / f"{store_name}.zarr")
        assert store.info.fingerprint == reference.info.fingerprint
        for layer in LAYERS:
            np.testing.assert_array_equal(store.read_layer(layer), reference.read_layer(layer))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_uint8_images_are_scaled_and_their_layout_read_from_the_channel_axis(tmp_path, capsys, layout):
    pixels = np.random.default_rng(4).integers(0, 256, (7, 3, 10, 12), dtype=np.uint8)  # N, C, H, W
    np.save(tmp_path / "scaled.npy", pixels.astype(np.float32) / 255)
    stored = pixels if layout == "NCHW" else np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    np.save(tmp_path / "u8.npy", stored)
    assert _run(_extract_args(tmp_path / "scaled.npy", tmp_path / "out", "scaled"), capsys)[0] == 0
    code, _, err = _run(_extract_args(tmp_path / "u8.npy", tmp_path / "out", "u8"), capsys)
    assert code == 0, err
    assert err.count("note: --data holds uint8 images; scaled to [0, 1] as float32") == 1, err
    assert ("moved from N,H,W,C to N,C,H,W" in err) == (layout == "NHWC")
    reference, store = ZarrStore(tmp_path / "out" / "scaled.zarr"), ZarrStore(tmp_path / "out" / "u8.zarr")
    assert store.info.fingerprint == reference.info.fingerprint
    np.testing.assert_array_equal(store.read_inputs(), reference.read_inputs())
    expected = _forward(torch.from_numpy(pixels.astype(np.float32) / 255))
    for layer in LAYERS:
        np.testing.assert_allclose(store.read_layer(layer), expected[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shape", "fragment"), [
    ((4, 3, 6, 3), "both axis 1 and axis 3 could be the channel axis"),
    ((4, 1, 6, 1), "both axis 1 and axis 3 could be the channel axis"),
    ((4, 5, 6, 7), "neither axis 1 nor axis 3 holds 1 or 3 channels"),
    ((4, 6, 6), "add the channel axis"),
])
def test_uint8_arrays_of_unclear_layout_are_refused(tmp_path, capsys, shape, fragment):
    np.save(tmp_path / "u8.npy", np.zeros(shape, np.uint8))
    code, _, err = _run(_extract_args(tmp_path / "u8.npy", tmp_path / "out", "u8"), capsys)
    _assert_one_line_error(code, err, "uint8", str(shape), fragment, "float32")
    assert not (tmp_path / "out" / "u8.zarr").exists()
