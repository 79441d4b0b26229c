"""Store names that differ only in case (``Net`` and ``net``) get result files whose names differ in more
than case, so that no result overwrites another on a case-insensitive file system (macOS, Windows)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from _stores import write_store

import pipeline
from measure.report import read_matrix_csv
from measure.report.files import check_file_names, file_names

N = 24


def _layers(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(N, 5)).astype(np.float32), "b": rng.normal(size=(N, 3)).astype(np.float32)}


def test_names_differing_only_in_case_get_distinct_stable_parts():
    names = ["Net", "net", "NET", "other"]
    parts = file_names(names)
    assert len({parts[n].casefold() for n in names}) == len(names), parts
    assert parts["other"] == "other"  # no clash: the plain name
    for name in ("Net", "net", "NET"):  # all three already safe: each carries a digest of its raw name
        assert parts[name].startswith(f"{name}-") and len(parts[name]) == len(name) + 9, parts
    assert file_names(list(reversed(names))) == parts  # the same names always give the same files
    assert check_file_names(names) == parts


def test_case_clash_after_sanitising_keeps_the_safe_name_plain():
    parts = file_names(["m_a", "M a"])  # 'M a' sanitises to 'M_a', which clashes with 'm_a' only in case
    assert parts["m_a"] == "m_a"
    assert parts["M a"].startswith("M_a-") and parts["M a"].casefold() != "m_a"


def test_names_sanitising_alike_get_the_digest_of_their_raw_name():
    names = ["m a", "m/a", "m_a"]  # all three sanitise to 'm_a'
    parts = file_names(names)
    assert parts["m_a"] == "m_a"  # the one already-safe name stays plain
    for name in ("m a", "m/a"):  # the digest is of the raw name, so that two clashing names still differ
        assert parts[name] == f"m_a-{hashlib.sha256(name.encode()).hexdigest()[:8]}", parts
    assert len(set(parts.values())) == len(names)


def test_measure_writes_one_file_per_pair_for_names_differing_in_case(tmp_path, capsys):
    paths = [write_store(tmp_path / f"s{i}.zarr", name, _layers(i), chunk=8).path
             for i, name in enumerate(["Net", "net"])]
    out = tmp_path / "res"
    code = pipeline.main(["measure", *map(str, paths), "--measures", "cka", "--out", str(out), "--no-cache",
                          "--no-report"])
    err = capsys.readouterr().err
    assert code == 0, err
    entries = json.loads((out / "manifest.json").read_text())["results"]
    assert {(e["store_a"], e["store_b"]) for e in entries} == {("Net", "Net"), ("Net", "net"), ("net", "net")}
    for key in ("csv", "png"):  # distinct even where the file system ignores case
        assert len({e[key].casefold() for e in entries}) == len(entries), [e[key] for e in entries]
    assert len(list((out / "cka").glob("*.csv"))) == len(entries)
    for entry in entries:  # each file holds its own pair
        with open(out / entry["csv"]) as f:
            assert f.readline().split(",")[0] == f"{entry['store_a']} \\ {entry['store_b']}"
        rows, cols, matrix = read_matrix_csv(out / entry["csv"])
        assert rows == entry["rows"] and matrix.shape == (2, 2)
