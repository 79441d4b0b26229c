"""`pipeline.py measure` on small stores made in tmp_path: files, headers, manifest, summary, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _stores import write_store
from torch import nn

import pipeline
from extract import extract
from extract.store import ZarrStore
from measure import compare

N = 36
LAYERS = ["0", "1", "2", "3"]
DEFAULT = ["cka", "cka_debiased", "cka_rbf", "dcka"]


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh())


def _data() -> torch.Tensor:
    return torch.randn(N, 10, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    folder = root / "activations"
    for seed in (0, 1):
        extract(_mlp(seed), _data(), folder / f"mlp{seed}.zarr", name=f"mlp{seed}", layers=LAYERS, batch_size=10,
                device="cpu", progress=False)
    return folder


def _run(capsys, *argv):
    code = pipeline.main(["measure", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_measures_write_csv_png_and_manifest(zoo, tmp_path, capsys):
    out_dir = tmp_path / "results"
    code, out, err = _run(capsys, zoo, "--out", out_dir, "--no-cache")
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    pairs = [("mlp0", "mlp0"), ("mlp0", "mlp1"), ("mlp1", "mlp1")]
    entries = {(e["measure"], e["store_a"], e["store_b"]): e for e in manifest["results"]}
    assert set(entries) == {(m, a, b) for m in DEFAULT for a, b in pairs}
    assert set(manifest["stores"]) == {"mlp0", "mlp1"}
    assert manifest["stores"]["mlp0"]["n_samples"] == N and manifest["stores"]["mlp0"]["layers"] == LAYERS
    for (_, a, b), entry in entries.items():
        assert {"options", "csv", "png", "rows", "cols", "symmetric", "range", "reference"} <= set(entry)
        with open(out_dir / entry["csv"], newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == [f"{a} \\ {b}", *LAYERS]
        assert [r[0] for r in rows[1:]] == LAYERS
        matrix = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        assert matrix.shape == (4, 4) and np.isfinite(matrix).all()
        if a == b:
            np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
        png = out_dir / entry["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert entries[("cka_rbf", "mlp0", "mlp1")]["options"] == {"threshold": 0.4}
    assert entries[("dcka", "mlp0", "mlp1")]["options"] == {"psd": False}
    assert "variance_explained" in json.dumps(entries[("dcka", "mlp0", "mlp1")]["extras"])
    # the printed summary: each layer of A and its most similar layer of B, per measure
    for measure in DEFAULT:
        line = next(ln for ln in out.splitlines() if ln.startswith(measure + " ") and "mlp0 vs mlp1" in ln)
        assert all(f"{layer}→" in line for layer in LAYERS)
    assert "wrote 12 result(s)" in out


def test_csv_values_equal_compare_on_the_stored_arrays(zoo, tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, _, err = _run(capsys, zoo / "mlp0.zarr", zoo / "mlp1.zarr", "--measures", "cka", "cka_rbf(threshold=0.8)",
                        "cka_minibatch(batch_size=12)", "--layers", "1", "3", "--out", out_dir, "--no-plots",
                        "--quiet", "--no-cache")
    assert code == 0, err
    a, b = ZarrStore(zoo / "mlp0.zarr"), ZarrStore(zoo / "mlp1.zarr")
    # cka_rbf forms the Grams, so the run's cka takes them too (its auto route); compare is told the same route
    for measure, options, stem in [("cka", {"route": "gram"}, "cka"), ("cka_rbf", {"threshold": 0.8}, "cka_rbf"),
                                   ("cka_minibatch", {"batch_size": 12}, "cka_minibatch")]:
        with open(out_dir / stem / "mlp0__mlp1.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][1:] == ["1", "3"]
        got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        expected = [[compare(a.read_layer(x), b.read_layer(y), measure, **options) for y in ("1", "3")]
                    for x in ("1", "3")]
        np.testing.assert_allclose(got, expected, atol=1e-12)
    assert not list(out_dir.rglob("*.png"))


def test_list_measures(capsys):
    code, out, _ = _run(capsys, "--list-measures")
    assert code == 0
    for name in ("cka", "cka_debiased", "cka_rbf", "cka_minibatch", "dcka"):
        assert any(line.split()[0] == name for line in out.splitlines())


def test_parser_standalone():
    args = pipeline.measure_command_parser().parse_args(["a.zarr", "--measures", "cka", "--undefined", "nan"])
    assert args.stores == ["a.zarr"] and args.measures == ["cka"] and args.undefined == "nan"


def test_measure_cli_parser_standalone_and_registered():
    import argparse

    from measure.cli import engine_config, measure_command, measure_command_parser

    args = measure_command_parser().parse_args(["a.zarr", "--memory-budget", "0.5", "--precision", "float32"])
    config = engine_config(args)
    assert config.memory_budget == 2**29 and config.precision == "float32" and config.undefined == "raise"
    assert not hasattr(args, "func")
    root = argparse.ArgumentParser()
    measure_command_parser(root.add_subparsers())
    args = root.parse_args(["measure", "a.zarr", "b.zarr", "--layers", "fc*"])
    assert args.func is measure_command and args.stores == ["a.zarr", "b.zarr"] and args.layers == ["fc*"]


# ----------------------------------------------------------------------------- bad input


def _write(path, name, layers, *, fingerprint="sha256:x", complete=True):
    return write_store(path, name, layers, chunk=8, fingerprint=fingerprint, complete=complete).path


def _layers(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(n, 6)).astype(np.float32), "b": rng.normal(size=(n, 3, 2)).astype(np.float32)}


def _assert_one_line_error(code, err, *fragments):
    assert code != 0
    # what a terminal shows: the progress bar redraws with carriage returns and is cleared on exit
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_nan_store(tmp_path, capsys):
    layers = _layers()
    layers["b"][11, 1, 0] = np.nan
    a = _write(tmp_path / "a.zarr", "A", layers)
    code, _, err = _run(capsys, a, "--measures", "cka", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "layer 'b'", "NaN or Inf", "between sample 11 and 11")


def test_incomparable_and_incomplete_stores(tmp_path, capsys):
    a = _write(tmp_path / "a.zarr", "A", _layers())
    b = _write(tmp_path / "b.zarr", "B", _layers(seed=1), fingerprint="sha256:y")
    code, _, err = _run(capsys, a, b, "--measures", "cka", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "not extracted from the same data")
    c = _write(tmp_path / "c.zarr", "C", _layers(n=20))
    code, _, err = _run(capsys, a, c, "--measures", "cka", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "30 vs 20 samples")
    d = _write(tmp_path / "d.zarr", "D", _layers(seed=2), complete=False)
    code, _, err = _run(capsys, a, d, "--measures", "cka", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "incomplete")
    code, _, err = _run(capsys, tmp_path / "missing.zarr", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "No store at")


def test_measure_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.zarr", "A", _layers())
    for argv, fragments in [
        (["--measures", "cka_typo"], ["Unknown measure 'cka_typo'", "valid measures"]),
        (["--measures", "cka_rbf(sigma=1)"], ["Unknown option", "threshold"]),
        (["--measures", "cka(route=fast)"], ["route"]),
        (["--measures", "dcka"], ["dcka needs the inputs", "--no-inputs"]),
        (["--measures", "cka_minibatch"], ["needs option", "batch_size"]),
        (["--layers", "zz*"], ["match no layer"]),
    ]:
        code, _, err = _run(capsys, a, *argv, "--out", tmp_path / "o", "--no-cache")
        _assert_one_line_error(code, err, *fragments)
    tiny = _write(tmp_path / "tiny.zarr", "T", _layers(n=3))
    code, _, err = _run(capsys, tiny, "--measures", "cka_debiased", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "at least 4 samples")


def test_constant_layer_raises_unless_undefined_nan(tmp_path, capsys):
    layers = _layers()
    layers["b"][:] = 2.0
    a = _write(tmp_path / "a.zarr", "A", layers)
    code, _, err = _run(capsys, a, "--measures", "cka", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "undefined for layer 'b'", "--undefined nan")
    code, out, err = _run(capsys, a, "--measures", "cka", "cka_debiased(route=features)", "--undefined", "nan",
                          "--out", tmp_path / "o", "--no-cache", "--no-plots")
    assert code == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert warnings and all("undefined for layer 'b'" in w for w in warnings)
    assert "Traceback" not in err and "warnings.warn" not in err
    with open(tmp_path / "o" / "cka" / "A__A.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1][1] == "1" or float(rows[1][1]) == pytest.approx(1.0)
    assert rows[1][2] == "nan" and rows[2][2] == "nan"
