"""Turn command-line specs into models and datasets.

Model specs
    ``module:function``     a factory returning an ``nn.Module`` (``extract.demo:cnn``)
    ``file.pt``/``.ts``     a TorchScript file
    ``DIR``                 a local Hugging Face model directory (needs ``transformers``)
    ``torchvision:NAME``    a torchvision architecture, untrained (needs ``torchvision``)
Data specs
    ``digits`` / ``digits:train``   scikit-learn's digits, held-out / training split
    ``file.npy`` / ``file.pt``      an array or tensor of shape (n_samples, ...); float64 and uint8
                                    data follow the dtype rule of ``extract.batches``
    ``DIR``                         a folder of image files (``extract.images.ImageFolder``)
    ``file.txt`` / ``file.json``    strings (one per line / a JSON list / a ``text`` field per
    ``file.jsonl``                  line), tokenized with the tokenizer of the Hugging Face
                                    model directory (extract.text)
    ``module:function``             returns a tensor, array, Dataset, DataLoader or a list of
                                    strings (text, exactly as a ``.txt`` file with those lines)

``load_data`` reads the spec once; ``prepare_for_model`` then fits the data to each model: text is
tokenized with the model directory's tokenizer, an image folder without image options uses the
model directory's image processor when it has one, and float64/uint8 arrays are converted.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SpecError

__all__ = ["SpecError", "load_data", "load_model", "model_dtype", "prepare_for_model"]


def _import_callable(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SpecError(f"{what} spec {spec!r} must look like 'package.module:function'.")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"Cannot import module {module_name!r} of {what} spec {spec!r}: {exc}.") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")][:10]
        raise SpecError(f"Module {module_name!r} has no {attr!r} (it has {public}).") from None


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights`` (a state-dict file) into it."""
    path = Path(spec)
    if spec.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError as exc:
            raise SpecError("--model torchvision:NAME needs torchvision: pip install torchvision.") from exc
        model = torchvision.models.get_model(spec.split(":", 1)[1], weights=None)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise SpecError(f"{spec} is a directory without config.json, not a Hugging Face model directory.")
        try:
            import transformers
        except ImportError as exc:
            raise SpecError(
                "Loading a Hugging Face model directory needs transformers: pip install transformers."
            ) from exc
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    elif path.suffix in (".pt", ".pth", ".ts", ".jit") and path.exists():
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise SpecError(
                f"{spec} is not a TorchScript file ({exc.__class__.__name__}). For a state dict, pass the "
                "architecture as --model module:function and the file as --weights."
            ) from exc
    elif ":" in spec:
        factory = _import_callable(spec, "model")
        model = factory() if callable(factory) else factory
    else:
        raise SpecError(
            f"Model spec {spec!r} is neither 'module:function', an existing TorchScript file, "
            "a Hugging Face model directory nor 'torchvision:NAME'."
        )
    if not isinstance(model, nn.Module):
        raise SpecError(f"Model spec {spec!r} gave a {type(model).__name__}, not a torch.nn.Module.")
    if weights:
        _load_weights(model, weights)
    return model.eval()


def _load_weights(model: nn.Module, weights: str) -> None:
    if not Path(weights).is_file():
        raise SpecError(f"Weights file {weights} does not exist.")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(f"Cannot read weights {weights}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpecError(f"Weights file {weights} holds a {type(state).__name__}, not a state dict.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SpecError(f"Weights {weights} do not fit the model: {str(exc).splitlines()[0]} ...") from exc


def load_data(spec: str, images: Any = None) -> Any:
    """The dataset named by ``spec`` (see the module docstring).

    ``images`` (an ``extract.images.ImagePreprocessing``) sets how the files of an image folder
    become tensors; it is refused for any other data.
    """
    data = _load_data(spec, images)
    if images is not None and not _is_image_folder(data):
        raise SpecError(f"--image-size/--image-resize/--image-mean/--image-std/--no-normalize apply to a folder of "
                        f"images, and --data {spec} is not one; drop those options.")
    return data


def _is_image_folder(data: Any) -> bool:
    from .images import ImageFolder

    return isinstance(data, ImageFolder)


def _load_data(spec: str, images: Any) -> Any:
    from .demo import digits

    if not spec.strip():
        raise SpecError("The data spec is empty; pass --data digits, a file, a folder of images or module:function.")
    if spec in ("digits", "digits:test"):
        return digits("test")[0]
    if spec == "digits:train":
        return digits("train")[0]
    path = Path(spec)
    if path.suffix == ".npy":
        if not path.is_file():
            raise SpecError(f"Data file {spec} does not exist.")
        return np.load(path, mmap_mode="r")
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise SpecError(f"Data file {spec} does not exist.")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise SpecError(f"{spec} holds a {type(data).__name__}; expected a tensor of shape (n_samples, ...).")
        return data
    if path.suffix in (".txt", ".json", ".jsonl"):
        from .text import load_texts

        if not path.is_file():
            raise SpecError(f"Data file {spec} does not exist.")
        return load_texts(path)
    if path.is_dir():
        from .images import ImageFolder

        return ImageFolder(path, images)
    if ":" in spec:
        source = _import_callable(spec, "data")
        data = source() if callable(source) else source
        return _texts_if_strings(data, spec)
    raise SpecError(
        f"Data spec {spec!r} is not 'digits', a .npy/.pt/.txt/.json/.jsonl file, a folder of images, "
        "or 'module:function'."
    )


def _texts_if_strings(data: Any, spec: str) -> Any:
    """A list (or tuple) of strings from ``module:function`` becomes ``Texts``, as a .txt file's lines do."""
    from .text import Texts

    if isinstance(data, (list, tuple)) and not data:
        raise SpecError(f"{spec} returned an empty {type(data).__name__}; return the samples (a list of strings, "
                        "a tensor, an array or a Dataset).")
    if isinstance(data, (list, tuple)) and any(isinstance(item, str) for item in data):
        bad = next((i for i, item in enumerate(data) if not isinstance(item, str)), None)
        if bad is not None:
            raise SpecError(f"{spec} returned a list mixing strings and {type(data[bad]).__name__} (item {bad}); "
                            "return a list of strings (text) or a tensor/array/Dataset.")
        return Texts(data)
    return data


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer; None when it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def prepare_for_model(data: Any, model: nn.Module, model_spec: str, *, max_length: int | None = None,
                      note: Any = None) -> Any:
    """``data`` (from ``load_data``) fitted to one model built from ``model_spec``.

    - ``Texts``: tokenized with the tokenizer of the model directory (``extract.text``);
    - an ``ImageFolder`` without image options: preprocessed by the image processor of the model
      directory when it holds one (``preprocessor_config.json``), else by the default
      ``ImagePreprocessing``;
    - float64 and uint8 arrays: converted by ``extract.batches.convert_array`` for the model's dtype;
      ``note`` (default: print to stderr) receives the one-line note saying so.
    """
    from .batches import convert_array
    from .images import ImageFolder, load_image_processor
    from .text import tokenize_for_model

    if isinstance(data, ImageFolder):
        if not data.preprocessing_given:
            processor = load_image_processor(model_spec)
            if processor is not None:
                return data.with_preprocessing(processor)
        return data
    data = tokenize_for_model(data, str(model_spec), max_length=max_length)
    data, message = convert_array(data, model_dtype(model))
    if message:
        (note or (lambda line: print(line, file=sys.stderr)))(message)
    return data
