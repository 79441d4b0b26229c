"""The tidy results table of a ``measure`` run (``results.csv``), the ``--plots`` / ``--pair-csvs`` rule
for per-pair files, and ``pipeline.py --help``."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from _stores import write_store

import pipeline
from measure.cli import AUTO_MAX_STORES
from measure.report import read_matrix_csv
from measure.report.files import read_results_table

N = 24
KEYS = ["measure", "store_a", "layer_a", "store_b", "layer_b"]


def _stores(root, n: int, *, layers: int = 2) -> list[str]:
    """``n`` stores m0, m1 ...; m1 has one layer fewer, so that matrices are not all square."""
    paths = []
    for k in range(n):
        rng = np.random.default_rng(k)
        count = layers - 1 if k == 1 and layers > 1 else layers
        arrays = {f"l{i}": rng.normal(size=(N, 4 + i)).astype(np.float32) for i in range(count)}
        paths.append(str(write_store(root / f"m{k}.zarr", f"m{k}", arrays, chunk=8).path))
    return paths


def _measure(paths, out, *extra) -> dict:
    code = pipeline.main(["measure", *paths, "--out", str(out), "--no-cache", "--no-report", "--quiet",
                          "--device", "cpu", *map(str, extra)])
    assert code == 0
    return json.loads((out / "manifest.json").read_text())


def _table(out, manifest) -> tuple[list[str], dict[tuple, dict]]:
    header, rows = read_results_table(out / manifest["table"]["path"])
    keyed = {tuple(r[k] for k in KEYS): r for r in rows}
    assert len(keyed) == len(rows) == manifest["table"]["rows"]  # one row per key
    assert header == manifest["table"]["columns"]
    return header, keyed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three stores, a symmetric and an asymmetric measure, per-pair CSVs and significance."""
    root = tmp_path_factory.mktemp("table")
    out = root / "res"
    manifest = _measure(_stores(root, 3), out, "--measures", "cka", "linreg", "--plots", "none",
                        "--pair-csvs", "all", "--permutations", "9", "--bootstrap", "9")
    return out, manifest


def test_manifest_points_to_the_table(run):
    out, manifest = run
    table = manifest["table"]
    assert table["path"] == "results.csv" and table["format"] == "csv" and (out / table["path"]).is_file()
    assert table["columns"] == [*KEYS, "value", "pvalue", "pvalue_fwer", "ci_low", "ci_high", "mirrored"]


def test_table_rows_and_values_equal_the_matrices(run):
    out, manifest = run
    _, rows = _table(out, manifest)
    computed = mirrored = 0
    for entry in manifest["results"]:
        names, cols, matrix = read_matrix_csv(out / entry["csv"])
        stats = {k: read_matrix_csv(out / path)[2] for k, path in entry["statistics"].items()}
        assert set(stats) == {"pvalues", "pvalues_fwer", "ci_low", "ci_high"}
        mirror = entry["symmetric"] and entry["store_a"] != entry["store_b"]
        for i, a in enumerate(names):
            for j, b in enumerate(cols):
                row = rows[(entry["measure"], entry["store_a"], a, entry["store_b"], b)]
                assert row["value"] == matrix[i, j] and row["mirrored"] is False  # exactly: 17 digits both
                assert row["pvalue"] == stats["pvalues"][i, j] and row["pvalue_fwer"] == stats["pvalues_fwer"][i, j]
                assert row["ci_low"] == stats["ci_low"][i, j] and row["ci_high"] == stats["ci_high"][i, j]
                if mirror:  # the other order of a symmetric measure: the transposed entry
                    back = rows[(entry["measure"], entry["store_b"], b, entry["store_a"], a)]
                    assert back["mirrored"] is True and back["value"] == matrix[i, j]
                    assert back["pvalue"] == row["pvalue"] and back["ci_high"] == row["ci_high"]
        computed += matrix.size
        mirrored += matrix.size if mirror else 0
    assert len(rows) == computed + mirrored
    assert sum(r["mirrored"] for r in rows.values()) == mirrored
    layers = {"m0": 2, "m1": 1, "m2": 2}  # every ordered pair of stores has all its rows, for both measures
    assert len(rows) == 2 * sum(layers[a] * layers[b] for a in layers for b in layers)


def test_pandas_reads_the_table_in_one_line(run):
    pd = pytest.importorskip("pandas")
    out, manifest = run
    frame = pd.read_csv(out / manifest["table"]["path"])
    assert list(frame.columns) == manifest["table"]["columns"] and len(frame) == manifest["table"]["rows"]
    assert frame["mirrored"].dtype == bool and frame["value"].dtype == np.float64
    entry = next(e for e in manifest["results"] if e["measure"] == "linreg" and e["store_a"] != e["store_b"])
    names, cols, matrix = read_matrix_csv(out / entry["csv"])
    own = frame[(frame.measure == "linreg") & (frame.store_a == entry["store_a"]) & (frame.store_b == entry["store_b"])]
    assert not own["mirrored"].any()
    assert np.array_equal(own.pivot(index="layer_a", columns="layer_b", values="value").loc[names, cols].to_numpy(),
                          matrix)


