"""Fault injection: kills, corruption, full disks, concurrency. Nothing lost, nothing silently wrong.

Every case here uses the real thing it is about: real SIGKILLs of real
processes, real flipped bits in real chunk files, a real file-size limit
(RLIMIT_FSIZE, which fails writes with EFBIG exactly where a full disk fails
them with ENOSPC).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract.store import StoreError, ZarrStore
from measure.engine import Engine

TESTS_DIR = Path(__file__).resolve().parents[1]
WORKER = str(TESTS_DIR / "_reliability_worker.py")


def _worker(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "READY", f"worker did not start: {line!r} {proc.stderr.read()}"
    return proc


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    store = ZarrStore(path)
    arrays = {f"layers/{layer}": store.read_layer(layer) for layer in store.layers}
    arrays["inputs"] = store.read_inputs()
    return arrays


def assert_same_store(path: Path, reference: Path) -> None:
    a, b = ZarrStore(path).info, ZarrStore(reference).info
    assert a.complete and b.complete
    assert (a.layers, a.n_samples, a.fingerprint, a.chunk_digests) == (b.layers, b.n_samples, b.fingerprint,
                                                                         b.chunk_digests)
    got, want = _store_arrays(path), _store_arrays(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _refused_unless_complete(path: Path) -> bool:
    """True if the store is complete; else assert that measuring it is refused."""
    if not path.exists():
        return False
    try:
        store = ZarrStore(path)
    except StoreError:
        return False  # killed before the group existed
    if store.info.complete:
        return True
    with pytest.raises(StoreError, match="incomplete"):
        Engine([store])
    return False


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, subprocess_env_module) -> Path:
    path = tmp_path_factory.mktemp("ref") / "net.zarr"
    done = _worker(["extract", str(path)], subprocess_env_module)
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def subprocess_env_module() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# --------------------------------------------------------------------------- kills
@pytest.mark.slow
def test_sigkill_extract_at_20_random_points(tmp_path, reference_store, subprocess_env_module):
    """20 SIGKILLs at random moments over 4 stores; each rerun finishes equal to an uninterrupted run."""
    env = subprocess_env_module
    started = time.perf_counter()
    proc = _start(["extract", str(tmp_path / "timing.zarr")], env)
    proc.wait(timeout=300)
    run_seconds = time.perf_counter() - started
    rng = random.Random(20261129)
    kills = 0
    for s in range(4):
        path = tmp_path / f"killed{s}.zarr"
        for _ in range(5):
            proc = _start(["extract", str(path)], env)
            time.sleep(rng.uniform(0.0, run_seconds))
            proc.kill()
            proc.wait()
            kills += 1
            if _refused_unless_complete(path):
                assert_same_store(path, reference_store)
        finished = _worker(["extract", str(path)], env)
        assert finished.returncode == 0, finished.stderr
        assert_same_store(path, reference_store)
        assert not list(path.rglob("*.partial")), "temporary files left in a finished store"
    assert kills == 20


def _csvs_are_whole(out: Path) -> None:
    from measure.report import read_matrix_csv
    from measure.report.files import read_results_table

    for csv_path in out.rglob("*.csv"):
        if csv_path.parent == out:  # the results table
            header, rows = read_results_table(csv_path)
            assert len(rows) > 0 and all(len(r) == len(header) for r in rows)
            continue
        rows, cols, matrix = read_matrix_csv(csv_path)
        assert matrix.shape == (len(rows), len(cols)) and len(rows) > 0
    manifest = out / "manifest.json"
    if manifest.exists():
        written = json.loads(manifest.read_text())
        for entry in written["results"]:
            assert (out / entry["csv"]).exists()
        assert (out / written["table"]["path"]).exists()


@pytest.mark.slow
def test_sigkill_measure_leaves_no_partial_result(tmp_path, reference_store, subprocess_env_module):
    other = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, other)
    complete = tmp_path / "complete"
    args = ["cli", "--", "measure", str(reference_store), "--out", str(complete), "--quiet",
            "--measures", "cka", "cka_debiased", "cka_rbf", "dcka"]
    done = _worker(args, subprocess_env_module)
    assert done.returncode == 0, done.stderr
    _, _, want = __import__("measure.report", fromlist=["x"]).read_matrix_csv(complete / "cka" / "net__net.csv")
    rng = random.Random(3)
    out = tmp_path / "out"
    for _ in range(4):
        proc = _start(["cli", "--", "measure", str(reference_store), "--out", str(out), "--quiet",
                       "--measures", "cka", "cka_debiased", "cka_rbf", "dcka"], subprocess_env_module)
        time.sleep(rng.uniform(0.2, 3.0))
        proc.kill()
        proc.wait()
        _csvs_are_whole(out)
        assert not list(out.rglob("*.tmp")) or all(p.name.startswith(".") for p in out.rglob("*.tmp"))
    rerun = _worker(args[:4] + [str(out)] + args[5:], subprocess_env_module)
    assert rerun.returncode == 0, rerun.stderr
    from measure.report import read_matrix_csv

    np.testing.assert_array_equal(read_matrix_csv(out / "cka" / "net__net.csv")[2], want)


# --------------------------------------------------------------------------- corruption
def _read_everything(path: Path) -> None:
    store = ZarrStore(path)
    store.require_complete()
    for layer in store.layers:
        store.read_layer(layer)
    store.read_inputs()


def _store_files(path: Path) -> tuple[list[Path], list[Path]]:
    chunks = sorted(p for p in path.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(path.parent)))
    metadata = sorted(path.rglob("zarr.json"))
    return chunks, metadata


def test_100_bit_flips_are_detected(tmp_path, reference_store):
    path = tmp_path / "flip.zarr"
    shutil.copytree(reference_store, path)
    chunks, metadata = _store_files(path)
    assert len(chunks) > 20 and metadata
    rng = random.Random(1)
    for flip in range(100):
        target = rng.choice(metadata) if flip % 4 == 0 else rng.choice(chunks)
        original = target.read_bytes()
        corrupted = bytearray(original)
        i = rng.randrange(len(corrupted))
        corrupted[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(corrupted))
        try:
            with pytest.raises(StoreError) as info:
                _read_everything(path)
            message = str(info.value)
            assert str(path) in message, message
            if target in chunks:
                array = target.relative_to(path).parts
                layer = array[1] if array[0] == "layers" else array[0]
                assert layer in message and "chunk" in message, message
        finally:
            target.write_bytes(original)
    _read_everything(path)  # restored: reads cleanly again


@pytest.mark.parametrize("damage", ["truncate", "delete", "empty"])
def test_truncated_and_deleted_chunks_are_detected(tmp_path, reference_store, damage):
    path = tmp_path / "damaged.zarr"
    shutil.copytree(reference_store, path)
    chunks, _ = _store_files(path)
    target = [c for c in chunks if "conv2" in str(c)][1]
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.unlink()
    with pytest.raises(StoreError, match=r"conv2.*chunk|chunk.*conv2"):
        _read_everything(path)


# --------------------------------------------------------------------------- full disk
def test_file_size_limit_during_extract_leaves_a_resumable_store(tmp_path, reference_store, subprocess_env_module):
    out = tmp_path / "stores"
    limited = _worker(["cli", "--fsize", "12000", "--", "extract", "--model", "_reliability_worker:model",
                       "--data", "_reliability_worker:data", "--layers", "conv1", "conv2", "fc1", "fc2",
                       "--name", "net", "--out", str(out), "--batch-size", "23", "--quiet"],
                      subprocess_env_module)
    assert limited.returncode != 0
    assert "Traceback" not in limited.stderr
    assert "error:" in limited.stderr and ("space" in limited.stderr.lower() or "large" in limited.stderr.lower())
    path = out / "net.zarr"
    if path.exists():
        assert not _refused_unless_complete(path)
    rerun = _worker(["cli", "--", "extract", "--model", "_reliability_worker:model",
                     "--data", "_reliability_worker:data", "--layers", "conv1", "conv2", "fc1", "fc2",
                     "--name", "net", "--out", str(out), "--batch-size", "23", "--quiet"], subprocess_env_module)
    assert rerun.returncode == 0, rerun.stderr
    got, want = _store_arrays(path), _store_arrays(reference_store)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_file_size_limit_during_result_writing(tmp_path, reference_store, subprocess_env_module):
    out = tmp_path / "results"
    limited = _worker(["cli", "--fsize", "3000", "--", "measure", str(reference_store), "--out", str(out),
                       "--quiet", "--measures", "cka"], subprocess_env_module)
    assert limited.returncode != 0
    assert "Traceback" not in limited.stderr and "error:" in limited.stderr
    assert not (out / "manifest.json").exists()
    _csvs_are_whole(out) if out.exists() else None


# --------------------------------------------------------------------------- concurrency
def test_second_extract_on_the_same_store_is_refused(tmp_path, subprocess_env_module):
    path = tmp_path / "shared.zarr"
    first = _start(["extract", str(path), "--slow", "0.02"], subprocess_env_module)  # ≈ 10 s of loading
    second = _worker(["extract", str(path)], subprocess_env_module)
    assert first.poll() is None, "the first extraction ended before the second started; slow it down"
    assert second.returncode != 0
    assert "Another process is extracting into" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert ZarrStore(path).info.complete
    _read_everything(path)


def _cache_entries_sound(cache_path: Path) -> int:
    """Every complete cache entry's bytes match its recorded SHA-256; returns how many are complete."""
    import crc32c

    from measure.engine.cache import StatisticsCache

    cache = StatisticsCache(cache_path)
    complete = 0
    group = cache._open(create=False)
    for key, attrs in cache.entries().items():
        if not attrs.get("complete"):
            continue
        data = np.asarray(group[f"entries/{key}"][...], dtype=np.float64)
        assert crc32c.crc32c(data.tobytes()) == attrs["crc32c"], f"corrupt cache entry {key}"
        complete += 1
    return complete


