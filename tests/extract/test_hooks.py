"""SimilarityModel: layer selection, output selection, repeated calls, order, hook lifetime, modes."""

from __future__ import annotations

import pytest
import torch
from _extract_models import MixedOutputs, Reordered, SmallCNN, Twice, images, small_cnn
from torch import nn

from extract import LayerSelectionError, SimilarityModel, resolve_layers


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(128, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).flatten(1))


def test_selection_by_exact_name_glob_type_and_substring():
    model = Blocks()
    assert resolve_layers(model, ["block2"]) == ["block2"]
    assert resolve_layers(model, ["block?"]) == ["block1", "block2"]
    assert resolve_layers(model, ["block*.0"]) == ["block1.0", "block2.0"]  # '*' stays within one name part
    assert resolve_layers(model, ["**.1"]) == ["block1.1", "block2.1"]
    assert resolve_layers(model, ["block?"]) == ["block1", "block2"]
    with pytest.raises(LayerSelectionError, match="matches no module"):
        resolve_layers(model, ["block1?0"])  # '?' does not match the dot of 'block1.0'
    assert resolve_layers(model, [nn.Conv2d]) == ["block1.0", "block2.0"]
    assert resolve_layers(model, [nn.Linear, "block1"]) == ["block1", "head"]
    with pytest.warns(UserWarning, match="Not capturing 4 module"):  # simtorch 0.2.1 substring
        assert resolve_layers(model, ["lock"]) == ["block1", "block2"]


def test_unknown_name_lists_the_nearest_names():
    with pytest.raises(LayerSelectionError, match=r"blok1.*matches no module.*'block1'"):
        resolve_layers(Blocks(), ["blok1"])
    with pytest.raises(LayerSelectionError, match="module type LSTM matches no module"):
        resolve_layers(Blocks(), [nn.LSTM])
    with pytest.raises(LayerSelectionError, match="No layers to capture"):
        resolve_layers(Blocks(), [])
    with pytest.raises(LayerSelectionError, match="got 3 of type int"):
        resolve_layers(Blocks(), [3])


def test_container_and_child_not_captured_twice():
    with pytest.warns(UserWarning, match="container is also selected"):
        chosen = resolve_layers(Blocks(), ["block1", nn.Conv2d])
    assert chosen == ["block1", "block2.0"]  # block1.0 is inside block1
    # naming both exactly captures both, without a warning
    assert resolve_layers(Blocks(), ["block1", "block1.0"]) == ["block1", "block1.0"]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_after_the_context_manager_also_on_error():
    model = small_cnn()
    sim = SimilarityModel(model, layers_to_include=["conv1", "fc1"])
    with sim.hooked():
        assert _hook_count(model) == 2
        sim.forward(images(4))
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), sim.hooked():
        assert _hook_count(model) == 2
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError):  # a model failure inside __call__
        sim(torch.zeros(2, 3, 8, 8))
    assert _hook_count(model) == 0


def test_eval_mode_and_inference_mode():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)
            self.lin = nn.Linear(64, 4)

        def forward(self, x):
            seen["inference"] = torch.is_inference_mode_enabled()
            seen["training"] = self.training
            return self.lin(self.drop(x.flatten(1)))

    model = Probe().train()
    sim = SimilarityModel(model, layers_to_include=["drop", "lin"])
    x = images(6)
    out = sim(x)
    assert seen == {"inference": True, "training": False}
    assert torch.equal(out["drop"], x.flatten(1))  # dropout is off
    assert out["lin"].is_inference()


def test_captured_outputs_equal_direct_calls():
    torch.manual_seed(1)
    model = MixedOutputs()
    x = images(5)
    sim = SimilarityModel(model, layers_to_include=["conv", "tuple_block", "dict_block", "dataclass_block"])
    out = sim(x)
    with torch.no_grad():
        conv = model.conv(x)
        t = model.tuple_block(conv.flatten(1))
        d = model.dict_block(t[0])
        dc = model.dataclass_block(d["hidden"])
    assert torch.equal(out["conv"], conv)
    assert torch.equal(out["tuple_block"], t[0])  # first tensor of a tuple
    assert torch.equal(out["dict_block"], d["hidden"])  # first tensor value of a dict
    assert torch.equal(out["dataclass_block"], dc.last_hidden_state)  # first tensor field of a dataclass


def test_output_selector_by_index_key_and_field():
    torch.manual_seed(1)
    model = MixedOutputs()
    x = images(5)
    sim = SimilarityModel(model, layers_to_include=["tuple_block", "dict_block", "dataclass_block"],
                          output_selector={"tuple_block": 1, "dict_block": "scaled", "dataclass_block": "pooled"})
    out = sim(x)
    with torch.no_grad():
        t = model.tuple_block(model.conv(x).flatten(1))
        d = model.dict_block(t[0])
        dc = model.dataclass_block(d["hidden"])
    assert torch.equal(out["tuple_block"], t[1])
    assert torch.equal(out["dict_block"], d["scaled"])
    assert torch.equal(out["dataclass_block"], dc.pooled)
    bad = SimilarityModel(model, layers_to_include=["dict_block"], output_selector="missing")
    with pytest.raises(LayerSelectionError, match=r"returns keys \['note', 'hidden', 'scaled'\]"):
        bad(x)
    bad = SimilarityModel(model, layers_to_include=["tuple_block"], output_selector=5)
    with pytest.raises(LayerSelectionError, match="tuple of length 2"):
        bad(x)


def test_module_called_twice_is_captured_per_call_or_refused():
    torch.manual_seed(2)
    model = Twice()
    x = images(3)
    out = SimilarityModel(model, layers_to_include=["shared", "head"])(x)
    assert list(out) == ["shared", "shared#1", "head"]
    with torch.no_grad():
        first = model.shared(x.flatten(1))
        second = model.shared(torch.relu(first))
    assert torch.equal(out["shared"], first)
    assert torch.equal(out["shared#1"], second)
    strict = SimilarityModel(model, layers_to_include=["shared"], repeated_calls="error")
    with pytest.raises(LayerSelectionError, match="'shared' ran 2 times"):
        strict(x)


def test_layer_order_is_execution_order():
    model = Reordered()
    sim = SimilarityModel(model, layers_to_include=["first", "second", "third"])
    assert sim.layers == ["first", "second", "third"]  # registration order before any forward pass
    out = sim(images(2))
    assert list(out) == ["third", "first", "second"]
    assert sim.layers == ["third", "first", "second"]


def test_layer_that_never_runs_is_an_error():
    model = SmallCNN()
    model.unused = nn.Linear(2, 2)
    with pytest.raises(LayerSelectionError, match=r"\['unused'\].*never ran"):
        SimilarityModel(model, layers_to_include=["conv1", "unused"])(images(2))


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got function"):
        SimilarityModel(small_cnn, layers_to_include=["conv1"])
