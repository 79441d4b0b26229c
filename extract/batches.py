"""Batches of a dataset as the extraction loop and the in-memory API see them.

``as_loader`` turns a tensor, array, ``Dataset`` or ``DataLoader`` into an
iterable of batches in dataset order; ``model_input`` finds the model's input
in a batch; ``to_device``, ``batch_len`` and ``confounder_rows`` (the flattened
inputs, dCKA's confounder) work on that input whether it is a tensor or a dict
of tensors (keyword inputs of text models).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .text import attention_mask, token_rows

__all__ = ["ArrayBatches", "as_loader", "batch_len", "confounder_rows", "model_input", "to_device"]


class ArrayBatches:
    """Consecutive slices of a tensor or NumPy array (memory-mapped ones included), as tensors.

    Slicing replaces ``DataLoader(TensorDataset(x))``, which indexes and re-stacks every sample. Each
    batch is a copy (one memcpy): read-only and memory-mapped arrays become ordinary writable tensors,
    and a model that modifies its input in place leaves the caller's data alone.
    """

    def __init__(self, data: torch.Tensor | np.ndarray, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.data), self.batch_size):
            part = self.data[start : start + self.batch_size]
            # copies, so that a model that modifies its input in place cannot modify the caller's data
            yield torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part.clone()


def as_loader(data: Any, batch_size: int) -> tuple[Any, int]:
    """An iterable of batches in dataset order, and the number of samples.

    ``data`` may be a tensor or NumPy array of shape (n_samples, ...), a
    map-style ``Dataset`` with ``__len__``, or a ``DataLoader`` without
    shuffling.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
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
