"""`pipeline.py extract`: happy paths (flags, TOML, the demo) and every error path, one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_models import images, small_cnn

import pipeline
from extract import ZarrStore, extract

PIPELINE = Path(pipeline.__file__).resolve()


@pytest.fixture
def files(tmp_path):
    """An input array, a weights file, and the model spec that fits them."""
    x = images(30, seed=3).numpy()
    np.save(tmp_path / "x.npy", x)
    torch.save(small_cnn(seed=7).state_dict(), tmp_path / "w.pt")
    return {"x": tmp_path / "x.npy", "weights": tmp_path / "w.pt", "out": tmp_path / "out", "array": x}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = pipeline.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def assert_no_valid_store(path: Path) -> None:
    if path.exists():
        assert not ZarrStore(path).info.complete


def base_args(files, *extra: str) -> list[str]:
    return ["extract", "--model", "_extract_models:small_cnn", "--weights", str(files["weights"]), "--data",
            str(files["x"]), "--out", str(files["out"]), "--quiet", *extra]


def test_happy_path_with_flags_then_cache_hit(files, capsys):
    code, out, err = run(base_args(files, "--name", "cnn", "--layers", "conv*", "fc2", "--batch-size", "7"), capsys)
    assert code == 0, err
    assert "cnn.zarr: 30 samples x 3 layers" in out
    store = ZarrStore(files["out"] / "cnn.zarr")
    assert store.layers == ["conv1", "conv2", "fc2"] and store.info.complete
    model = small_cnn()
    model.load_state_dict(torch.load(files["weights"]))
    with torch.no_grad():
        expected = torch.cat([model.eval()(torch.from_numpy(files["array"][i : i + 7])) for i in range(0, 30, 7)])
    np.testing.assert_array_equal(store.read_layer("fc2"), expected.numpy())
    code, out, _ = run(base_args(files, "--name", "cnn", "--layers", "conv*", "fc2", "--batch-size", "7"), capsys)
    assert code == 0 and "already complete" in out
    code, out, _ = run(base_args(files, "--name", "cnn", "--layers", "conv*", "fc2", "--force"), capsys)
    assert code == 0 and "30 samples x 3 layers in" in out


def test_toml_config_with_several_models(files, tmp_path, capsys):
    config = tmp_path / "zoo.toml"
    config.write_text(f"""
data = "{files['x']}"
out = "{files['out']}"
batch_size = 8
dtype = "float16"

[[models]]
model = "_extract_models:small_cnn"
name = "plain"
layers = ["fc1"]

