"""`pipeline.py info` and `pipeline.py ls` on small demo-architecture stores built in the test."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import pipeline
from extract import ZarrStore, extract
from extract.demo import DEMO_LAYERS, cnn, digits
from extract.store.summary import comparability_groups, human_bytes, list_stores, summarize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two comparable stores, one of other data, one incomplete and one non-store Zarr group."""
    root = tmp_path_factory.mktemp("stores")
    x = digits("test")[0][:64]
    for seed in (0, 1):
        torch.manual_seed(seed)
        extract(cnn(), x, root / f"seed{seed}.zarr", name=f"seed{seed}", layers=DEMO_LAYERS,
                reduce="block1=gap", batch_size=16, progress=False)
    torch.manual_seed(2)
    extract(cnn(), x[:40], root / "fewer.zarr", name="fewer", layers=DEMO_LAYERS, batch_size=16, progress=False)
    shutil.copytree(root / "seed1.zarr", root / "partial.zarr")
    store = ZarrStore(root / "partial.zarr", read_only=False)
    info = store.info
    info.complete, info.samples_done, info.model_name = False, 32, "partial"
    store.write_info(info)
    import zarr

    zarr.open_group(str(root / "plain.zarr"), mode="w", zarr_format=3)
    zarr.open_group(str(root / ".simtorch-cache.zarr"), mode="w", zarr_format=3)  # hidden: not listed
    return root


def test_summary_sizes_shapes_and_ratio(folder):
    s = summarize(folder / "seed0.zarr")
    assert s.model_name == "seed0" and s.n_samples == 64 and s.complete
    assert [a.name for a in s.layers] == DEMO_LAYERS
    by_name = {a.name: a for a in s.layers}
    assert by_name["block1"].shape == (16,) and by_name["block1"].reduction == "gap"
    assert by_name["block2"].shape == (32, 4, 4) and by_name["block2"].reduction == "flatten"
    # sizes: raw = n × elements × 4 bytes; on disk = the bytes of the array's files
    assert by_name["block2"].raw_bytes == 64 * 32 * 16 * 4
    on_disk = sum(f.stat().st_size for f in (folder / "seed0.zarr" / "layers" / "block2").rglob("*") if f.is_file())
    assert by_name["block2"].stored_bytes == on_disk > 0
    assert by_name["block2"].ratio == pytest.approx(by_name["block2"].raw_bytes / on_disk)
    assert [a.name for a in s.extras] == ["inputs"]


def test_info_command_prints_everything(folder, capsys):
    assert pipeline.main(["info", str(folder / "seed0.zarr")]) == 0
    out = capsys.readouterr().out
    s = summarize(folder / "seed0.zarr")
    for needle in ("seed0", "extract.demo" if s.model_spec else "seed0", s.weights_digest, s.fingerprint,
                   "64  [complete]", "float32"):
        assert needle in out
    line = next(line for line in out.splitlines() if line.startswith("block2"))
    assert re.search(r"\(32, 4, 4\)\s+float32\s+flatten\s+[\d.]+ KiB\s+128\.0 KiB\s+[\d.]+x", line), line
    assert re.search(r"^block1\s+\(16,\)\s+float32\s+gap", out, re.M)
    assert pipeline.main(["info", "--json", str(folder / "partial.zarr")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["complete"] is False and data["samples_done"] == 32
    assert pipeline.main(["info", str(folder / "partial.zarr")]) == 0
    assert "INCOMPLETE: 32 of 64 samples" in capsys.readouterr().out


def test_info_errors_are_one_line(folder, capsys):
    assert pipeline.main(["info", str(folder / "missing.zarr")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: No store at") and err.count("\n") == 1
    assert pipeline.main(["info", str(folder / "plain.zarr")]) != 0
    assert "not a simtorch store" in capsys.readouterr().err


def test_ls_groups_stores_by_comparability(folder, capsys):
    summaries, skipped = list_stores(folder)
    groups, incomplete = comparability_groups(summaries)
    assert sorted(sorted(s.model_name for s in g) for g in groups) == [["fewer"], ["seed0", "seed1"]]
    assert [s.model_name for s in incomplete] == ["partial"]
    assert [os.path.basename(p) for p, _ in skipped] == ["plain.zarr"]
    assert pipeline.main(["ls", str(folder)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"group A: 2 store\(s\) comparable with each other \(64 samples", out)
    assert re.search(r"group B: 1 store\(s\) comparable with each other \(40 samples", out)
    assert re.search(r"incomplete.*\n\s+partial\s+partial.zarr\s+32/64 samples", out)
    assert "plain.zarr: " in out and "cannot be measured together" in out
    assert pipeline.main(["ls", "--json", str(folder)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(len(g) for g in data["groups"]) == [1, 2]


def test_ls_of_an_empty_or_missing_folder(tmp_path, capsys):
    assert pipeline.main(["ls", str(tmp_path)]) == 0
    assert "no stores in" in capsys.readouterr().out
    assert pipeline.main(["ls", str(tmp_path / "nope")]) != 0
    assert capsys.readouterr().err.startswith("error: ")


def test_human_bytes():
    assert [human_bytes(v) for v in (0, 1023, 1536, 3 * 2**20)] == ["0 B", "1023 B", "1.5 KiB", "3.0 MiB"]
    assert np.isnan(summarize.__globals__["ArraySummary"]("x", (1,), "f4", "", 0, 4).ratio)
