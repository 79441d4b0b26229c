"""Shared fixtures. Keep this file small; the extract tests' models live in ``_extract_models.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # so that '_extract_models:small_cnn' resolves in-process
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that imports simtorch and the test models, single-threaded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many small products (the thread pool only adds overhead); restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_test_store(path, name, layers, *, inputs=None, chunk=7, fingerprint="sha256:test", complete=True):
    """A simtorch store written directly with ``ZarrStore`` (as extract does), then reopened read-only.

    ``layers`` maps layer names to arrays of shape (n_samples, ...), stored in their own dtype; ``inputs``
    (optional) become the store's confounder array. Incomplete stores record one chunk as done.
    """
    from extract.store import INPUTS_ARRAY, LAYERS_GROUP, StoreInfo, ZarrStore

    store = ZarrStore(path, read_only=False, create=True)
    n = len(next(iter(layers.values())))
    for layer, array in layers.items():
        store.create_array(f"{LAYERS_GROUP}/{layer}", array.shape, str(array.dtype), chunk)
        store.write(f"{LAYERS_GROUP}/{layer}", 0, array)
    if inputs is not None:
        store.create_array(INPUTS_ARRAY, inputs.shape, str(inputs.dtype), chunk)
        store.write(INPUTS_ARRAY, 0, inputs)
    store.write_info(StoreInfo(
        model_name=name, layers=list(layers), n_samples=n, chunk_samples=chunk,
        dtype=str(next(iter(layers.values())).dtype), samples_done=n if complete else chunk,
        fingerprint=fingerprint, complete=complete, inputs_stored=inputs is not None,
        input_shape=list(inputs.shape[1:]) if inputs is not None else [],
    ))
    return ZarrStore(path)


@pytest.fixture
def write_store():
    """The store-writing helper of the tests: ``write_store(path, name, {layer: array}, inputs=..., chunk=...)``."""
    return write_test_store
