"""Models and data shared by ``bench_measure.py`` and the simtorch 0.2.1 runner.

This module imports only torch (and scikit-learn for the digits), so the
simtorch 0.2.1 virtual environment can import it from the ``benchmarks``
folder without importing this project's ``extract`` or ``measure`` packages.

The CNN keeps every layer to compare as a flat, uniquely named top-level
module (``act1`` ... ``fc``): simtorch 0.2.1 hooks every module whose name
*contains* one of the requested strings, so nested names such as
``block1.conv`` would be captured as extra layers there.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LAYERS", "LAYER_SETS", "WideCNN", "layer_widths", "make_inputs"]

LAYERS = ["act1", "act2", "act3", "act4", "fc"]
LAYER_SETS = {
    "act": LAYERS,
    "all": ["conv1", "act1", "conv2", "act2", "conv3", "act3", "conv4", "act4", "fc"],
}


class WideCNN(nn.Module):
    """Four 3×3 conv layers on 32×32 inputs, then a linear classifier.

    Captured widths per sample: act1 and act2 ``width``×32×32, act3
    2·``width``×16×16, act4 2·``width``×8×8, fc 10.
    """

    def __init__(self, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.act3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.act4 = nn.ReLU()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.pool3(self.act3(self.conv3(x)))
        x = self.pool4(self.act4(self.conv4(x)))
        return self.fc(torch.flatten(x, 1))


def layer_widths(width: int) -> dict[str, int]:
    """Features per sample of each captured layer of ``WideCNN(width)`` on 32×32 inputs."""
    widths = {"1": width * 1024, "2": width * 1024, "3": 2 * width * 256, "4": 2 * width * 64}
    return {**{f"{kind}{i}": w for i, w in widths.items() for kind in ("conv", "act")}, "fc": 10}


def make_inputs(n_samples: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` digit images upsampled to 32×32, float32 of shape (n_samples, 1, 32, 32).

    The 1,797 sklearn digits (8×8, scaled to [0, 1]) are upsampled bilinearly;
    beyond 1,797 samples, copies shifted by up to ±3 pixels with Gaussian noise
    (σ = 0.05) are appended, drawn with ``seed``.
    """
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    base = nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)
    parts, have = [base[:n_samples]], min(n_samples, len(base))
    while have < n_samples:
        take = min(len(base), n_samples - have)
        idx = torch.randperm(len(base), generator=g)[:take]
        shifts = torch.randint(-3, 4, (2,), generator=g).tolist()
        moved = torch.roll(base[idx], shifts=shifts, dims=(2, 3))
        parts.append(moved + 0.05 * torch.randn(moved.shape, generator=g))
        have += take
    return torch.cat(parts).contiguous()


def write_model_pair(work, n_samples: int, width: int) -> tuple[torch.Tensor, list[WideCNN]]:
    """The benchmark's inputs and two ``WideCNN``s (seeds 0 and 1), also saved as ``work/inputs.pt`` and
    ``work/model{0,1}.pt`` for simtorch 0.2.1's runner."""
    inputs = make_inputs(n_samples)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(WideCNN(width).eval())
    torch.save(inputs, work / "inputs.pt")
    for i, model in enumerate(models):
        torch.save(model.state_dict(), work / f"model{i}.pt")
    return inputs, models
