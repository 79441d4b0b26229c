"""The embedded demo: a small zoo of CNNs trained on scikit-learn's digits, offline.

scikit-learn ships the 1,797 8×8 digit images, so nothing is downloaded. The
zoo holds three seeds of one architecture (``cnn_seed0..2``), a wider variant
(``cnn_wide_seed0``) and an untrained copy (``cnn_untrained``). Training is
deterministic (fixed seeds, fixed split, full-batch order from a seeded
generator) and cached under ``data/models/`` together with held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["DEMO_LAYERS", "ZOO", "DigitsCNN", "cnn", "digits", "train_zoo"]

# Captured in every demo model: the output of each block, in execution order.
DEMO_LAYERS = ["block1", "block2", "block3", "block4", "fc1", "fc2"]
TRAIN_EPOCHS = 15
TRAIN_BATCH = 64
TEST_FRACTION = 0.3
TRAIN_LR = 3e-3


class DigitsCNN(nn.Module):
    """Four conv blocks and two linear layers for 1×8×8 digit images.

    Layer outputs (per sample): block1 (w, 8, 8), block2 (2w, 4, 4),
    block3 (2w, 4, 4), block4 (4w, 2, 2), fc1 (64,), fc2 (10,) logits.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.block1 = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.block4 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 4, 64), nn.ReLU())
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, self.block2, self.block3, self.block4, self.fc1, self.fc2):
            x = block(x)
        return x


def cnn(width: int = 16) -> DigitsCNN:
    """Factory for ``--model extract.demo:cnn``."""
    return DigitsCNN(width)


def cnn_wide() -> DigitsCNN:
    """Factory for ``--model extract.demo:cnn_wide`` (twice the channels)."""
    return DigitsCNN(32)


def digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images as float32 tensors of shape (n, 1, 8, 8) in [0, 1], and labels.

    The split is fixed: a stratified 70/30 split with ``random_state=0``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    if split == "all":
        return torch.from_numpy(x), torch.from_numpy(y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=0, stratify=y)
    pick = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return torch.from_numpy(np.ascontiguousarray(pick[0])), torch.from_numpy(pick[1])


def digits_test() -> torch.Tensor:
    """Held-out digit images, the demo's extraction data (``--data extract.demo:digits_test``)."""
    return digits("test")[0]


@dataclass(frozen=True)
class ZooMember:
    name: str
    factory: Callable[[], nn.Module]
    factory_spec: str
    seed: int
    trained: bool = True


ZOO = [
    ZooMember("cnn_seed0", cnn, "extract.demo:cnn", 0),
    ZooMember("cnn_seed1", cnn, "extract.demo:cnn", 1),
    ZooMember("cnn_seed2", cnn, "extract.demo:cnn", 2),
    ZooMember("cnn_wide_seed0", cnn_wide, "extract.demo:cnn_wide", 0),
    ZooMember("cnn_untrained", cnn, "extract.demo:cnn", 0, trained=False),
]


def _train(member: ZooMember) -> tuple[nn.Module, float]:
    # One intra-op thread: these tiny batches gain nothing from more, and on a busy 2-core
    # machine torch's spinning worker threads made training ~10x slower in wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_threaded(member)
    finally:
        torch.set_num_threads(threads)


def _train_single_threaded(member: ZooMember) -> tuple[nn.Module, float]:
    torch.manual_seed(member.seed)
    model = member.factory()
    x_test, y_test = digits("test")
    if member.trained:
        x, y = digits("train")
        gen = torch.Generator().manual_seed(member.seed)
        opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(TRAIN_EPOCHS):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), TRAIN_BATCH):
                idx = order[i : i + TRAIN_BATCH]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def _recipe_digest(member: ZooMember) -> str:
    # Only stable fields: the dataclass repr would include the factory's memory address.
    recipe = (f"{member.name}|{member.factory_spec}|{member.seed}|{member.trained}|{TRAIN_EPOCHS}|{TRAIN_BATCH}|"
              f"{TEST_FRACTION}|adam{TRAIN_LR}|torch{torch.__version__}")
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def train_zoo(models_dir: str | Path = "data/models", log: Callable[[str], None] = print) -> list[dict]:
    """Train (or load from ``models_dir``) every zoo member; return their records.

    Each record has ``name``, ``weights`` (path of the state dict), ``factory``
    (``module:function``) and ``accuracy`` on the held-out split.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for member in ZOO:
        weights = models_dir / f"{member.name}.pt"
        meta_path = models_dir / f"{member.name}.json"
        digest = _recipe_digest(member)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if not weights.exists() or meta.get("recipe") != digest:
            model, accuracy = _train(member)
            tmp = weights.with_suffix(".pt.tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(weights)
            meta = {"name": member.name, "factory": member.factory_spec, "seed": member.seed,
                    "trained": member.trained, "accuracy": accuracy, "recipe": digest}
            meta_path.write_text(json.dumps(meta, indent=2))
            log(f"trained {member.name}: held-out accuracy {accuracy:.3f}")
        else:
            log(f"cached  {member.name}: held-out accuracy {meta['accuracy']:.3f}")
        records.append({**meta, "weights": str(weights)})
    return records
