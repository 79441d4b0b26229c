"""What the CLI says when its output is cut short (`| head`) and when an extraction stops early."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_models import KillAfter, images
from _stores import write_store

import pipeline
from extract import ZarrStore, extract
from extract.runner import ExtractInterrupted

PIPELINE = Path(pipeline.__file__).resolve()


# ---------------------------------------------------------------------------------------------- | head
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Stores with many layers, so that `info` and `ls` print more than a pipe holds."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    layers = {f"block{i}.conv": rng.standard_normal((8, 3)).astype(np.float32) for i in range(40)}
    for k in range(3):
        write_store(root / f"model{k}.zarr", f"model{k}", layers)
    return root


@pytest.mark.parametrize("command", ["ls", "info", "info --json"])
def test_output_piped_into_a_reader_that_stops_ends_quietly(folder, subprocess_env, command):
    """The reader closes the pipe before the command prints (as `| head -1` does once it has its line)."""
    target = str(folder) if command == "ls" else str(folder / "model0.zarr")
    argv = [sys.executable, str(PIPELINE), *command.split(), target]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env)
    child.stdout.close()  # no reader: every write to stdout is a broken pipe
    err = child.stderr.read().decode()
    code = child.wait(timeout=120)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert err == ""
    assert code == 141


def test_head_reads_the_first_line_of_a_long_listing(folder, subprocess_env):
    """A real shell pipeline: `pipeline.py info STORE | head -1`."""
    shell = f"'{sys.executable}' '{PIPELINE}' info '{folder / 'model1.zarr'}' | head -1"
    done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert done.stdout.count("\n") == 1 and "model1" in done.stdout
    assert "Broken pipe" not in done.stderr and "error" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- stopped runs
class InterruptAt(torch.nn.Module):
    """KillAfter's CNN, interrupted (Ctrl-C) at the start of forward pass ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.inner = KillAfter(-1)
        self.at = at
        self.calls = 0

    def forward(self, x):
        if self.calls == self.at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(x)


def interrupted_at_once() -> InterruptAt:
    """``--model test_cli_output:interrupted_at_once``."""
    torch.manual_seed(0)
    return InterruptAt(0)


def test_ctrl_c_before_any_sample_is_written_does_not_promise_a_resume(tmp_path, capsys):
    np.save(tmp_path / "x.npy", images(20).numpy())
    out = tmp_path / "out"
    code = pipeline.main(["extract", "--model", "test_cli_output:interrupted_at_once", "--data",
                          str(tmp_path / "x.npy"), "--layers", "inner.conv1", "--out", str(out), "--name", "m",
                          "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == (f"interrupted: {out / 'm.zarr'}: rerun the same command to start again (no sample had "
                           "been written, so there is nothing to resume). Finished stores are reused.")
    assert not (out / "m.zarr").exists()


def test_ctrl_c_after_durable_chunks_says_how_far_a_rerun_resumes(tmp_path, monkeypatch):
    import extract.writer as writer

    monkeypatch.setattr(writer, "WRITE_BYTES", 1)  # one chunk per write: chunks are durable as they fill
    path = tmp_path / "m.zarr"
    with pytest.raises(ExtractInterrupted) as caught:
        extract(InterruptAt(5), images(61), path, layers=["inner.conv1", "inner.fc2"], batch_size=7,
                chunk_bytes=5 * 1024, progress=False)
    done = ZarrStore(path).info.samples_done
    assert done > 0
    assert str(caught.value) == (f"{path}: rerun the same command to resume ({done} of 61 samples are written). "
                                 "Finished stores are reused.")


def test_a_failed_read_before_any_sample_says_start_again(tmp_path):
    class Unreadable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(Exception, match=r"rerun the same command to start again \(no sample had been written") as e:
        extract(KillAfter(-1), Unreadable(), tmp_path / "m.zarr", layers=["conv1"], progress=False)
    assert "resume" not in str(e.value).replace("nothing to resume", "")
