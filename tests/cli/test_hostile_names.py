"""Hostile names through the real CLI: layer names Zarr cannot hold, and --name values that leave --out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from extract import ZarrStore

FORWARD_CALLS = [0]


class Named(nn.Module):
    """Linear layers registered under the given names (legal torch module names, as in converted checkpoints)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name in names:
            self.add_module(name, nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARD_CALLS[0] += 1
        for module in self.children():
            x = module(x)
        return x


def backslash() -> Named:
    """``--model test_hostile_names:backslash``."""
    return Named("a\\b", "c")


def slash() -> Named:
    return Named("enc/fc", "head")


def nested() -> Named:
    """A layer 'a' and a layer 'a/b': in a Zarr store, 'a' would be both an array and the folder of 'a/b'."""
    model = Named("a")
    model.add_module("a/b", nn.Linear(4, 4))
    return model


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


def tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def extract_args(model: str, data, out, name: str, *layers: str) -> list[str]:
    return ["extract", "--model", f"test_hostile_names:{model}", "--data", str(data), "--out", str(out),
            "--name", name, "--layers", *layers, "--quiet", "--device", "cpu"]


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------------------------------------- layer names
@pytest.mark.parametrize("force", [False, True])
def test_a_backslash_layer_is_refused_before_the_first_forward_pass(tmp_path, data, capsys, force):
    out = tmp_path / "out"
    before = tree(tmp_path)
    FORWARD_CALLS[0] = 0
    code = pipeline.main(extract_args("backslash", data, out, "m", "a\\b", "c", *(["--force"] if force else [])))
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, "layer 'a\\\\b' has a '\\' in its name, which a Zarr store cannot hold")
    assert FORWARD_CALLS[0] == 0
    assert tree(tmp_path) == before  # no store, no lock file: nothing that a rerun could not complete


def test_a_layer_that_would_be_the_folder_of_another_is_refused(tmp_path, data, capsys):
    out = tmp_path / "out"
    FORWARD_CALLS[0] = 0
    code = pipeline.main(extract_args("nested", data, out, "m", "a", "a/b"))
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, "layer 'a' would be the folder of layer 'a/b'")
    assert FORWARD_CALLS[0] == 0 and not out.exists()


def test_a_slash_layer_is_stored_under_its_real_name(tmp_path, data, capsys):
    out = tmp_path / "out"
    code = pipeline.main(extract_args("slash", data, out, "m", "enc/fc", "head"))
    assert code == 0, capsys.readouterr().err
    store = ZarrStore(out / "m.zarr")
    assert store.info.complete and store.layers == ["enc/fc", "head"]
    model = slash().eval()
    x = torch.from_numpy(np.load(data))
    with torch.no_grad():
        np.testing.assert_allclose(store.read_layer("enc/fc"), model.get_submodule("enc/fc")(x).numpy(), rtol=1e-6)
    capsys.readouterr()
    assert pipeline.main(["info", str(out / "m.zarr")]) == 0
    assert "enc/fc" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- --name
HOSTILE = {
    "parent folders": ("../../x", "choose a plain name"),
    "absolute path": (None, "choose a plain name"),  # filled in with a path under tmp_path
    "out and back": ("x/../../y", "choose a plain name"),
    "dot": (".", "starts with a dot"),
    "dot dot": ("..", "starts with a dot"),
    "hub-style": ("org/model", "for a hub-style name write 'org--model'"),
    "backslash": ("org\\model", "for a hub-style name write 'org--model'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_name_that_leaves_out_is_refused_before_anything_is_written(tmp_path, data, capsys, case):
    name, hint = HOSTILE[case]
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    if name is None:
        name = str(tmp_path / "abs")
    before = tree(tmp_path)
    FORWARD_CALLS[0] = 0
    code = pipeline.main(extract_args("slash", data, out, name, "head"))
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, f"--name {name!r}", hint)
    assert tree(tmp_path) == before and FORWARD_CALLS[0] == 0  # not a store, not a lock file, anywhere


def test_a_config_name_is_checked_too(tmp_path, data, capsys):
    config = tmp_path / "zoo.toml"
    config.write_text(f'data = "{data}"\nout = "{tmp_path / "out"}"\n[[models]]\nmodel = "test_hostile_names:slash"\n'
                      'name = "../escaped"\nlayers = ["head"]\n')
    before = tree(tmp_path)
    code = pipeline.main(["extract", "--config", str(config), "--quiet", "--device", "cpu"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--name '../escaped'")
    assert tree(tmp_path) == before
