"""Start-up: the CLI imports only what the chosen route needs (no dask, matplotlib, s3fs on the local route).

Each check runs a fresh interpreter (imports are per process) and lists which of the optional heavy
modules it loaded. fsspec is special: zarr itself imports it (``zarr.storage._common``), so on routes that
open stores it may appear exactly when a bare ``import zarr`` loads it, never because of our code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from _extract_models import images, small_cnn
from _stores import write_store

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
HEAVY = ("dask", "distributed", "matplotlib", "fsspec", "s3fs")


def _loaded(code: str, cwd: Path = ROOT) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the HEAVY top-level modules it imported."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    env = {"PYTHONPATH": f"{ROOT}:{TESTS}", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_optional_backend():
    code = "import pipeline, sys; pipeline.build_parser()"
    assert _loaded(code) == []


def test_local_measure_without_plots_imports_no_dask_matplotlib_or_s3fs(tmp_path):
    """The route of the speed benchmarks (--no-plots --no-report; the HTML report draws its own heatmaps)."""
    rng = np.random.default_rng(0)
    layers = {name: {"h": rng.normal(size=(40, 6)).astype(np.float32)} for name in "AB"}
    paths = [write_store(tmp_path / f"{name}.zarr", name, layers[name]).path for name in "AB"]
    code = (f"import pipeline; rc = pipeline.main(['measure', {str(paths[0])!r}, {str(paths[1])!r}, "
            "'--measures', "
            f"'cka', 'cka_debiased', '--out', {str(tmp_path / 'out')!r}, '--no-plots', '--no-report', "
            "'--quiet', '--no-cache'])\n"
            "assert rc == 0, rc")
    loaded = _loaded(code, tmp_path)
    assert (tmp_path / "out").is_dir()
    assert set(loaded) <= set(_loaded("import zarr", tmp_path)) and not {"dask", "matplotlib", "s3fs"} & set(loaded)


def test_local_extract_imports_no_dask_matplotlib_or_s3fs(tmp_path):
    np.save(tmp_path / "x.npy", images(30, seed=3).numpy())
    torch.save(small_cnn().state_dict(), tmp_path / "w.pt")
    code = (f"import pipeline; rc = pipeline.main(['extract', '--model', '_extract_models:small_cnn', '--weights', "
            f"{str(tmp_path / 'w.pt')!r}, '--data', {str(tmp_path / 'x.npy')!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--layers', 'conv*', 'fc2', '--quiet'])\nassert rc == 0, rc")
    loaded = _loaded(code, tmp_path)
    assert any((tmp_path / "out").glob("*.zarr"))
    assert set(loaded) <= set(_loaded("import zarr", tmp_path)) and not {"dask", "matplotlib", "s3fs"} & set(loaded)


def _fresh(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in a fresh interpreter from the repository root."""
    env = {"PYTHONPATH": f"{ROOT}:{TESTS}", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_building_the_parser_imports_no_torch_numpy_or_zarr():
    """``--help`` builds only the parser: torch, numpy and zarr (seconds of imports) stay unloaded."""
    done = _fresh(["-c", "import pipeline, sys; pipeline.build_parser(); "
                         "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'zarr'}))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_importing_the_packages_is_lazy_but_complete():
    """``import measure, extract`` loads no torch; every public name still resolves (PEP 562)."""
    done = _fresh(["-c", "import sys, extract, measure, extract.store as store; "
                         "print('torch' in sys.modules, 'zarr' in sys.modules); "
                         "missing = [f'{m.__name__}.{n}' for m in (extract, measure, store) for n in m.__all__ "
                         "if not hasattr(m, n)]; print(missing); "
                         "from measure.comparison import compare; print(measure.compare is compare, "
                         "sorted(measure.MEASURES) == sorted(measure.registry.MEASURES))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["False False", "[]", "True True"]


def test_help_of_each_command_exits_zero_and_describes_it():
    from measure.report import REPORT_NAME

    measure_help = _fresh(["pipeline.py", "measure", "--help"])
    assert measure_help.returncode == 0, measure_help.stderr
    assert "--measures" in measure_help.stdout and f"skip {REPORT_NAME}" in measure_help.stdout
    extract_help = _fresh(["pipeline.py", "extract", "--help"])
    assert extract_help.returncode == 0, extract_help.stderr
    assert "--layers" in extract_help.stdout and "--model" in extract_help.stdout