@pytest.mark.slow
def test_sigkill_measure_leaves_no_corrupt_cache_entry(tmp_path, reference_store, subprocess_env_module):
    cache = tmp_path / "cache.zarr"
    args = ["cli", "--", "measure", str(reference_store), "--out", str(tmp_path / "out"), "--quiet",
            "--no-plots", "--no-report", "--measures", "cka", "cka_rbf", "--cache", str(cache)]
    rng = random.Random(5)
    for _ in range(4):
        proc = _start(args, subprocess_env_module)
        time.sleep(rng.uniform(0.3, 2.5))
        proc.kill()
        proc.wait()
        if cache.exists():
            _cache_entries_sound(cache)
    done = _worker(args, subprocess_env_module)
    assert done.returncode == 0, done.stderr
    assert _cache_entries_sound(cache) >= len(ZarrStore(reference_store).layers)


def test_two_measure_processes_share_one_cache(tmp_path, reference_store, subprocess_env_module):
    from measure.report import read_matrix_csv

    cache = tmp_path / "shared-cache.zarr"
    common = ["--quiet", "--no-plots", "--no-report", "--measures", "cka", "cka_debiased", "--cache", str(cache)]
    procs = [_start(["cli", "--", "measure", str(reference_store), "--out", str(tmp_path / f"out{i}"), *common],
                    subprocess_env_module) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    alone = _worker(["cli", "--", "measure", str(reference_store), "--out", str(tmp_path / "alone"), "--quiet",
                     "--no-plots", "--no-report", "--measures", "cka", "cka_debiased", "--no-cache"],
                    subprocess_env_module)
    assert alone.returncode == 0, alone.stderr
    want = read_matrix_csv(tmp_path / "alone" / "cka_debiased" / "net__net.csv")[2]
    for i in range(2):
        np.testing.assert_allclose(read_matrix_csv(tmp_path / f"out{i}" / "cka_debiased" / "net__net.csv")[2], want,
                                   rtol=0, atol=1e-12)
    assert _cache_entries_sound(cache) >= len(ZarrStore(reference_store).layers)
