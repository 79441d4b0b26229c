"""Text from every source tokenizes alike: ``module:function`` returning strings, a ``.txt`` file, a
``.jsonl`` file, through the real CLI with a tiny Hugging Face BERT built from a config (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _extract_models import TEXTS, write_hf_bert

import pipeline
from extract import ZarrStore

transformers = pytest.importorskip("transformers")

WORDS = sorted({w for t in TEXTS for w in t.split()})
LAYERS = ["embeddings", "encoder.layer.0", "encoder"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local Hugging Face directory with a tiny BERT and its tokenizer."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=20, max_position_embeddings=32)
    return write_hf_bert(tmp_path_factory.mktemp("hf"), WORDS, transformers.BertModel(config).eval())


def _extract(bert_dir, data, out, name, capsys):
    code = pipeline.main(["extract", "--model", str(bert_dir), "--data", str(data), "--layers", *LAYERS,
                          "--out", str(out), "--name", name, "--quiet", "--batch-size", "3"])
    captured = capsys.readouterr()
    return code, captured.err


def test_texts_from_python_and_jsonl_equal_the_txt_file(bert_dir, tmp_path, capsys):
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)) + "\n\n")
    stores = {}
    for name, data in (("txt", txt), ("python", "_extract_models:texts"), ("jsonl", jsonl)):
        code, err = _extract(bert_dir, data, tmp_path / "out", name, capsys)
        assert code == 0, err
        stores[name] = ZarrStore(tmp_path / "out" / f"{name}.zarr")
    reference = stores.pop("txt")
    assert reference.n_samples == len(TEXTS) and reference.info.complete
    for name, store in stores.items():
        assert store.info.fingerprint == reference.info.fingerprint, name
        assert store.layers == reference.layers
        np.testing.assert_array_equal(store.read_inputs(), reference.read_inputs(), err_msg=name)
        np.testing.assert_array_equal(store.read("mask"), reference.read("mask"), err_msg=name)
        for layer in LAYERS:
            np.testing.assert_array_equal(store.read_layer(layer), reference.read_layer(layer), err_msg=name)


def test_jsonl_line_without_text_is_named(bert_dir, tmp_path, capsys):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "the cat"}\n\n{"label": 3}\n')
    code, err = _extract(bert_dir, jsonl, tmp_path / "out", "bad", capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"error: {jsonl}, line 3: no string 'text' field" in err
    jsonl.write_text('{"text": "the cat"}\nnot json\n')
    code, err = _extract(bert_dir, jsonl, tmp_path / "out", "bad", capsys)
    assert code == 2 and f"{jsonl}, line 2: not valid JSON" in err, err
    assert not (tmp_path / "out" / "bad.zarr").exists()


def test_strings_from_python_need_a_model_directory(tmp_path, capsys):
    code = pipeline.main(["extract", "--model", "_extract_models:rgb_net", "--data", "_extract_models:texts",
                          "--layers", "fc", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Text data needs a Hugging Face model directory with its tokenizer" in err, err
