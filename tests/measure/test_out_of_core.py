"""Out of core: a store 4x larger than an address-space limit enforced with setrlimit is measured exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.store import StoreInfo, ZarrStore
from measure.engine.streaming import gram_block_rows, layer_gram

ROOT = Path(__file__).parents[2]
MiB = 2**20


def _write_store(path: Path, n: int, p: int, chunk_bytes: int) -> None:
    """A complete store with a wide float32 layer (n × p) and a narrow one (n × 8), written in slabs."""
    chunk = max(1, chunk_bytes // (p * 4))
    store = ZarrStore(path, read_only=False, create=True)
    info = StoreInfo(model_name="big", layers=["wide", "narrow"], n_samples=n, chunk_samples=chunk,
                     fingerprint="sha256:synthetic", inputs_stored=False)
    store.write_info(info)
    store.create_array("layers/wide", (n, p), "float32", chunk)
    store.create_array("layers/narrow", (n, 8), "float32", chunk)
    rng = np.random.default_rng(0)
    for a in range(0, n, 50):
        b = min(n, a + 50)
        store.write("layers/wide", a, (rng.standard_normal((b - a, p)) + 0.3).astype(np.float32))
        store.write("layers/narrow", a, rng.standard_normal((b - a, 8)).astype(np.float32))
    info.samples_done, info.complete = n, True
    store.write_info(info)


def _reference_gram(path: Path, layer: str) -> np.ndarray:
    """Float64 X Xᵀ with NumPy, summed over column slabs (independent of simtorch's row blocking)."""
    x = ZarrStore(path).read_layer(layer)
    x = x.reshape(len(x), -1)
    k = np.zeros((len(x), len(x)))
    for j in range(0, x.shape[1], 8192):
        xs = x[:, j:j + 8192].astype(np.float64)
        k += xs @ xs.T
    return k


def _linear_cka(k: np.ndarray, m: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - 1.0 / n
    kc, lc = h @ k @ h, h @ m @ h
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


CHILD = r"""
import json, resource, sys, threading
threading.stack_size(1 << 20)   # thread stacks are reserved address space, not memory the budget is about
import numpy as np, torch
torch.set_num_threads(1)
from extract.store import ZarrStore
from measure.engine import Engine
from measure.engine.streaming import layer_gram

path, budget, allowance, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

store = ZarrStore(path)
layer_gram(store, "narrow", torch.device("cpu"), budget)          # warm up zarr's and torch's pools
x = torch.from_numpy(store.read_layer("wide", 0, 2 * store.info.chunk_samples)).double()
x @ x.T                                                          # BLAS allocates its work buffers once
del x
engine = Engine([store], device="cpu", memory_budget=budget, precision="float64")
base = vm("VmSize:")
resource.setrlimit(resource.RLIMIT_AS, (base + allowance, base + allowance))
try:
    result = engine.run([("cka", {})], [(0, 0)])[0]
except (MemoryError, RuntimeError) as exc:   # torch's allocator raises RuntimeError
    if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
        raise
    print(json.dumps({"memory_error": True}))
    sys.exit(0)
np.save(out + "_gram.npy", engine.gram(0, "wide").numpy())
np.save(out + "_cka.npy", result.matrix)
print(json.dumps({"memory_error": False, "base": base, "peak_over_base": vm("VmPeak:") - base}))
"""


def _run_limited(path: Path, budget: int, allowance: int, out: Path) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget), str(allowance), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gram_block_rows_respect_the_budget():
    # held block + two streamed blocks + two chunks of read overhead never exceed the budget
    for n, chunk, per_row, budget in [(400, 3, 640_000, 24 * MiB), (2000, 20, 400_000, 100 * MiB),
                                      (1000, 64, 8_000, 2 * MiB), (10, 10, 8, 1 << 30)]:
        a, b = gram_block_rows(n, chunk, per_row, budget)
        if a >= n:
            assert n * per_row + 2 * chunk * per_row <= budget
        else:
            assert a % chunk == 0 and b % chunk == 0 and a >= chunk and b >= chunk
            assert (a + 2 * b + 2 * chunk) * per_row <= max(budget, 5 * chunk * per_row)


@pytest.mark.parametrize("n,p,budget", [(37, 300, 20_000), (64, 2000, 200_000), (50, 10, 1 << 30)])
def test_blocked_gram_equals_numpy_at_any_budget(tmp_path, n, p, budget):
    path = tmp_path / "s.zarr"
    _write_store(path, n, p, chunk_bytes=4 * p * 4)
    got = layer_gram(ZarrStore(path), "wide", torch.device("cpu"), budget).numpy()
    np.testing.assert_allclose(got, _reference_gram(path, "wide"), rtol=1e-12, atol=1e-9)


def test_nan_in_a_late_row_is_reported_out_of_core(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path, 40, 500, chunk_bytes=4 * 500 * 4)
    import zarr

    zarr.open_group(str(path))["layers/wide"][33, 7] = np.nan
    from measure.errors import MeasureError

    with pytest.raises(MeasureError, match=r"NaN or Inf in 1 sample\(s\), between sample 33 and 33"):
        layer_gram(ZarrStore(path), "wide", torch.device("cpu"), 30_000)


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_features_in_staging_groups_and_in_one_read(tmp_path, monkeypatch, stored, dtype):
    """Rows decoded straight into the result (float32 → float32) or through a small staging buffer
    (3 chunks per read here, the last read partial) equal the stored rows; a NaN is named by its row."""
    import measure.engine.streaming as statistics
    from measure.errors import MeasureError

    n, chunk = 23, 2
    x = np.random.default_rng(3).standard_normal((n, 4, 5)).astype(stored)
    store = ZarrStore(tmp_path / "s.zarr", read_only=False, create=True)
    store.create_array("layers/x", x.shape, stored, chunk)
    store.write("layers/x", 0, x)
    store.write_info(StoreInfo(model_name="m", layers=["x"], n_samples=n, chunk_samples=chunk,
                               samples_done=n, complete=True))
    monkeypatch.setattr(statistics, "GATHER_STAGING_BYTES", 3 * chunk * 20 * x.itemsize)
    got = statistics.layer_features(ZarrStore(tmp_path / "s.zarr"), "x", torch.device("cpu"), dtype=dtype)
    assert got.dtype == dtype and got.shape == (n, 20)
    np.testing.assert_array_equal(got.double().numpy(), x.reshape(n, 20).astype(np.float64))

    import zarr

    zarr.open_group(str(tmp_path / "s.zarr"))["layers/x"][19, 2, 3] = np.nan
    with pytest.raises(MeasureError, match=r"between sample 19 and 19"):
        statistics.layer_features(ZarrStore(tmp_path / "s.zarr"), "x", torch.device("cpu"), dtype=dtype)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status and uses RLIMIT_AS")
def test_store_four_times_the_memory_limit(tmp_path):
    n, p = 400, 84_000                      # 134 MB of float32 features in the wide layer
    budget, allowance = 16 * MiB, 32 * MiB  # memory_budget, and the address space allowed above the baseline
    path = tmp_path / "big.zarr"
    _write_store(path, n, p, chunk_bytes=1 * MiB)
    data_bytes = n * p * 4
    assert data_bytes >= 4 * allowance

    # the limit is real: the same run without a budget cannot read the layer at once
    assert _run_limited(path, 1 << 30, allowance, tmp_path / "nobudget")["memory_error"]

    report = _run_limited(path, budget, allowance, tmp_path / "out")
    assert not report["memory_error"] and report["peak_over_base"] <= allowance
    k_wide, k_narrow = _reference_gram(path, "wide"), _reference_gram(path, "narrow")
    np.testing.assert_allclose(np.load(tmp_path / "out_gram.npy"), k_wide, rtol=1e-12, atol=1e-8)
    want = np.array([[1.0, _linear_cka(k_wide, k_narrow)], [_linear_cka(k_narrow, k_wide), 1.0]])
    np.testing.assert_allclose(np.load(tmp_path / "out_cka.npy"), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_layer_grams_reading_ahead_into_freed_memory(tmp_path, precision):
    """``layer_grams`` reads each layer into the memory of the layer before last when it is big enough:
    every Gram still equals NumPy's, whatever the order of wide and narrow layers."""
    from measure.engine.streaming import layer_grams

    n, widths = 30, {"a": 500, "b": 40, "c": 300, "d": 700, "e": 20, "f": 650}
    rng = np.random.default_rng(4)
    store = ZarrStore(tmp_path / "s.zarr", read_only=False, create=True)
    arrays = {}
    for name, p in widths.items():
        arrays[name] = (rng.standard_normal((n, p)) + 0.5).astype(np.float32)
        store.create_array(f"layers/{name}", (n, p), "float32", 8)
        store.write(f"layers/{name}", 0, arrays[name])
    store.write_info(StoreInfo(model_name="m", layers=list(widths), n_samples=n, chunk_samples=8,
                               samples_done=n, complete=True))
    store = ZarrStore(tmp_path / "s.zarr")
    jobs = [(store, name) for name in ["a", "b", "c", "d", "e", "f", "a", "c"]]
    grams = list(layer_grams(jobs, torch.device("cpu"), 1 << 30, precision))
    for (_, name), gram in zip(jobs, grams, strict=True):
        x = arrays[name].astype(np.float64)
        np.testing.assert_allclose(gram.numpy(), x @ x.T, rtol=1e-6 if precision == "float32" else 1e-12,
                                   atol=1e-6 * np.abs(x @ x.T).max())
