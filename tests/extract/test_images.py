"""A folder of real image files (written with Pillow in several modes and formats) as a dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from extract.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageFolderError, ImagePreprocessing, list_images


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _colour_images(root):
    """One solid-colour image per mode/format, in class folders and at the top level."""
    red = (200, 30, 90)
    _save(root / "cats" / "b.jpg", Image.new("RGB", (40, 30), red), quality=100)
    _save(root / "cats" / "a.png", Image.new("L", (31, 47), 120))
    _save(root / "dogs" / "z.webp", Image.new("RGB", (33, 33), red), lossless=True)
    _save(root / "dogs" / "deep" / "rgba.png", Image.new("RGBA", (20, 50), (*red, 128)))
    palette = Image.new("P", (25, 25), 3)
    palette.putpalette([0, 0, 0] * 3 + list(red) + [0, 0, 0] * 252)
    _save(root / "dogs" / "p.png", palette, transparency=0)
    _save(root / "top.JPG", Image.new("CMYK", (30, 30), (0, 0, 0, 0)), quality=100)
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "x.png", Image.new("RGB", (8, 8)))
    return red


def test_order_classes_and_modes(tmp_path):
    red = _colour_images(tmp_path)
    assert list_images(tmp_path) == ["cats/a.png", "cats/b.jpg", "dogs/deep/rgba.png", "dogs/p.png",
                                     "dogs/z.webp", "top.JPG"]
    data = ImageFolder(tmp_path, ImagePreprocessing(size=16))
    assert data.classes == ["cats", "cats", "dogs", "dogs", "dogs", ""]
    assert len(data) == 6
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    expected = {
        "cats/a.png": np.array([120, 120, 120]),   # grey expanded to three channels
        "cats/b.jpg": np.array(red),               # JPEG at quality 100: within a few levels
        "dogs/deep/rgba.png": np.array(red),       # the alpha channel is dropped
        "dogs/p.png": np.array(red),               # palette index 3
        "dogs/z.webp": np.array(red),              # lossless WebP
        "top.JPG": np.array([255, 255, 255]),      # CMYK (0, 0, 0, 0) is white
    }
    for i, name in enumerate(data.files):
        sample = data[i]
        assert sample.shape == (3, 16, 16) and sample.dtype == torch.float32
        want = (expected[name] / 255 - mean) / std
        got = sample.numpy().reshape(3, -1)
        tolerance = 3 / 255 / min(IMAGENET_STD) if name.lower().endswith(".jpg") else 1e-5
        np.testing.assert_allclose(got, np.repeat(want[:, None], 256, axis=1), atol=tolerance, err_msg=name)


def test_resize_and_centre_crop_without_normalisation(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(256, 320, 3), dtype=np.uint8)
    _save(tmp_path / "g.png", Image.fromarray(pixels))
    # the shorter side is already 256: no resampling, only the centre crop of 224 (offsets 16 and 48)
    sample = ImageFolder(tmp_path, ImagePreprocessing(size=224, normalize=False))[0].numpy()
    np.testing.assert_allclose(sample, pixels[16:240, 48:272].transpose(2, 0, 1) / 255, atol=1e-7)
    # a custom resize: the shorter side becomes 128, the longer 160; crop 100 centred
    small = ImageFolder(tmp_path, ImagePreprocessing(size=100, resize=128, normalize=False))[0]
    assert small.shape == (3, 100, 100) and 0 <= float(small.min()) and float(small.max()) <= 1


def test_unreadable_file_is_named_before_any_model_runs(tmp_path):
    _save(tmp_path / "a" / "ok.png", Image.new("RGB", (8, 8)))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageFolderError, match=r"broken\.jpg is not a readable image"):
        ImageFolder(tmp_path)


def test_empty_folder_and_bad_settings(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageFolderError, match="holds no image files"):
        ImageFolder(tmp_path)
    with pytest.raises(ImageFolderError, match="is not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ImageFolderError, match="positive integer"):
        ImagePreprocessing(size=0)
    with pytest.raises(ImageFolderError, match="3 values"):
        ImagePreprocessing(mean=(0.5, 0.5))


def test_sample_labels_and_a_new_preprocessing_keep_the_files(tmp_path):
    from torch.utils.data import DataLoader

    from extract.images import sample_labels

    _colour_images(tmp_path)
    data = ImageFolder(tmp_path, ImagePreprocessing(size=16))
    labels = (data.files, data.classes)
    assert sample_labels(data) == labels and sample_labels(DataLoader(data, batch_size=2)) == labels
    assert sample_labels(torch.zeros(6, 3)) is None
    grey = data.with_preprocessing(lambda image: torch.tensor(image.size))
    assert (grey.files, grey.classes) == labels and grey[0].tolist() == [31, 47]
    assert data[0].shape == (3, 16, 16)  # the original keeps its own preprocessing
