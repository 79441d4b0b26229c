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

Model preprocessing
    When the model is a Hugging Face directory holding an image processor
    (``preprocessor_config.json``) and no image option was given, ``HFImageProcessor`` replaces
    ``ImagePreprocessing``: the image, converted to RGB as above, goes through
    ``AutoImageProcessor`` loaded offline from that directory (``extract.specs.prepare_for_model``).

A file that Pillow cannot open raises ``ImageFolderError`` naming the file, before any model runs (every
file's header is checked when the folder is listed); a file whose pixel data turns out damaged while the
model runs raises the same error naming it, and the run stops without completing the store.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import SpecError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "HFImageProcessor", "ImageFolder", "ImageFolderError",
           "ImagePreprocessing", "as_rgb", "list_images", "load_image_processor", "sample_labels"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderError(SpecError):
    """A folder of images that cannot be read as a dataset (no images, an unreadable file, bad settings)."""


def as_rgb(image):
    """A Pillow image with its EXIF orientation applied, converted to RGB (palette transparency respected)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGBA" if "transparency" in image.info else image.mode).convert("RGB")
    return image


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
            raise ImageFolderError(f"The image size (--image-size) must be a positive integer, got {self.size!r}.")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < self.size):
            raise ImageFolderError(f"The resize length (--image-resize) must be an integer ≥ the crop size "
                                   f"{self.size}, got {self.resize!r}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, str) or len(value) != 3 or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
                raise ImageFolderError(f"The image {name} (--image-{name}) needs 3 values (R, G, B numbers), "
                                       f"got {list(value)}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ImageFolderError(f"The image std (--image-std) must be positive, got {list(self.std)}.")

    @property
    def shorter_side(self) -> int:
        return self.resize if self.resize is not None else round(self.size / 0.875)

    def __call__(self, image) -> torch.Tensor:
        """The (3, size, size) float32 tensor of a Pillow image."""
        from PIL import Image

        image = as_rgb(image)
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


class HFImageProcessor:
    """The image processor saved in a Hugging Face model directory, as an image-to-tensor callable.

    The image is converted to RGB (``as_rgb``) and passed to the processor; the sample is its
    ``pixel_values`` as a float32 tensor (for ViT-style processors: (3, H, W)).
    """

    def __init__(self, processor, model_dir: str) -> None:
        self.processor = processor
        self.model_dir = model_dir

    def __call__(self, image) -> torch.Tensor:
        pixels = self.processor(images=as_rgb(image), return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels)[0].to(torch.float32).contiguous()

    def describe(self) -> dict:
        return {"hf_image_processor": self.model_dir}


def load_image_processor(model_dir: str | os.PathLike[str]) -> HFImageProcessor | None:
    """The image processor of a Hugging Face model directory (offline), None without ``preprocessor_config.json``."""
    path = Path(model_dir)
    if not (path.is_dir() and (path / "preprocessor_config.json").is_file()):
        return None
    try:
        from transformers import AutoImageProcessor
    except ImportError as exc:
        raise ImageFolderError("The image processor of a Hugging Face model directory needs transformers: "
                               "pip install transformers.") from exc
    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ImageFolderError(
            f"Cannot load the image processor in {path} ({type(exc).__name__}: {exc}); fix its "
            "preprocessor_config.json, or pass --image-size to use simtorch's own preprocessing."
        ) from exc
    return HFImageProcessor(processor, str(path))


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
        self.preprocessing_given = preprocessing is not None  # False: the model's own processor may replace it
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

    def with_preprocessing(self, preprocessing) -> ImageFolder:
        """The same files (not listed or checked again) with another image-to-tensor callable."""
        copy = object.__new__(ImageFolder)
        copy.__dict__.update(self.__dict__)
        copy.preprocessing = preprocessing
        return copy

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.root / self.files[index]
        image = None
        try:
            image = Image.open(path)
            image.load()
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged data
            if image is not None:
                image.close()
            raise ImageFolderError(
                f"{path} is not a readable image ({type(exc).__name__}: {exc}); remove or replace it."
            ) from None
        with image:
            return self.preprocessing(image)


def sample_labels(dataset: Sequence) -> tuple[list[str], list[str]] | None:
    """(relative paths, classes) of an ``ImageFolder`` (or a DataLoader over one), None for any other dataset."""
    dataset = getattr(dataset, "dataset", dataset) if isinstance(dataset, torch.utils.data.DataLoader) else dataset
    if isinstance(dataset, ImageFolder):
        return list(dataset.files), list(dataset.classes)
    return None
