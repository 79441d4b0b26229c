"""Every text source reads the same strings: a ``.jsonl`` record's text is its ``text`` field whatever
string fields come before it, and a ``module:function`` returning a tuple of strings is text exactly as a
list of strings or a ``.txt`` file with those lines is. The last test follows both through the real CLI
with a tiny Hugging Face BERT built from a config (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _extract_models import TEXTS, write_hf_bert

import pipeline
from extract import ZarrStore
from extract.specs import SpecError, load_data
from extract.text import Texts, load_texts


def tuple_texts() -> tuple[str, ...]:
    """Data factory: the test sentences as a tuple (``--data test_text_sources:tuple_texts``)."""
    return tuple(TEXTS)


def list_texts() -> list[str]:
    """Data factory: the test sentences as a list."""
    return list(TEXTS)


def mixed_tuple() -> tuple:
    """Data factory: strings and a number, refused like the same list."""
    return ("a cat", 3)


def _records() -> list[dict]:
    """One record per sentence, with other string fields before (and after) ``text``; each looks like text."""
    return [{"id": f"doc-{i}", "label": "positive" if i % 2 else "negative", "source": "the web",
             "text": text, "title": f"title of {text}"} for i, text in enumerate(TEXTS)]


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_jsonl_text_is_the_text_field_not_the_first_string(tmp_path):
    path = tmp_path / "texts.jsonl"
    records = _records()
    assert list(records[0])[0] == "id" and list(records[0]).index("text") == 3  # string fields come first
    _write_jsonl(path, records)
    texts = load_texts(path)
    assert isinstance(texts, Texts) and texts == TEXTS
    data = load_data(str(path))  # the --data route
    assert isinstance(data, Texts) and data == TEXTS


def test_jsonl_field_order_does_not_matter(tmp_path):
    """``text`` first, in the middle or last: the same strings, equal to the ``.txt`` file's lines."""
    orders = [["text", "id", "label"], ["id", "text", "label"], ["label", "id", "text"]]
    records = [{key: {"id": f"r{i}", "label": "x", "text": t}[key] for key in orders[i % 3]}
               for i, t in enumerate(TEXTS)]
    _write_jsonl(tmp_path / "texts.jsonl", records)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert load_data(str(tmp_path / "texts.jsonl")) == load_data(str(tmp_path / "texts.txt")) == TEXTS


def test_module_function_tuple_of_strings_is_text_like_a_list():
    from_tuple = load_data(f"{__name__}:tuple_texts")
    from_list = load_data(f"{__name__}:list_texts")
    assert isinstance(from_tuple, Texts) and isinstance(from_list, Texts)
    assert from_tuple == from_list == TEXTS


def test_module_function_tuple_mixing_strings_is_refused_like_a_list():
    with pytest.raises(SpecError, match="mixing strings and int"):
        load_data(f"{__name__}:mixed_tuple")


def test_jsonl_with_string_fields_and_a_tuple_extract_like_the_txt_file(tmp_path, capsys):
    """Through ``pipeline.py extract``: the stores hold the same tokens, mask, fingerprint and activations."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    words = sorted({w for t in TEXTS for w in t.split()} | {w for r in _records() for w in r["title"].split()})
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=20, max_position_embeddings=32)
    bert = write_hf_bert(tmp_path, words, transformers.BertModel(config).eval())
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    _write_jsonl(tmp_path / "texts.jsonl", _records())
    out = tmp_path / "out"
    stores = {}
    for name, data in (("txt", tmp_path / "texts.txt"), ("jsonl", tmp_path / "texts.jsonl"),
                       ("tuple", f"{__name__}:tuple_texts")):
        code = pipeline.main(["extract", "--model", str(bert), "--data", str(data), "--layers", "embeddings",
                              "encoder", "--out", str(out), "--name", name, "--quiet", "--batch-size", "3"])
        assert code == 0, capsys.readouterr().err
        stores[name] = ZarrStore(out / f"{name}.zarr")
    reference = stores.pop("txt")
    assert reference.n_samples == len(TEXTS) and reference.info.complete
    for name, store in stores.items():
        assert store.info.fingerprint == reference.info.fingerprint, name
        np.testing.assert_array_equal(store.read_inputs(), reference.read_inputs(), err_msg=name)
        np.testing.assert_array_equal(store.read("mask"), reference.read("mask"), err_msg=name)
        for layer in ("embeddings", "encoder"):
            np.testing.assert_array_equal(store.read_layer(layer), reference.read_layer(layer), err_msg=name)
