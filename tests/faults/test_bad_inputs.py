"""Bad input across CLI flags, config files, model and data specs, stores and numbers.

Each case runs the real CLI (``pipeline.main``) and checks: a non-zero exit, a
one-line ``error:`` message naming the problem (and, where there is one, the
fix), no traceback, and that no store or result was corrupted or left looking
valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import pipeline
from extract import extract
from extract.store import ZarrStore

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from _reliability_worker import LAYERS, data, model  # noqa: E402

MODEL = "_reliability_worker:model"
DATA = "_reliability_worker:data"


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


class Constant(torch.nn.Module):
    """fc2 output is the same for every sample (a zero-variance layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(144, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(0 * self.fc1(x.flatten(1)))


class MakesNaN(torch.nn.Module):
    """A linear layer; fed inputs with NaN in samples 10..19, its output has NaN there too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(144, 8)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        return h


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    x = data()
    made = {}
    made["a"] = extract(model(), x, root / "a.zarr", name="a", layers=LAYERS, progress=False).path
    torch.manual_seed(9)
    made["b"] = extract(type(model())(), x, root / "b.zarr", name="b", layers=LAYERS, progress=False).path
    made["same_name"] = extract(model(), x, root / "dup" / "a.zarr", name="a", layers=LAYERS, progress=False).path
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    made["reordered"] = extract(model(), x[perm], root / "reordered.zarr", name="reordered", layers=LAYERS,
                                progress=False).path
    made["fewer"] = extract(model(), x[:200], root / "fewer.zarr", name="fewer", layers=LAYERS,
                            progress=False).path
    made["tiny"] = extract(model(), x[:3], root / "tiny.zarr", name="tiny", layers=LAYERS, progress=False).path
    torch.manual_seed(0)
    made["constant"] = extract(Constant(), x, root / "constant.zarr", name="constant", layers=["fc1", "fc2"],
                               progress=False).path
    nan_x = x.clone()
    nan_x[10:20] = float("nan")
    torch.manual_seed(0)
    made["nan"] = extract(MakesNaN(), nan_x, root / "nan.zarr", name="nan", layers=["fc1"], progress=False).path
    incomplete = root / "incomplete.zarr"
    shutil.copytree(made["a"], incomplete)
    store = ZarrStore(incomplete, read_only=False)
    info = store.info
    info.complete, info.samples_done = False, info.chunk_samples
    store.write_info(info)
    made["incomplete"] = incomplete
    foreign = root / "foreign.zarr"
    group = zarr.open_group(foreign, mode="w")
    group.create_array("activations", shape=(480, 4), dtype="float32")[:] = 1.0
    made["foreign"] = foreign
    np.save(root / "wrong_shape.npy", np.zeros((480, 5), dtype=np.float32))
    np.save(root / "empty.npy", np.zeros((0, 1, 12, 12), dtype=np.float32))
    torch.save({"conv1.weight": torch.zeros(1)}, root / "bad_weights.pt")
    (root / "bad.toml").write_text("data = [unclosed\n")
    (root / "unknown_key.toml").write_text('data = "digits"\ncolour = "blue"\n')
    (root / "no_model.toml").write_text('data = "digits"\n[[models]]\nname = "x"\n')
    (root / "a_file").write_text("not a folder")
    made["root"] = root
    return made


def _cases(s: dict[str, Path]) -> list[tuple[str, list[str], list[str]]]:
    """(case id, argv, words the message must contain)."""
    r = s["root"]
    ext = ["extract", "--name", "x", "--out", str(r / "out"), "--quiet"]
    good = ["--model", MODEL, "--data", DATA, "--layers", *LAYERS]
    return [
        ("model module missing", ext + ["--model", "no_such_module:make", "--data", DATA, "--layers", "fc1"],
         ["no_such_module"]),
        ("model spec not a spec", ext + ["--model", "resnet", "--data", DATA, "--layers", "fc1"], ["resnet"]),
        ("model factory returns data", ext + ["--model", DATA, "--data", DATA, "--layers", "fc1"], ["nn.Module"]),
        ("weights missing", ext + good + ["--weights", str(r / "nope.pt")], ["nope.pt"]),
        ("weights do not fit", ext + good + ["--weights", str(r / "bad_weights.pt")], ["bad_weights.pt"]),
        ("data file missing", ext + ["--model", MODEL, "--data", str(r / "nope.npy"), "--layers", "fc1"],
         ["nope.npy"]),
        ("data of the wrong shape", ext + ["--model", MODEL, "--data", str(r / "wrong_shape.npy"), "--layers",
                                           "fc1"], ["batch 0"]),
        ("empty dataset", ext + ["--model", MODEL, "--data", str(r / "empty.npy"), "--layers", "fc1"],
         ["n_samples > 0"]),
        ("unknown layer", ext + ["--model", MODEL, "--data", DATA, "--layers", "fc3"], ["fc3", "fc1"]),
        ("batch size zero", ext + good + ["--batch-size", "0"], ["batch"]),
        ("config missing", ["extract", "--config", str(r / "nope.toml")], ["nope.toml"]),
        ("config not TOML", ["extract", "--config", str(r / "bad.toml")], ["bad.toml"]),
        ("config unknown key", ["extract", "--config", str(r / "unknown_key.toml")], ["colour"]),
        ("config model without spec", ["extract", "--config", str(r / "no_model.toml")], ["model"]),
        ("model without data", ["extract", "--model", MODEL, "--layers", "fc1", "--out", str(r / "o2")],
         ["--data"]),
        ("out is a file", ["extract", *good, "--name", "x", "--out", str(r / "a_file"), "--quiet"], ["a_file"]),
        ("different model at target", ["extract", "--model", "_extract_models:small_cnn", "--data", DATA,
                                       "--layers", "fc1", "--name", "a", "--out", str(s["a"].parent), "--quiet"],
         ["--force"]),
        ("measure path missing", ["measure", str(r / "nope.zarr"), "--quiet"], ["nope.zarr"]),
        ("unknown measure", ["measure", str(s["a"]), "--measures", "cosine", "--quiet"], ["cosine", "cka"]),
        ("bad option value", ["measure", str(s["a"]), "--measures", "cka_rbf(threshold=-1)", "--quiet",
                              "--out", str(r / "res")], ["threshold"]),
        ("unknown option", ["measure", str(s["a"]), "--measures", "cka_rbf(bandwidth=2)", "--quiet"],
         ["bandwidth", "threshold"]),
        ("required option missing", ["measure", str(s["a"]), "--measures", "cka_minibatch", "--quiet"],
         ["batch_size"]),
        ("incomplete store", ["measure", str(s["incomplete"]), "--quiet", "--out", str(r / "res")],
         ["incomplete", "rerun"]),
        ("stores of different data", ["measure", str(s["a"]), str(s["fewer"]), "--quiet", "--out", str(r / "res")],
         ["same data"]),
        ("reordered samples", ["measure", str(s["a"]), str(s["reordered"]), "--quiet", "--out", str(r / "res")],
         ["same data"]),
        ("store from another tool", ["measure", str(s["foreign"]), "--quiet"], ["not a simtorch store"]),
        ("NaN activations", ["measure", str(s["nan"]), "--quiet", "--measures", "cka", "--out", str(r / "res")],
         ["NaN", "fc1", "sample 10"]),
        ("constant layer", ["measure", str(s["constant"]), "--quiet", "--measures", "cka", "--out",
                            str(r / "res")], ["fc2", "constant"]),
        ("n < 4 for debiased", ["measure", str(s["tiny"]), "--quiet", "--measures", "cka_debiased",
                                "--out", str(r / "res")], ["4 samples"]),
        ("duplicate model names", ["measure", str(s["a"]), str(s["same_name"]), "--quiet", "--out",
                                   str(r / "res")], ["--name"]),
        ("layers match nothing", ["measure", str(s["a"]), "--layers", "block*", "--quiet", "--out",
                                  str(r / "res")], ["block*"]),
        ("negative memory budget", ["measure", str(s["a"]), "--memory-budget", "-1", "--quiet", "--out",
                                    str(r / "res")], ["memory"]),
        ("no stores in folder", ["measure", str(r / "dup" / "none"), "--quiet"], ["none"]),
    ]


CASE_IDS = [c[0] for c in _cases({k: Path("/x") for k in ("root", "a", "b", "same_name", "reordered", "fewer",
                                                          "tiny", "constant", "nan", "incomplete", "foreign")})]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_refused_clearly(case, stores, capsys):
    _, argv, words = next(c for c in _cases(stores) if c[0] == case)
    before = {k: _tree_digest(p) for k, p in stores.items() if k != "root" and p.is_dir()}
    try:
        code = pipeline.main(argv)
    except SystemExit as exc:  # argparse rejects a flag value: usage line + "error: ..." and exit 2
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0, f"{case}: exit code 0; stderr: {err}"
    assert "Traceback" not in err
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert "error:" in last, err
    for word in words:
        assert word in last, f"{case}: {word!r} not in {last!r}"
    after = {k: _tree_digest(p) for k, p in stores.items() if k != "root" and p.is_dir()}
    assert before == after, f"{case} changed a store"
    out = stores["root"] / "out" / "x.zarr"
    if out.exists():
        with pytest.raises(Exception, match="incomplete"):
            ZarrStore(out).require_complete()


def test_enough_distinct_cases():
    assert len(set(CASE_IDS)) >= 25


def test_unreadable_chunk(stores, tmp_path):
    """A chunk the user may not read: a clear error naming the store and layer, not a traceback.

    Tests run as root, which ignores file permissions; ``setpriv`` drops the
    capabilities that let root read any file, so the permission check is real.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    path = tmp_path / "a.zarr"
    shutil.copytree(stores["a"], path)
    chunk = sorted((path / "layers" / "conv1" / "c").rglob("*"))[-1]
    chunk.chmod(0o000)
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*drop, sys.executable, str(Path(pipeline.__file__)), "measure", str(path), "--quiet",
         "--measures", "cka", "--out", str(tmp_path / "res"), "--no-cache"],
        capture_output=True, text=True, timeout=300,
    )
    chunk.chmod(0o644)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "error:" in done.stderr and "conv1" in done.stderr, done.stderr
