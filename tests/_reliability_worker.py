"""Child process of the reliability tests (a module so that the CLI can import its model and data).

    python _reliability_worker.py extract STORE [--fsize BYTES] [--slow SECONDS]
        extract ``model()`` over ``data()`` into STORE with small chunks (many chunk
        writes and attribute updates to be killed in), printing READY first;
        ``--slow`` makes loading each sample take that long.
    python _reliability_worker.py cli [--fsize BYTES] -- ARGS...
        run ``pipeline.main(ARGS)`` under an optional file-size limit; exit with its code.

``--fsize`` sets RLIMIT_FSIZE and ignores SIGXFSZ, so a write past the limit fails
with EFBIG the way a full disk fails a write with ENOSPC.
"""

from __future__ import annotations

import resource
import signal
import sys

import numpy as np
import torch
from torch import nn

N_SAMPLES = 480
LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def data() -> torch.Tensor:
    """Deterministic float32 inputs of shape (N_SAMPLES, 1, 12, 12)."""
    rng = np.random.default_rng(11)
    return torch.from_numpy(rng.standard_normal((N_SAMPLES, 1, 12, 12)).astype(np.float32))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 36, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def model() -> Net:
    torch.manual_seed(5)
    return Net()


class SlowData(torch.utils.data.Dataset):
    """``data()`` served one sample at a time, each taking ``delay`` seconds to load."""

    def __init__(self, delay: float) -> None:
        self.x = data()
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return self.x[i]


def _limit_file_size(argv: list[str]) -> list[str]:
    if "--fsize" in argv:
        i = argv.index("--fsize")
        limit = int(argv[i + 1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        argv = argv[:i] + argv[i + 2:]
    return argv


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    command, *rest = argv
    if command == "extract":
        from extract import extract

        store = rest[0]
        rest = _limit_file_size(rest)
        source = SlowData(float(rest[rest.index("--slow") + 1])) if "--slow" in rest else data()
        print("READY", flush=True)
        extract(model(), source, store, name="net", layers=LAYERS, batch_size=23, chunk_bytes=8 * 1024,
                progress=False)
        print("DONE", flush=True)
        return 0
    if command == "cli":
        import pipeline

        split = rest.index("--")
        _limit_file_size(rest[:split])
        print("READY", flush=True)
        return pipeline.main(rest[split + 1:])
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
