"""A resume whose data differs only in the final, partial chunk is refused (never completed with a stale sample).

The child extracts 61 samples in chunks of 5 (the last chunk holds one sample) and is SIGKILLed right after the
final partial chunk became durable, before the completion marker. The rerun sees data that differs only in
sample 60: it must refuse (chunk 12's digest differs) or recompute that sample, never mark the store complete
while it holds the old one.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from _extract_models import KillAfter, images

from extract import StoreError, ZarrStore, extract

N, BATCH, CHUNK_BYTES = 61, 7, 5 * 2048  # conv2 is 2 KB per sample: 13 chunks of 5 rows, the last of 1
LAYERS = ["conv1", "conv2", "fc1", "fc2"]

CHILD = f"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from _extract_models import KillAfter, images
import extract.store as st
import extract.writer as wr
from extract import extract
wr.WRITE_BYTES = 1  # one chunk per write
path, n = sys.argv[1], {N}
original = st.ZarrStore.write_info
def write_info(self, info):
    original(self, info)
    if info.samples_done == n and not info.complete:  # every chunk durable, the marker not yet set
        os.kill(os.getpid(), signal.SIGKILL)
st.ZarrStore.write_info = write_info
extract(KillAfter(-1), images(n), path, layers={LAYERS!r}, batch_size={BATCH}, chunk_bytes={CHUNK_BYTES},
        progress=False)
"""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_data_changed_only_in_the_final_partial_chunk_is_never_completed_stale(tmp_path, subprocess_env):
    path = tmp_path / "m.zarr"
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=subprocess_env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    info = ZarrStore(path).info
    assert info.samples_done == N and not info.complete and info.chunk_samples == 5
    old = ZarrStore(path).read_layer("fc2")[N - 1].copy()

    changed = images(N).clone()
    changed[N - 1] = images(N, seed=9)[0]  # only sample 60, alone in chunk 12
    assert torch.equal(changed[: N - 1], images(N)[: N - 1])
    model = KillAfter(-1)
    try:
        extract(model, changed, path, layers=LAYERS, batch_size=BATCH, chunk_bytes=CHUNK_BYTES, progress=False)
    except StoreError as exc:
        assert "data differs" in str(exc) and "(chunk 12)" in str(exc), exc
        assert not ZarrStore(path).info.complete
        return
    # not refused: then the store must hold the new sample, not the old one
    store = ZarrStore(path)
    assert store.info.complete
    with torch.no_grad():
        fresh = KillAfter(-1).eval()
        fresh.load_state_dict(model.state_dict())
        expected = fresh.fc2(torch.relu(fresh.fc1(fresh.pool(fresh.conv2(fresh.relu(fresh.conv1(changed[N - 1:]))))
                                               .flatten(1))))
    np.testing.assert_allclose(store.read_layer("fc2")[N - 1], expected[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(store.read_layer("fc2")[N - 1], old)
