"""Batches of a dataset as the extraction loop and the in-memory API see them.

``as_loader`` turns a tensor, array, ``Dataset`` or ``DataLoader`` into an
iterable of batches in dataset order; ``model_input`` finds the model's input
in a batch; ``to_device``, ``batch_len`` and ``confounder_rows`` (the flattened
inputs, dCKA's confounder) work on that input whether it is a tensor or a dict
of tensors (keyword inputs of text models).

``convert_array`` applies the dtype rule of ``--data`` arrays (``.npy``/``.pt``
files and ``module:function`` arrays) for the model at hand, batch by batch:

- float64 data is cast to the model's floating dtype (float32 for most models);
- uint8 data are images: scaled to [0, 1] (``x / 255``) in the model's floating
  dtype, of shape (N, C, H, W) or (N, H, W, C) with C = 1 or 3 channels. The
  layout is read from which axis holds 1 or 3 values: axis 1 → N,C,H,W (kept),
  axis 3 → N,H,W,C (moved to N,C,H,W). When both or neither do, or the array
  does not have 4 axes, the data is refused with the fix; the layout is never
  guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .text import attention_mask, token_rows

__all__ = ["ArrayBatches", "ConvertedArray", "as_loader", "batch_len", "confounder_rows", "convert_array",
           "model_input", "to_device"]


class ArrayBatches:
    """Consecutive slices of a tensor or NumPy array (memory-mapped ones included), as tensors.

    Slicing replaces ``DataLoader(TensorDataset(x))``, which indexes and re-stacks every sample. Each
    batch is a copy (one memcpy): read-only and memory-mapped arrays become ordinary writable tensors,
    and a model that modifies its input in place leaves the caller's data alone.
    """

    def __init__(self, data: torch.Tensor | np.ndarray, batch_size: int,
                 convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.data = data
        self.batch_size = batch_size
        self.convert = convert  # applied to every batch (``ConvertedArray``)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.data), self.batch_size):
            part = self.data[start : start + self.batch_size]
            # copies, so that a model that modifies its input in place cannot modify the caller's data
            batch = torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part.clone()
            yield batch if self.convert is None else self.convert(batch)


class ConvertedArray:
    """A tensor or NumPy array whose batches are converted as they are read (``convert_array``).

    The array itself is left as it is (a memory-mapped file stays on disk); ``as_loader`` applies
    ``convert`` to each batch.
    """

    def __init__(self, data: torch.Tensor | np.ndarray, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.data = data
        self.convert = convert

    def __len__(self) -> int:
        return len(self.data)


def _image_layout(shape: tuple[int, ...]) -> str:
    """"NCHW" or "NHWC" for uint8 images of ``shape``; a ValueError naming the fix when it is not clear."""
    fix = ("save the images as uint8 of shape (N, C, H, W) or (N, H, W, C) with C = 1 or 3, or as float32 "
           "(scaled as the model expects) to pass them unchanged")
    if len(shape) != 4:
        raise ValueError(f"--data holds uint8 data of shape {shape}: uint8 data is read as images of 4 axes; "
                         f"{fix} (grey images of shape (N, H, W): add the channel axis, x[:, None]).")
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first and last:
        raise ValueError(f"--data holds uint8 images of shape {shape}: both axis 1 and axis 3 could be the "
                         "channel axis, so the layout is ambiguous; save them as float32 of shape (N, C, H, W) "
                         "(x.astype('float32') / 255, channels moved first), which is passed unchanged.")
    if not (first or last):
        raise ValueError(f"--data holds uint8 images of shape {shape}: neither axis 1 nor axis 3 holds 1 or 3 "
                         f"channels; {fix}.")
    return "NCHW" if first else "NHWC"


def convert_array(data: Any, model_dtype: torch.dtype | None) -> tuple[Any, str | None]:
    """``data`` under the dtype rule of the module docstring for a model of ``model_dtype``, and a note.

    Returns ``data`` itself and None when nothing is converted (any data other than a float64 or
    uint8 tensor or array, float64 data for a float64 model); otherwise a ``ConvertedArray`` and a
    one-line note saying what is done, for stderr.
    """
    if not isinstance(data, (np.ndarray, torch.Tensor)):
        return data, None
    kind = str(data.dtype).removeprefix("torch.")
    target = model_dtype if model_dtype is not None and model_dtype.is_floating_point else torch.float32
    target_name = str(target).removeprefix("torch.")
    if kind == "uint8":
        layout = _image_layout(tuple(data.shape))

        def scale(batch: torch.Tensor) -> torch.Tensor:
            images = batch.to(target) / 255
            return images.permute(0, 3, 1, 2).contiguous() if layout == "NHWC" else images

        moved = ", moved from N,H,W,C to N,C,H,W" if layout == "NHWC" else " (N,C,H,W)"
        return ConvertedArray(data, scale), f"note: --data holds uint8 images; scaled to [0, 1] as {target_name}{moved}"
    if kind == "float64" and target != torch.float64:
        return (ConvertedArray(data, lambda batch: batch.to(target)),
                f"note: --data holds float64; cast to the model's {target_name}")
    return data, None


def as_loader(data: Any, batch_size: int) -> tuple[Any, int]:
    """An iterable of batches in dataset order, and the number of samples.

    ``data`` may be a tensor or NumPy array of shape (n_samples, ...), a
    map-style ``Dataset`` with ``__len__``, or a ``DataLoader`` without
    shuffling.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, ConvertedArray):
        loader, n = as_loader(data.data, batch_size)
        loader.convert = data.convert
        return loader, n
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim < 1 or len(data) == 0:
            raise ValueError(
                f"Expected data of shape (n_samples, ...) with n_samples > 0, got shape {tuple(data.shape)}."
            )
        if isinstance(data, np.ndarray) and not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise TypeError(f"Expected numeric data, got a NumPy array of dtype {data.dtype}.")
        return ArrayBatches(data, batch_size), len(data)
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                "The DataLoader shuffles its data; stores must hold samples in dataset order so that "
                "stores of different models can be compared. Pass shuffle=False."
            )
        loader = data
        n = len(data.dataset)  # type: ignore[arg-type]
    elif isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise ValueError("The dataset has no __len__; simtorch needs the sample count up front.")
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        n = len(data)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"Expected a tensor, NumPy array, Dataset or DataLoader, got {type(data).__name__}."
        )
    if n == 0:
        raise ValueError("The dataset is empty; there is nothing to extract.")
    return loader, n


def model_input(batch: Any) -> Any:
    """The model's input from one batch: the batch, its first element, or a dict of tensors."""
    if isinstance(batch, torch.Tensor) or isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"Cannot find the model input in a batch of type {type(batch).__name__}.")


def batch_len(inputs: Any) -> int:
    """The number of samples in a model input (a tensor or a dict of tensors)."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def to_device(inputs: Any, device: torch.device) -> Any:
    """A model input moved to ``device`` (every tensor of a dict input)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs.to(device)


def confounder_rows(inputs: Any) -> np.ndarray:
    """Inputs flattened per sample, the bytes that are fingerprinted and stored."""
    if isinstance(inputs, Mapping) and attention_mask(inputs) is not None:
        return token_rows(inputs)  # padding-free: valid tokens first, padding zeroed
    if isinstance(inputs, Mapping):
        tensor = inputs.get("input_ids", next(iter(inputs.values())))
    else:
        tensor = inputs
    array = tensor.detach().cpu().numpy()
    # A copy: the model may modify its input in place, and the writer keeps these rows until the chunk is full.
    return np.array(array.reshape(len(array), -1))
