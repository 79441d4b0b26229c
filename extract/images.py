"""A folder of image files as a dataset: ``--data path/to/folder``.

Order
    Every file below the folder whose suffix is an image suffix (``IMAGE_SUFFIXES``, any case),
    recursively, hidden files and folders skipped, sorted by their path relative to the folder
    (POSIX separators, plain string order). The order is the sample order of the store.
Class
    The first sub-folder of a file's relative path (ImageNet-style ``class/xxx.jpg`` trees); ``""``
    for files directly in the folder.
Preprocessing (``ImagePreprocessing``)
    The image is opened with Pillow, EXIF orientation applied, converted to RGB (grey, palette and
    CMYK images are expanded, an alpha channel is dropped), its shorter side resized to ``resize``
    (bilinear, antialiased; default ``round(size / 0.875)``, 256 for 224) and the centre
    ``size`` × ``size`` square cropped — the usual ImageNet evaluation transform. Pixels are scaled
    to [0, 1] and normalised per channel with ``mean`` and ``std`` (ImageNet's by default;
    ``normalize=False`` keeps [0, 1]). A sample is a float32 tensor of shape (3, size, size).

A file that Pillow cannot read raises ``ImageFolderError`` naming the file, before any model runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "ImageFolder", "ImageFolderError",
           "ImagePreprocessing", "list_images", "sample_labels"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderError(ValueError):
    """A folder of images that cannot be read as a dataset (no images, an unreadable file)."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image file becomes a (3, size, size) float32 tensor (see the module docstring).

    Parameters
    ----------
    size : int, default=224
        Side of the square centre crop.
    resize : int, optional
        Length of the shorter side before cropping; default ``round(size / 0.875)``.
    mean, std : tuple of 3 floats, default=ImageNet's
        Per-channel normalisation of pixels scaled to [0, 1].
    normalize : bool, default=True
        False keeps pixels in [0, 1].
    """

    size: int = 224
    resize: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ImageFolderError(f"The image size must be a positive integer, got {self.size!r}.")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < self.size):
            raise ImageFolderError(f"The resize length must be an integer ≥ the crop size {self.size}, "
                                   f"got {self.resize!r}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ImageFolderError(f"The image {name} needs 3 values (R, G, B), got {list(value)}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ImageFolderError(f"The image std must be positive, got {list(self.std)}.")

    @property
    def shorter_side(self) -> int:
        return self.resize if self.resize is not None else round(self.size / 0.875)

    def __call__(self, image) -> torch.Tensor:
        """The (3, size, size) float32 tensor of a Pillow image."""
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGBA" if "transparency" in image.info else image.mode).convert("RGB")
        width, height = image.size
        scale = self.shorter_side / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        left, top = (new_size[0] - self.size) // 2, (new_size[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if self.normalize:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def describe(self) -> dict:
        """JSON-friendly settings, recorded in the store and part of its dataset fingerprint."""
        return {**asdict(self), "resize": self.shorter_side, "mean": list(self.mean), "std": list(self.std)}


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of the image files below ``root``, in the documented (sorted) order."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            relative = (Path(dirpath) / filename).relative_to(root)
            if not _hidden(relative) and relative.suffix.lower() in IMAGE_SUFFIXES:
                found.append(relative.as_posix())
    return sorted(found)


class ImageFolder(torch.utils.data.Dataset):
    """The images below ``root`` as a dataset of (3, size, size) float32 tensors.

    Attributes
    ----------
    files : list of str
        Relative POSIX paths, in sample order.
    classes : list of str
        Each sample's class: its first sub-folder, ``""`` at the top level.
    """

    def __init__(self, root: str | os.PathLike[str], preprocessing: ImagePreprocessing | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ImageFolderError(f"{self.root} is not a folder.")
        self.preprocessing = preprocessing or ImagePreprocessing()
        self.files = list_images(self.root)
        if not self.files:
            raise ImageFolderError(f"{self.root} holds no image files (suffixes {', '.join(IMAGE_SUFFIXES)}); "
                                   "point --data at a folder of images.")
        self.classes = [f.split("/", 1)[0] if "/" in f else "" for f in self.files]
        self._check_readable()

    def _check_readable(self) -> None:
        """Open every file's header once, so that a bad file stops the run before any model runs."""
        from PIL import Image

        for relative in self.files:
            try:
                with Image.open(self.root / relative) as image:
                    image.verify()
            except Exception as exc:  # Pillow raises several types for damaged files
                raise ImageFolderError(
                    f"{self.root / relative} is not a readable image ({type(exc).__name__}: {exc}); "
                    "remove or replace it."
                ) from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                return self.preprocessing(image)
        except (OSError, ValueError) as exc:
            raise ImageFolderError(f"{path} is not a readable image ({exc}); remove or replace it.") from None


def sample_labels(dataset: Sequence) -> tuple[list[str], list[str]] | None:
    """(relative paths, classes) of an ``ImageFolder``, None for any other dataset."""
    if isinstance(dataset, ImageFolder):
        return list(dataset.files), list(dataset.classes)
    return None