[[models]]
model = "_extract_models:small_cnn"
weights = "{files['weights']}"
name = "trained"
layers = ["conv1", "fc*"]
""")
    code, out, err = run(["extract", "--config", str(config), "--quiet"], capsys)
    assert code == 0, err
    plain, trained = ZarrStore(files["out"] / "plain.zarr"), ZarrStore(files["out"] / "trained.zarr")
    assert plain.layers == ["fc1"] and trained.layers == ["conv1", "fc1", "fc2"]
    assert plain.info.dtype == trained.info.dtype == "float16"
    assert plain.info.weights_digest != trained.info.weights_digest
    assert plain.info.fingerprint == trained.info.fingerprint  # same data: comparable stores


def test_help_shows_a_worked_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["extract", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "--model extract.demo:cnn --weights data/models/cnn_seed1.pt" in out
    assert "--config zoo.toml" in out


def test_unknown_layer(files, capsys):
    code, _, err = run(base_args(files, "--name", "u", "--layers", "fc3"), capsys)
    assert_one_line_error(code, err, "'fc3' matches no module", "'fc1'", "'fc2'")
    assert_no_valid_store(files["out"] / "u.zarr")


def test_model_that_fails_on_the_data_names_the_batch(files, capsys):
    args = ["extract", "--model", "_extract_models:failing", "--data", str(files["x"]), "--layers", "fc1",
            "--name", "f", "--batch-size", "4", "--out", str(files["out"]), "--quiet"]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, "failed on batch 2 (samples 8..11)", "synthetic failure")
    assert_no_valid_store(files["out"] / "f.zarr")


def test_data_of_the_wrong_shape(files, tmp_path, capsys):
    np.save(tmp_path / "rgb.npy", np.zeros((6, 3, 8, 8), np.float32))
    code, _, err = run(base_args(files, "--name", "s", "--layers", "fc1", "--data", str(tmp_path / "rgb.npy")),
                       capsys)
    assert_one_line_error(code, err, "batch 0", "(6, 3, 8, 8) float32", "shape and dtype the model expects")
    assert_no_valid_store(files["out"] / "s.zarr")


def test_data_of_the_wrong_type(files, tmp_path, capsys):
    torch.save({"images": torch.zeros(3)}, tmp_path / "d.pt")
    code, _, err = run(base_args(files, "--name", "t", "--layers", "fc1", "--data", str(tmp_path / "d.pt")), capsys)
    assert_one_line_error(code, err, "holds a dict; expected a tensor of shape (n_samples, ...)")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    code, _, err = run(base_args(files, "--name", "t", "--layers", "fc1", "--data", str(tmp_path / "s.npy")), capsys)
    assert_one_line_error(code, err, "Expected numeric data", "<U1")
    code, _, err = run(base_args(files, "--name", "t", "--layers", "fc1", "--data", "nowhere.npy"), capsys)
    assert_one_line_error(code, err, "nowhere.npy does not exist")
    assert_no_valid_store(files["out"] / "t.zarr")


def test_unwritable_output_folder(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # tests run as root, so permissions would not stop mkdir
    code, _, err = run(base_args(files, "--name", "o", "--layers", "fc1", "--out", str(blocker / "sub")), capsys)
    assert_one_line_error(code, err, f"Cannot write into the output folder {blocker / 'sub'}", "--out")
    assert not (blocker.parent / "sub").exists()


def test_existing_store_from_another_model_or_dataset(files, tmp_path, capsys):
    code, _, err = run(base_args(files, "--name", "m", "--layers", "fc1"), capsys)
    assert code == 0, err
    other_model = ["extract", "--model", "_extract_models:other_cnn", "--data", str(files["x"]), "--layers", "fc1",
                   "--name", "m", "--out", str(files["out"]), "--quiet"]
    code, _, err = run(other_model, capsys)
    assert_one_line_error(code, err, "different model_spec, weights_digest", "--force")
    np.save(tmp_path / "y.npy", images(30, seed=99).numpy())
    code, _, err = run(base_args(files, "--name", "m", "--layers", "fc1", "--data", str(tmp_path / "y.npy")), capsys)
    assert_one_line_error(code, err, "extracted from different data", "--force")
    assert ZarrStore(files["out"] / "m.zarr").info.complete  # the original store is untouched


def test_flags_without_a_model(files, capsys):
    code, _, err = run(["extract", "--data", str(files["x"]), "--quiet"], capsys)
    assert_one_line_error(code, err, "need --model")


def test_real_subprocess(files, subprocess_env):
    args = [sys.executable, str(PIPELINE), *base_args(files, "--name", "sub", "--layers", "fc1")]
    done = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sub.zarr: 30 samples x 1 layers" in done.stdout
    assert ZarrStore(files["out"] / "sub.zarr").info.complete
    bad = [sys.executable, str(PIPELINE), *base_args(files, "--name", "bad", "--layers", "nope")]
    done = subprocess.run(bad, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert_one_line_error(done.returncode, done.stderr, "'nope' matches no module")


@pytest.mark.slow
def test_demo_zoo_trains_and_extracts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["extract", "--quiet"], capsys)
    assert code == 0, err
    import json

    from extract.demo import DEMO_LAYERS, ZOO

    for member in ZOO:
        meta = json.loads((tmp_path / "data" / "models" / f"{member.name}.json").read_text())
        if member.trained:
            assert meta["accuracy"] >= 0.9, (member.name, meta["accuracy"])
        store = ZarrStore(tmp_path / "data" / "activations" / f"{member.name}.zarr")
        assert store.info.complete and store.layers == DEMO_LAYERS and store.n_samples == 540
    assert len(ZOO) >= 5 and sum(m.name.startswith("cnn_seed") for m in ZOO) >= 3
    code, out, _ = run(["extract", "--quiet"], capsys)  # cached models, cached stores
    assert code == 0 and out.count("cached ") == len(ZOO) and out.count("already complete") == len(ZOO)


def test_flags_and_toml_give_one_plan(files, tmp_path):
    import inspect

    from extract.cli import extract_command_parser, plan_extract
    from extract.dask_jobs import extract_job

    flags = extract_command_parser().parse_args(base_args(files, "--name", "cnn", "--layers", "conv*", "fc2",
                                                          "--batch-size", "7", "--dtype", "float16")[1:])
    config = tmp_path / "one.toml"
    config.write_text(f'data = "{files["x"]}"\nout = "{files["out"]}"\nbatch_size = 7\ndtype = "float16"\n'
                      f'[[models]]\nmodel = "_extract_models:small_cnn"\nweights = "{files["weights"]}"\n'
                      'name = "cnn"\nlayers = ["conv*", "fc2"]\n')
    toml = extract_command_parser().parse_args(["--config", str(config), "--quiet"])
    plan = plan_extract(flags)
    assert plan == plan_extract(toml)
    [job] = plan.model_jobs("DATA", "cpu")
    assert job.path == files["out"] / "cnn.zarr" and job.data == "DATA"
    assert job.options.model_spec == f"_extract_models:small_cnn|weights={files['weights']}"
    assert (job.options.batch_size, job.options.dtype, job.options.device) == (7, "float16", "cpu")
    assert not job.options.progress and job.options.store_inputs and job.options.layers == ["conv*", "fc2"]
    extract_options = set(inspect.signature(extract).parameters) - {"model", "data", "path", "options", "progress"}
    assert set(job.task()) == {"model", "data", "path", "weights", "max_length"} | extract_options
    assert set(inspect.signature(extract_job).parameters) >= {"model", "data", "path", "weights", "max_length"}
