"""Token sequences from tiny Hugging Face models built in the test (no downloads).

Checks that padding never changes a result (same sentences padded to two
lengths), that every token reduction equals a direct computation on each
sentence run alone without padding, and that tuple and ``ModelOutput``
outputs are captured.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _extract_models import write_hf_bert
from torch import nn

transformers = pytest.importorskip("transformers")

from extract import ZarrStore, extract  # noqa: E402
from extract.specs import load_data, load_model  # noqa: E402
from extract.store import MASK_ARRAY, StoreError  # noqa: E402
from extract.store.reductions import ReducedStore, Reduction  # noqa: E402
from extract.text import Texts, TokenizedTexts, load_tokenizer, tokenize_for_model  # noqa: E402
from measure.engine import Engine  # noqa: E402

WORDS = "the cat sat on mat a dog ran in park big small red blue green slow fast bird tree".split()
TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "big red bird",
    "the small green tree in the park",
    "a slow cat",
    "the fast dog sat",
    "blue bird on a big tree",
    "red",
    "the cat ran",
    "small dog in a slow park",
]
LAYERS = ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder"]


def _bert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local Hugging Face directory with a tiny BERT and its tokenizer (vocab file written here)."""
    return write_hf_bert(tmp_path_factory.mktemp("hf"), WORDS, _bert(0))


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    return load_tokenizer(bert_dir)


