"""Small models and data for the extract tests.

A module of its own (not conftest) so that subprocesses and ``--model
_extract_models:small_cnn`` can import it: the tests put this folder on
``sys.path`` (pytest does so already) and pass it on through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "Counting",
    "KillAfter",
    "MixedOutputs",
    "Reordered",
    "SmallCNN",
    "Twice",
    "RGBNet",
    "images",
    "rgb_net",
    "small_cnn",
    "texts",
]

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "big red bird",
    "the small green tree in the park",
    "a slow cat",
    "the fast dog sat",
    "blue bird on a big tree",
]


def texts() -> list[str]:
    """Data factory for ``--data _extract_models:texts`` (strings, tokenized like a .txt file)."""
    return list(TEXTS)


class RGBNet(nn.Module):
    """conv -> relu -> gap -> fc, for (n, 3, H, W) images of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def rgb_net() -> RGBNet:
    """Factory for ``--model _extract_models:rgb_net`` (seeded)."""
    torch.manual_seed(0)
    return RGBNet()


def images(n: int = 40, seed: int = 0, size: int = 8) -> torch.Tensor:
    """Deterministic float32 images of shape (n, 1, size, size)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, 1, size, size)).astype(np.float32))


def images_npy_source() -> torch.Tensor:
    """Data factory for ``--data _extract_models:images_npy_source``."""
    return images(30, seed=3)


class SmallCNN(nn.Module):
    """conv1 -> relu -> conv2 -> pool -> fc1 -> fc2, for (n, 1, 8, 8) inputs."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.relu(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def small_cnn(seed: int = 0) -> SmallCNN:
    """Factory for ``--model _extract_models:small_cnn`` (seeded, so weights are reproducible)."""
    torch.manual_seed(seed)
    return SmallCNN()


def other_cnn() -> SmallCNN:
    """A different architecture width: another model for the 'different model' error."""
    torch.manual_seed(0)
    return SmallCNN(width=3)


class TupleBlock(nn.Module):
    """Returns (hidden, aux) like a transformer block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x))
        return h, 2 * h


class DictBlock(nn.Module):
    """Returns a dict whose first tensor is not the first key's value type-wise."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.lin(x)
        return {"note": "not a tensor", "hidden": h, "scaled": 3 * h}


@dataclass
class BlockOutput:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor


class DataclassBlock(nn.Module):
    """Returns a dataclass, like Hugging Face ``ModelOutput``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        h = self.lin(x)
        return BlockOutput(h, h.mean(-1, keepdim=True))


class MixedOutputs(nn.Module):
    """A conv, then blocks returning a tuple, a dict and a dataclass."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.tuple_block = TupleBlock(d * 4)
        self.dict_block = DictBlock(d * 4)
        self.dataclass_block = DataclassBlock(d * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        h = self.tuple_block(h)[0]
        h = self.dict_block(h)["hidden"]
        return self.dataclass_block(h).last_hidden_state


class Twice(nn.Module):
    """``shared`` runs twice per forward pass."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h)


class Reordered(nn.Module):
    """Registered first, second, third; executed third, first, second."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, 7)
        self.third = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(self.third(x.flatten(1))))


class Counting(nn.Module):
    """Wraps a model and counts forward passes in ``calls``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


class KillAfter(SmallCNN):
    """SmallCNN that SIGKILLs its own process at the start of forward pass number ``kill_after`` + 1."""

    def __init__(self, kill_after: int) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.kill_after = kill_after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1
        return super().forward(x)


class Failing(SmallCNN):
    """SmallCNN that raises on its third batch."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise FloatingPointError("synthetic failure")
        return super().forward(x)


def failing() -> Failing:
    """Factory for ``--model _extract_models:failing``."""
    return Failing()


def write_hf_bert(root, words, model):
    """Save ``model`` (a transformers BERT) with a word-level tokenizer over ``words`` to ``root/bert``.

    The vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK] followed by ``words``; nothing is downloaded.
    """
    import inspect

    import transformers

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    else:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    model_dir = root / "bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir
