"""Shared fixtures. Keep this file small: the extract tests' models live in ``_extract_models.py``, the
one helper that writes a small store in ``_stores.py``."""

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


@pytest.fixture
def write_store():
    """The store-writing helper of the tests (``_stores.write_store``), for tests that take it as a fixture."""
    from _stores import write_store

    return write_store