def _alone(model: nn.Module, tokenizer, layer_index: int) -> list[torch.Tensor]:
    """Hidden states of each sentence run alone, without any padding: (T_i, D) each."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            enc = tokenizer(text, return_tensors="pt")
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer_index]
            out.append(hidden[0].double())
    return out


def test_tokenizer_knows_the_words(tokenizer):
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert tokenizer.unk_token_id not in ids  # otherwise every sentence would look alike


def test_padded_to_two_lengths_gives_the_same_store_and_numbers(tmp_path, bert_dir, tokenizer):
    model = load_model(str(bert_dir))
    short = TokenizedTexts(TEXTS, tokenizer)
    long = TokenizedTexts(TEXTS, tokenizer, max_length=short.encoded["input_ids"].shape[1] + 9)
    t_short, t_long = short.encoded["input_ids"].shape[1], long.encoded["input_ids"].shape[1]
    a = extract(model, short, tmp_path / "short.zarr", name="short", layers=LAYERS, batch_size=4, progress=False)
    b = extract(model, long, tmp_path / "long.zarr", name="long", layers=LAYERS, batch_size=3, progress=False)
    other = extract(_bert(1), short, tmp_path / "other.zarr", name="other", layers=LAYERS, batch_size=5,
                    progress=False)
    sa, sb, so = (ZarrStore(r.path) for r in (a, b, other))
    # the mask travels with the activations; the fingerprint ignores padding
    assert sa.read(MASK_ARRAY).shape == (len(TEXTS), t_short)
    assert sb.read(MASK_ARRAY).shape == (len(TEXTS), t_long)
    np.testing.assert_array_equal(sa.read(MASK_ARRAY).sum(1), sb.read(MASK_ARRAY).sum(1))
    assert sa.info.fingerprint == sb.info.fingerprint == so.info.fingerprint
    assert sa.info.reductions == {layer: "mean" for layer in LAYERS}  # the default for text
    # mean over valid tokens equals the mean of each sentence run alone
    for i, layer in enumerate(["embeddings", "encoder.layer.0", "encoder.layer.1"]):
        expected = np.stack([h.mean(0).numpy() for h in _alone(model, tokenizer, i)])
        np.testing.assert_allclose(sa.read_layer(layer), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sb.read_layer(layer), expected, rtol=1e-4, atol=1e-5)
    # and the similarity numbers do not depend on the padding length
    m_short = Engine([sa, so]).run([("cka", {})], [(0, 1)])[0].matrix
    m_long = Engine([sb, so]).run([("cka", {})], [(0, 1)])[0].matrix
    np.testing.assert_allclose(m_short, m_long, atol=1e-6)
    diag = Engine([sa, sb]).run([("cka", {})], [(0, 1)])[0].matrix.diagonal()
    np.testing.assert_allclose(diag, 1.0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["first", "last", "flatten"])
def test_token_reductions_are_padding_free_and_match_a_direct_computation(tmp_path, bert_dir, tokenizer, reduction):
    model = load_model(str(bert_dir))
    short = TokenizedTexts(TEXTS, tokenizer)
    long = TokenizedTexts(TEXTS, tokenizer, max_length=short.encoded["input_ids"].shape[1] + 6)
    stores = []
    for name, data in (("short", short), ("long", long)):
        r = extract(model, data, tmp_path / f"{name}.zarr", name=name, layers=["encoder.layer.*"],
                    reduce=reduction, batch_size=4, progress=False)
        stores.append(ZarrStore(r.path))
    assert stores[0].info.reductions == {"encoder.layer.0": reduction, "encoder.layer.1": reduction}
    alone = _alone(model, tokenizer, 2)  # encoder.layer.1
    if reduction == "flatten":
        # stored in full (what a plain forward pass gives), padding removed as it is read for measuring
        views = [ReducedStore(s) for s in stores]
        x_short, x_long = (v.read_layer("encoder.layer.1").reshape(len(TEXTS), -1) for v in views)
        t_max = max(len(h) for h in alone)
        reference = np.stack([np.pad(h.numpy(), ((0, t_max - len(h)), (0, 0))).ravel() for h in alone])
        np.testing.assert_allclose(x_short, reference, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x_long[:, : reference.shape[1]], reference, rtol=1e-4, atol=1e-5)
        assert not x_long[:, reference.shape[1]:].any()
        # the raw stored padding rows are not zero: without the mask, padding would leak into the comparison
        raw = stores[1].read_layer("encoder.layer.1")
        assert np.abs(raw[:, -1]).min() > 0
    else:
        index = 0 if reduction == "first" else -1
        expected = np.stack([h[index].numpy() for h in alone])
        for s in stores:
            np.testing.assert_allclose(s.read_layer("encoder.layer.1"), expected, rtol=1e-4, atol=1e-5)
    m = [Engine([s, stores[0]]).run([("cka", {}), ("cka_debiased", {})], [(0, 1)]) for s in stores]
    for r_short, r_long in zip(*m, strict=True):
        np.testing.assert_allclose(r_short.matrix, r_long.matrix, atol=1e-6)


def test_a_mask_blind_mean_would_depend_on_padding(tmp_path, bert_dir, tokenizer):
    """The padding test can fail: averaging every position (padding included) changes with the padding length."""
    model = load_model(str(bert_dir))
    short = TokenizedTexts(TEXTS, tokenizer)
    long = TokenizedTexts(TEXTS, tokenizer, max_length=short.encoded["input_ids"].shape[1] + 9)
    stores = []
    for name, data in (("short", short), ("long", long)):
        r = extract(model, data, tmp_path / f"{name}.zarr", name=name, layers=["encoder.layer.1"],
                    reduce="flatten", batch_size=5, progress=False)
        stores.append(ZarrStore(r.path))
    blind = [Reduction("mean").apply(torch.from_numpy(s.read_layer("encoder.layer.1")).double()) for s in stores]
    assert not torch.allclose(blind[0], blind[1], atol=1e-3)
    aware = [ReducedStore(s, "mean").read_layer("encoder.layer.1") for s in stores]
    np.testing.assert_allclose(aware[0], aware[1], atol=1e-5)


class _TupleHead(nn.Module):
    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * hidden, hidden.sum(-1)


class _Wrapped(nn.Module):
    """BERT whose ``bert.encoder`` returns a ModelOutput and whose ``head`` returns a tuple."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = _TupleHead()

    def forward(self, **inputs):
        return self.head(self.bert(**inputs).last_hidden_state)


