"""Crash safety: a subprocess SIGKILLed mid-extraction, then resumed, gives the uninterrupted store.

The child runs ``extract`` on ``KillAfter`` (which SIGKILLs its own process at the start of a given
forward pass) or with ``ZarrStore.write`` / ``write_info`` patched to SIGKILL after a given number of
calls — so the kill lands before any chunk is durable, between the arrays of one chunk (one chunk per
write) or of a group of chunks (the default grouping), in the final partial chunk, and between the last
chunk and the completion marker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_models import KillAfter, images

from extract import StoreError, ZarrStore, extract

N, BATCH, CHUNK_BYTES = 61, 7, 5 * 2048  # conv2 is 2 KB per sample: 13 chunks of 5 rows (the last has 1)
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
ARRAYS_PER_CHUNK = len(LAYERS) + 1  # and the inputs

CHILD = f"""
import os, signal, sys, time
import torch
torch.set_num_threads(1)
from _extract_models import KillAfter, images
import extract.store as st
from extract import extract
mode, k, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, batch, chunk_bytes, layers = {N}, {BATCH}, {CHUNK_BYTES}, {LAYERS!r}
model = KillAfter(k if mode == "forward" else -1)
calls = [0]
if mode != "write_grouped":  # one chunk per write call: the store is tiny, kills must land between its chunks
    import extract.writer as wr
    wr.WRITE_BYTES = 1
if mode in ("write", "write_grouped"):
    original = st.ZarrStore.write
    def write(self, key, start, block):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, key, start, block)
    st.ZarrStore.write = write
if mode == "before_complete":
    original_info = st.ZarrStore.write_info
    def write_info(self, info):
        original_info(self, info)
        if info.samples_done == n and not info.complete:
            os.kill(os.getpid(), signal.SIGKILL)
    st.ZarrStore.write_info = write_info
if mode == "hold":
    forward = model.forward
    def slow(x):
        open(path + ".started", "w").close()
        time.sleep(60)
        return forward(x)
    model.forward = slow
extract(model, images(n), path, layers=layers, batch_size=batch, chunk_bytes=chunk_bytes, progress=False)
print("finished")
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The child runs torch single-threaded; so do the reference and the resumed runs here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> ZarrStore:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("ref") / "ref.zarr"
        extract(KillAfter(-1), images(N), path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES,
                progress=False)
    finally:
        torch.set_num_threads(threads)
    return ZarrStore(path)


def run_child(mode: str, k: int, path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(k), str(path)], env=env, capture_output=True,
                          text=True, timeout=120)


def assert_same_store(store: ZarrStore, reference: ZarrStore) -> None:
    info, ref = store.info, reference.info
    assert info.complete and info.samples_done == N
    assert info.layers == ref.layers == LAYERS
    assert info.fingerprint == ref.fingerprint and info.chunk_digests == ref.chunk_digests
    assert info.chunk_samples == ref.chunk_samples == 5
    for layer in LAYERS:
        np.testing.assert_array_equal(store.read_layer(layer), reference.read_layer(layer), err_msg=layer)
    np.testing.assert_array_equal(store.read_inputs(), reference.read_inputs())


KILL_POINTS = {
    "first forward pass (nothing durable)": ("forward", 0),
    "fourth batch (samples 28..34)": ("forward", 4),
    "last batch": ("forward", 8),
    "between the arrays of chunk 2": ("write", 2 * ARRAYS_PER_CHUNK + 3),
    "inside the final partial chunk": ("write", 12 * ARRAYS_PER_CHUNK + 2),
    "between the arrays of a group of chunks (the default writes)": ("write_grouped", 3),
    "after the last chunk, before the completion marker": ("before_complete", 0),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, subprocess_env, reference, point):
    mode, k = KILL_POINTS[point]
    path = tmp_path / "m.zarr"
    child = run_child(mode, k, path, subprocess_env)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "finished" not in child.stdout
    done = 0
    if path.exists():  # a killed run never leaves a store that looks complete
        store = ZarrStore(path)
        info = store.info
        assert not info.complete
        with pytest.raises(StoreError, match="incomplete"):
            store.require_complete()
        done = info.samples_done
        assert done % 5 == 0 or done == N
    if mode == "before_complete":
        assert done == N
    (path / "layers" / "stale.0123.partial").parent.mkdir(parents=True, exist_ok=True)
    (path / "layers" / "stale.0123.partial").write_bytes(b"left by a killed writer")

    model = KillAfter(-1)
    result = extract(model, images(N), path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES,
                     progress=False)
    assert not result.cached
    assert result.resumed_from == done
    first_batch = done // BATCH
    assert model.calls == (0 if done == N else -(-N // BATCH) - first_batch)  # only the batches still needed
    assert not list(path.rglob("*.partial"))
    assert_same_store(ZarrStore(path), reference)


def test_resume_with_different_data_is_refused(tmp_path, subprocess_env):
    path = tmp_path / "m.zarr"
    child = run_child("forward", 6, path, subprocess_env)
    assert child.returncode == -signal.SIGKILL
    assert ZarrStore(path).info.samples_done > 0
    other = images(N, seed=4)
    with pytest.raises(StoreError, match=r"data differs from the data the partial store .* started with \(chunk 0\)"):
        extract(KillAfter(-1), other, path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES,
                progress=False)
    assert not ZarrStore(path).info.complete


def test_a_second_process_on_the_same_store_is_refused(tmp_path, subprocess_env, reference):
    path = tmp_path / "m.zarr"
    child = subprocess.Popen([sys.executable, "-c", CHILD, "hold", "0", str(path)], env=subprocess_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not Path(str(path) + ".started").exists():
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the child never started its first forward pass"
            time.sleep(0.05)
        with pytest.raises(StoreError, match="Another process is extracting into .*m.zarr"):
            extract(KillAfter(-1), images(N), path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES,
                    progress=False)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    # the kernel released the killed holder's lock: this process may now finish the store
    extract(KillAfter(-1), images(N), path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES, progress=False)
    assert_same_store(ZarrStore(path), reference)
