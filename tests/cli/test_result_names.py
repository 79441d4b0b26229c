"""`pipeline.py measure` through the real CLI with hostile store names, layer patterns that match nothing,
and the statistics line of a run with dCKA."""

from __future__ import annotations

import json

import numpy as np
from _stores import write_store

import pipeline
from measure.report import read_matrix_csv

N = 24


def _layers(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(N, 5)).astype(np.float32), "b": rng.normal(size=(N, 3)).astype(np.float32)}


def _inputs() -> np.ndarray:
    return np.random.default_rng(99).normal(size=(N, 4)).astype(np.float32)


def _run(capsys, *argv):
    code = pipeline.main(["measure", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_store_names_that_sanitise_alike_get_their_own_files(tmp_path, capsys):
    names = ["m a", "m_a", "m/a", "other"]
    paths = [write_store(tmp_path / f"s{i}.zarr", name, _layers(i), chunk=8).path for i, name in enumerate(names)]
    out = tmp_path / "res"
    code, _, err = _run(capsys, *paths, "--measures", "cka", "--out", out, "--no-cache")
    assert code == 0, err
    entries = json.loads((out / "manifest.json").read_text())["results"]
    assert len(entries) == 10  # 4 stores, symmetric: 4 + 6 pairs
    csvs = [e["csv"] for e in entries]
    pngs = [e["png"] for e in entries]
    assert len(set(csvs)) == len(csvs) and len(set(pngs)) == len(pngs)  # no result overwrote another
    assert len(list((out / "cka").glob("*.csv"))) == 10 and len(list((out / "cka").glob("*.png"))) == 10
    for entry in entries:  # each file holds its own pair: the header names the two stores
        with open(out / entry["csv"]) as f:
            assert f.readline().split(",")[0] == f"{entry['store_a']} \\ {entry['store_b']}"
        rows, cols, matrix = read_matrix_csv(out / entry["csv"])
        assert rows == entry["rows"] and cols == entry["cols"] and matrix.shape == (2, 2)
    # stable: the already-safe name keeps its plain file name, the others carry a digest of their raw name
    by_pair = {(e["store_a"], e["store_b"]): e["csv"] for e in entries}
    assert by_pair[("m_a", "m_a")] == "cka/m_a__m_a.csv"
    assert by_pair[("m a", "m a")].startswith("cka/m_a-") and by_pair[("m/a", "m/a")].startswith("cka/m_a-")
    code, _, err = _run(capsys, *paths, "--measures", "cka", "--out", tmp_path / "again", "--no-cache")
    assert code == 0, err
    again = {(e["store_a"], e["store_b"]): e["csv"] for e in json.loads((tmp_path / "again" / "manifest.json")
                                                                        .read_text())["results"]}
    assert again == by_pair


def test_names_whose_pair_files_would_coincide_are_refused_before_computing(tmp_path, capsys):
    paths = [write_store(tmp_path / f"s{i}.zarr", name, _layers(i), chunk=8).path
             for i, name in enumerate(["a__b", "c", "a", "b__c"])]
    code, _, err = _run(capsys, *paths, "--measures", "cka", "--out", tmp_path / "res", "--no-cache")
    line = _one_line_error(code, err)
    assert "'a__b' × 'c'" in line and "'a' × 'b__c'" in line and "--name" in line
    assert not (tmp_path / "res").exists()


def test_layer_pattern_matching_nothing_is_an_error(tmp_path, capsys):
    a = write_store(tmp_path / "a.zarr", "A", _layers(0), chunk=8).path
    b = write_store(tmp_path / "b.zarr", "B", {"c": _layers(1)["a"]}, chunk=8).path
    code, _, err = _run(capsys, a, b, "--layers", "a", "c", "blokc*", "--measures", "cka", "--out", tmp_path / "res",
                        "--no-cache")
    line = _one_line_error(code, err)
    assert "'blokc*'" in line and "match no layer" in line and "the layers are: a, b, c" in line
    assert "'a'" not in line.split("the layers")[0]  # only the pattern that matches nothing is named
    assert not (tmp_path / "res").exists()
    # a pattern that matches layers of only some stores (a zoo of several architectures) is fine
    code, _, err = _run(capsys, a, b, "--layers", "a", "c", "--measures", "cka", "--out", tmp_path / "ok",
                        "--no-cache")
    assert code == 0, err
    entry = next(e for e in json.loads((tmp_path / "ok" / "manifest.json").read_text())["results"]
                 if e["store_a"] == "A" and e["store_b"] == "B")
    assert entry["rows"] == ["a"] and entry["cols"] == ["c"]


def test_statistics_line_counts_layers_and_names_the_inputs_apart(tmp_path, capsys):
    paths = [write_store(tmp_path / f"s{i}.zarr", f"m{i}", _layers(i), _inputs(), chunk=8).path for i in (0, 1)]
    cache = tmp_path / "cache.zarr"
    argv = [*paths, "--measures", "dcka", "--out", tmp_path / "res", "--cache", cache, "--no-plots", "--no-report"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("statistics:")]
    assert lines == [f"statistics: 4 computed, 0 reused from {cache} (+ inputs: 1 computed, 0 reused)"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("statistics:")]
    assert lines == [f"statistics: 0 computed, 4 reused from {cache} (+ inputs: 0 computed, 1 reused)"]
    code, out, err = _run(capsys, *argv[:2], "--measures", "cka_rbf", *argv[4:])
    lines = [ln for ln in out.splitlines() if ln.startswith("statistics:")]
    assert code == 0 and lines == [f"statistics: 0 computed, 4 reused from {cache}"]  # no inputs used: no suffix