def test_tuple_and_model_output_outputs_are_captured(tmp_path, bert_dir, tokenizer):
    bert = load_model(str(bert_dir))
    data = TokenizedTexts(TEXTS, tokenizer)
    r = extract(_Wrapped(bert), data, tmp_path / "w.zarr", name="w", layers=["bert.encoder", "head"],
                output_selector={"head": 0}, batch_size=4, progress=False)
    store = ZarrStore(r.path)
    with torch.no_grad():
        hidden = bert(**data.encoded).last_hidden_state.double()
    mask = data.encoded["attention_mask"].double()[..., None]
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(store.read_layer("bert.encoder"), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.read_layer("head"), 2 * mean, rtol=1e-4, atol=1e-5)


def test_vision_transformer_from_a_directory(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=24,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=30)
    model_dir = tmp_path / "vit"
    transformers.ViTModel(config).save_pretrained(model_dir)
    model = load_model(str(model_dir))
    images = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        hidden = model(images, output_hidden_states=True).hidden_states
    # the blocks are encoder.layer.N in transformers 4 and layers.N in transformers 5
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"(encoder\.layer|layers)\.\d+", n)]
    assert len(blocks) == 2
    full = extract(model, images, tmp_path / "full.zarr", name="full", layers=blocks, batch_size=5, progress=False)
    cls = extract(model, images, tmp_path / "cls.zarr", name="cls", layers=blocks, reduce="first", batch_size=5,
                  progress=False)
    s_full, s_cls = ZarrStore(full.path), ZarrStore(cls.path)
    assert not s_full.has_array(MASK_ARRAY)
    assert s_full.info.reductions == {blocks[0]: "flatten", blocks[1]: "flatten"}
    assert s_cls.info.reductions == {blocks[0]: "first", blocks[1]: "first"}
    np.testing.assert_allclose(s_full.read_layer(blocks[1]), hidden[2].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_cls.read_layer(blocks[1]), hidden[2][:, 0].numpy(), rtol=1e-5, atol=1e-6)
    # 'first' at measurement from the full store equals 'first' at extraction
    a = Engine([s_full, s_cls], reduce="first").run([("cka", {})], [(0, 1)])[0].matrix
    np.testing.assert_allclose(a.diagonal(), 1.0, atol=1e-6)
    with pytest.raises(StoreError, match="reduced with 'flatten'.*'first'"):
        Engine([s_full, s_cls])


def test_text_data_spec_and_tokenizer_errors(tmp_path, bert_dir):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")
    texts = load_data(str(path))
    assert isinstance(texts, Texts) and list(texts) == TEXTS
    data = tokenize_for_model(texts, str(bert_dir), max_length=20)
    assert data.encoded["input_ids"].shape == (len(TEXTS), 20)
    with pytest.raises(ValueError, match="needs a Hugging Face model directory"):
        tokenize_for_model(texts, "extract.demo:cnn")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="No tokenizer in"):
        load_tokenizer(empty_dir)


def test_cli_extracts_text_with_a_model_directory(tmp_path, bert_dir, capsys):
    import pipeline

    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "stores"
    code = pipeline.main(["extract", "--model", str(bert_dir), "--data", str(path), "--name", "bert",
                          "--layers", "encoder.layer.*", "--reduce", "encoder.layer.0=last", "--out", str(out),
                          "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = ZarrStore(out / "bert.zarr")
    assert store.info.reductions == {"encoder.layer.0": "last", "encoder.layer.1": "mean"}
    code = pipeline.main(["extract", "--model", str(bert_dir), "--data", str(path), "--name", "bad",
                          "--layers", "encoder.layer.*", "--reduce", "encoder.layer.0=gap", "--out", str(out),
                          "--quiet"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers prints a weight-loading bar before it)
    assert code != 0 and last.startswith("error: ") and "token sequence" in last and "Traceback" not in err
