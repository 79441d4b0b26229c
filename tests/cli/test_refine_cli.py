"""``pipeline.py measure --refine``: an approximate measure's chosen pairs recomputed exactly, marked in the
results table (``approximate``, ``refined``), the manifest (``approximate``, ``refine``) and report.html."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _stores import write_store

import pipeline
from measure.report.files import read_results_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 48
KEYS = ["measure", "store_a", "layer_a", "store_b", "layer_b"]
SKETCH = "cka_sketch(sketch_size=64)"  # small: far from exact, so that refined values differ


def _stores(root) -> list[str]:
    """Four stores of three layers sharing a low-rank signal under noise of different strength."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((N, 4))
    paths = []
    for m in range(4):
        layers = {f"l{k}": (z @ rng.standard_normal((4, 12)) * (k + 1)
                            + (m + k) * rng.standard_normal((N, 12))).astype(np.float32) for k in range(3)}
        paths.append(str(write_store(root / f"m{m}.zarr", f"m{m}", layers, chunk=16).path))
    return paths


def _measure(paths, out, *extra, report: bool = False) -> tuple[dict, dict]:
    flags = [] if report else ["--no-report"]
    code = pipeline.main(["measure", *paths, "--out", str(out), "--no-cache", "--quiet", "--device", "cpu",
                          "--plots", "none", "--pair-csvs", "none", *flags, *map(str, extra)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    header, rows = read_results_table(out / manifest["table"]["path"])
    assert header == manifest["table"]["columns"]
    keyed = {tuple(r[k] for k in KEYS[1:]): r for r in rows}
    assert len(keyed) == len(rows)
    return manifest, keyed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_cli")
    paths = _stores(root)
    refined = _measure(paths, root / "refined", "--measures", SKETCH, "--refine", 2, report=True)
    sketched = _measure(paths, root / "sketched", "--measures", SKETCH)
    exact = _measure(paths, root / "exact", "--measures", "cka")
    return root, refined, sketched, exact


def _pair(key: tuple) -> tuple:
    """A table key as an unordered pair (symmetric measures): the entry and its transpose are one pair."""
    a, la, b, lb = key
    return min((a, la, b, lb), (b, lb, a, la))


def test_the_table_marks_approximate_and_exactly_the_refined_entries(runs):
    _, (manifest, rows), (_, sketched), (_, exact) = runs
    assert manifest["table"]["columns"] == [*KEYS, "value", "mirrored", "approximate", "refined"]
    assert all(r["approximate"] is True and r["measure"] == "cka_sketch" for r in rows.values())
    marked = {k for k, r in rows.items() if r["refined"]}
    # the 2 most and the 2 least similar distinct pairs of the sketch (no layer with itself)
    candidates = {_pair(k): r["value"] for k, r in sketched.items() if not (k[0] == k[2] and k[1] == k[3])}
    ranked = sorted(candidates, key=candidates.get)
    assert {_pair(k) for k in marked} == {*ranked[:2], *ranked[-2:]}
    assert len(marked) == 2 * 4  # each pair in both orders: its computed row and its mirrored (or transposed) one
    assert any(rows[k]["mirrored"] for k in marked)
    for key, row in rows.items():
        if key in marked:
            # the exact cka value (computed per store pair rather than in the zoo's shared products: equal
            # up to the rounding of the products)
            assert row["value"] == pytest.approx(exact[key]["value"], rel=1e-12, abs=1e-15)
            assert abs(row["value"] - sketched[key]["value"]) > 1e-6
        else:
            assert row["value"] == sketched[key]["value"]


def test_the_manifest_lists_the_approximate_measure_and_the_refinement(runs):
    root, (manifest, _), (plain, _), (exact, _) = runs
    (entry,) = manifest["approximate"]
    assert entry["measure"] == "cka_sketch" and entry["options"]["sketch_size"] == 64
    assert entry["approximation"]["std"] == pytest.approx(64 ** -0.5) and entry["approximation"]["method"]
    assert entry["refined"] == 4  # layer pairs: the 2 most and the 2 least similar
    assert manifest["refine"]["k"] == 2 and manifest["refine"]["measures"][0]["pairs"] == 4
    assert manifest["refine"]["measures"][0]["exact_measure"] == "cka"
    assert "refine" not in plain and plain["approximate"][0]["refined"] == 0
    assert "approximate" not in exact and "refine" not in exact
    assert exact["table"]["columns"] == [*KEYS, "value", "mirrored"]  # exact measures: the table as before


def test_the_report_states_the_approximation_and_marks_refined_cells(runs):
    root = runs[0]
    page = (root / "refined" / "report.html").read_text()
    assert 'class="approximate"' in page and "cka_sketch is approximate" in page and "TensorSketch" in page
    assert "4 layer pair(s) were recomputed exactly" in page
    data = json.loads(page.split('id="zoo-data">', 1)[1].split("</script>", 1)[0])
    (m,) = data["measures"]
    entries = sum(len(r.get("extras", {}).get("refined", [])) for r in runs[1][0]["results"])
    assert sum(len(p[5]) for p in m["pairs"] if len(p) > 5) == entries > 0


def test_a_threshold_band_is_refined_too(tmp_path, runs):
    root, _, (_, sketched), _ = runs
    paths = sorted(str(p) for p in root.glob("m*.zarr"))
    values = sorted(r["value"] for k, r in sketched.items() if not (k[0] == k[2] and k[1] == k[3]))
    threshold = float(np.median(values))
    manifest, rows = _measure(paths, tmp_path / "out", "--measures", SKETCH, "--refine-threshold", threshold,
                              "--refine-margin", 0.05)
    near = {_pair(k) for k, r in sketched.items() if abs(r["value"] - threshold) <= 0.05
            and not (k[0] == k[2] and k[1] == k[3])}
    assert near and {_pair(k) for k, r in rows.items() if r["refined"]} == near
    assert manifest["refine"]["measures"][0]["margin"] == 0.05


@pytest.mark.parametrize(("extra", "message"), [
    (["--measures", SKETCH, "--refine", "-1"], "--refine: must be a non-negative integer"),
    (["--measures", SKETCH, "--refine", "two"], "--refine: must be a non-negative integer"),
    (["--measures", SKETCH, "--refine-threshold", "0.5", "--refine-margin", "-0.1"], "must be a non-negative"),
    (["--measures", "cka", "--refine", "2"], "exact already"),
    (["--measures", SKETCH, "--refine-margin", "0.1"], "give --refine-threshold"),
])
def test_bad_refinement_flags_exit_non_zero_with_a_clear_message(tmp_path, capsys, runs, extra, message):
    paths = sorted(str(p) for p in runs[0].glob("m*.zarr"))
    try:
        code = pipeline.main(["measure", *paths, "--out", str(tmp_path / "out"), "--no-cache", "--quiet",
                              "--device", "cpu", *extra])
    except SystemExit as exit_:
        code = exit_.code
    assert code not in (0, None)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
