"""Several `pipeline.py measure` processes started together on one fresh `--cache` folder: every run
succeeds, uses the cache (no "Could not write" warning), gives the values of a lone run without cache,
and a later run reuses every statistic."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from _stores import write_store

from measure.report import read_matrix_csv

pytestmark = pytest.mark.slow

N = 64
N_LAYERS = 8
MODELS = ["m0", "m1", "m2"]
RUNS_TOGETHER = 3
REPEATS = 3
MEASURES = ["cka_rbf"]  # Gram route only: every statistic is a cached Gram


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("race")
    paths = []
    for i, model in enumerate(MODELS):
        rng = np.random.default_rng(i)
        layers = {f"layer{k}": rng.normal(size=(N, 40)).astype(np.float32) for k in range(N_LAYERS)}
        paths.append(write_store(root / f"{model}.zarr", model, layers, chunk=16).path)
    return root, paths


def _argv(paths, out, *extra):
    return [sys.executable, "pipeline.py", "measure", *map(str, paths), "--measures", *MEASURES, "--out", str(out),
            "--no-plots", "--no-report", "--device", "cpu", *map(str, extra)]


def _results(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return {(e["measure"], e["store_a"], e["store_b"]): read_matrix_csv(out / e["csv"]) for e in manifest["results"]}


def _statistics_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("statistics:"))


def test_runs_started_together_share_one_fresh_cache(zoo, subprocess_env):
    from conftest import REPO_ROOT

    root, paths = zoo
    lone = subprocess.run(_argv(paths, root / "lone", "--no-cache"), cwd=REPO_ROOT, env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert lone.returncode == 0, lone.stderr
    reference = _results(root / "lone")
    n_statistics = len(MODELS) * N_LAYERS
    for repeat in range(REPEATS):
        cache = root / f"cache{repeat}.zarr"
        procs = [subprocess.Popen(_argv(paths, root / f"out{repeat}_{k}", "--cache", cache), cwd=REPO_ROOT,
                                  env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(RUNS_TOGETHER)]
        done = [(p, *p.communicate(timeout=300)) for p in procs]
        computed = 0
        for k, (proc, stdout, stderr) in enumerate(done):
            assert proc.returncode == 0, (repeat, k, stderr)
            assert "Could not write" not in stderr and "warning:" not in stderr, (repeat, k, stderr)
            line = _statistics_line(stdout)
            got = re.fullmatch(rf"statistics: (\d+) computed, (\d+) reused from {re.escape(str(cache))}", line)
            assert got and int(got[1]) + int(got[2]) == n_statistics, line
            computed += int(got[1])
            results = _results(root / f"out{repeat}_{k}")
            assert results.keys() == reference.keys()
            for key, (rows, cols, matrix) in results.items():
                assert (rows, cols) == reference[key][:2]
                # equal: a cached Gram is the stored bits of the one the lone run computes the same way
                np.testing.assert_array_equal(matrix, reference[key][2], err_msg=str((repeat, k, key)))
        assert computed >= n_statistics  # every statistic was computed by at least one of the runs
        later = subprocess.run(_argv(paths, root / f"later{repeat}", "--cache", cache), cwd=REPO_ROOT,
                               env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert later.returncode == 0 and "warning:" not in later.stderr, later.stderr
        assert _statistics_line(later.stdout) == f"statistics: 0 computed, {n_statistics} reused from {cache}"
        assert not (cache / ".tmp").exists()  # nothing left aside: plain zarr lists the cache without warnings
