"""Turn command-line specs into models and datasets.

Model specs
    ``module:function``     a factory returning an ``nn.Module`` (``extract.demo:cnn``)
    ``file.pt``/``.ts``     a TorchScript file
    ``DIR``                 a local Hugging Face model directory (needs ``transformers``)
    ``torchvision:NAME``    a torchvision architecture, untrained (needs ``torchvision``)
Data specs
    ``digits`` / ``digits:train``   scikit-learn's digits, held-out / training split
    ``file.npy`` / ``file.pt``      an array or tensor of shape (n_samples, ...)
    ``file.txt`` / ``file.json``    strings (one per line / a JSON list), tokenized with the
                                    tokenizer of the Hugging Face model directory (extract.text)
    ``module:function``             returns a tensor, array, Dataset or DataLoader
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

__all__ = ["SpecError", "load_data", "load_model"]


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


def load_data(spec: str) -> Any:
    """The dataset named by ``spec`` (see the module docstring)."""
    from .demo import digits

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
    if path.suffix in (".txt", ".json"):
        from .text import load_texts

        if not path.is_file():
            raise SpecError(f"Data file {spec} does not exist.")
        return load_texts(path)
    if ":" in spec:
        source = _import_callable(spec, "data")
        return source() if callable(source) else source
    raise SpecError(
        f"Data spec {spec!r} is not 'digits', a .npy/.pt/.txt/.json file, or 'module:function'."
    )
