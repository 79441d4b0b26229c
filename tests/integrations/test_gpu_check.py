"""``benchmarks/gpu_check.py`` runs on the CPU (``--device cpu --quick --no-peers``) and checks its values.

The script is meant for a CUDA machine; here it runs its whole path on the CPU with a tiny size and without
simtorch 0.2.1 (whose venv needs PyPI). ``--tolerance 0`` shows that the check against the CPU float64
result is real: the default precision (compensated float32 Grams) differs from float64 by a few 1e-9.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-peers", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_gpu_check_runs_on_cpu_and_prints_the_table_within_tolerance():
    done = _run()
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "simtorch 0.2.1: skipped (--no-peers)" in out
    assert "| our extract + measure, exact `cka` (precision auto) |" in out
    assert "values on cpu within 1e-06 of the CPU float64 result" in out


def test_gpu_check_fails_when_values_leave_the_tolerance():
    done = _run("--tolerance", "0")
    assert done.returncode == 1
    assert done.stderr.startswith("error: values on cpu differ from the CPU float64 result")
    assert "Traceback" not in done.stderr