def test_without_significance_the_table_has_no_statistic_columns(tmp_path):
    out = tmp_path / "res"
    manifest = _measure(_stores(tmp_path, 2), out, "--measures", "cka", "--no-plots")
    assert manifest["table"]["columns"] == [*KEYS, "value", "mirrored"]
    assert manifest["table"]["rows"] == (2 + 1) ** 2  # m0 (2 layers) and m1 (1 layer), both orders


def test_a_large_table_is_gzip_compressed(tmp_path, monkeypatch):
    import measure.report.files as files

    out = tmp_path / "res"
    paths = _stores(tmp_path, 2)
    (out).mkdir()
    (out / "results.csv").write_text("an earlier run's table")
    monkeypatch.setattr(files, "TABLE_GZIP_ROWS", 4)
    manifest = _measure(paths, out, "--measures", "cka", "--no-plots", "--pair-csvs", "all")
    assert manifest["table"]["path"] == "results.csv.gz" and manifest["table"]["format"] == "csv.gz"
    assert not (out / "results.csv").exists()
    with gzip.open(out / "results.csv.gz", "rt") as f:
        assert f.readline().strip() == ",".join(manifest["table"]["columns"])
    _, rows = _table(out, manifest)
    for entry in manifest["results"]:
        names, cols, matrix = read_matrix_csv(out / entry["csv"])
        got = [[rows[("cka", entry["store_a"], a, entry["store_b"], b)]["value"] for b in cols] for a in names]
        assert np.array_equal(np.array(got), matrix)


# ---------------------------------------------------------------------------------------------- per-pair files
def _files(out) -> tuple[int, int]:
    return len(list(out.rglob("*.png"))), len([p for p in out.rglob("*.csv") if p.name != "results.csv"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One store more than ``AUTO_MAX_STORES``: a zoo."""
    root = tmp_path_factory.mktemp("zoo")
    return root, _stores(root, AUTO_MAX_STORES + 1, layers=1)


@pytest.mark.parametrize(("flags", "pngs", "csvs"), [
    ([], 0, 0),                                     # auto: a zoo gets the table (and report.html) only
    (["--plots", "auto"], 0, 0),
    (["--plots", "all"], 28, 0),                    # 7 stores: 7 * 8 / 2 unordered pairs
    (["--pair-csvs", "all"], 0, 28),
    (["--plots", "all", "--pair-csvs", "all"], 28, 28),
    (["--plots", "none", "--pair-csvs", "none"], 0, 0),
])
def test_per_pair_files_of_a_zoo(zoo, flags, pngs, csvs):
    root, paths = zoo
    out = root / ("res" + "".join(flags).replace("-", "_"))
    manifest = _measure(paths, out, "--measures", "cka", *flags)
    assert _files(out) == (pngs, csvs)
    assert sum("png" in e for e in manifest["results"]) == pngs and sum("csv" in e for e in manifest["results"]) == csvs
    assert manifest["table"]["rows"] == (AUTO_MAX_STORES + 1) ** 2  # the table holds every pair in any case


@pytest.mark.parametrize(("flags", "pngs", "csvs"), [
    ([], 3, 3),                                     # auto: up to AUTO_MAX_STORES stores, every pair
    (["--plots", "all"], 3, 3),
    (["--plots", "none"], 0, 3),
    (["--no-plots"], 0, 3),                         # the alias of --plots none
    (["--pair-csvs", "none"], 3, 0),
])
def test_per_pair_files_of_a_few_stores(tmp_path, flags, pngs, csvs):
    out = tmp_path / "res"
    manifest = _measure(_stores(tmp_path, 2), out, "--measures", "cka", *flags)
    assert _files(out) == (pngs, csvs)
    for entry in manifest["results"]:  # the manifest names exactly the files written
        for key in ("png", "csv"):
            assert key not in entry or (out / entry[key]).is_file()


def test_auto_limit_is_the_reports_detail_limit():
    from measure.report.page import DETAIL_MAX_STORES

    assert AUTO_MAX_STORES == DETAIL_MAX_STORES


def test_plots_flags_parse():
    parser = pipeline.build_parser()
    assert parser.parse_args(["measure"]).plots == "auto" and parser.parse_args(["measure"]).pair_csvs == "auto"
    assert parser.parse_args(["measure", "--no-plots"]).plots == "none"
    assert parser.parse_args(["measure", "--plots", "all"]).plots == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["measure", "--plots", "some"])


# ---------------------------------------------------------------------------------------------- --help
def test_top_level_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit) as done:
        pipeline.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "_command_parser" not in text
    lines = text.splitlines()
    for command in ("extract", "measure", "info", "ls"):  # one line each
        assert sum(line.startswith(f"  {command} ") for line in lines) == 1, text
    assert "python pipeline.py extract && python pipeline.py measure" in text
    assert "docs/cli.md" in text


def test_no_command_prints_the_help_and_fails(capsys):
    assert pipeline.main([]) == 1
    assert "docs/cli.md" in capsys.readouterr().out
