"""Text inputs: strings tokenized with a model directory's tokenizer, and their attention mask.

A text dataset is tokenized once, padded to one length over the whole dataset
(so every batch has the same token axis and the store's arrays one shape),
and yields dicts of tensors (``input_ids``, ``attention_mask``, ...) that the
model receives as keyword arguments. The attention mask travels with the
activations into the store (array ``mask``), and everything derived from the
inputs — the dataset fingerprint and the stored inputs — depends on the valid
tokens only, so the same sentences padded to two lengths give comparable
stores and equal results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .store.reductions import compact_tokens

__all__ = [
    "Texts",
    "TokenizedTexts",
    "attention_mask",
    "fingerprint_rows",
    "load_texts",
    "load_tokenizer",
    "token_rows",
    "tokenize_for_model",
]


class Texts(list):
    """A list of strings read from a data spec; tokenized later with the model's tokenizer.

    Every text source gives the same ``Texts`` for the same strings, so they tokenize, fingerprint
    and extract alike: a ``.txt`` file (one text per non-blank line), a ``.json`` list of strings, a
    ``.jsonl`` file (one JSON object with a string ``text`` field per non-blank line) and a
    ``module:function`` returning a list of strings (``extract.specs.load_data``).
    """


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of each non-blank line of a JSON Lines file; an error names the first bad line."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg}); write one JSON object per "
                             "line, such as {\"text\": \"...\"}.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}, line {number}: no string 'text' field; write one JSON object per line, "
                             "such as {\"text\": \"...\"}.")
        texts.append(record["text"])
    return texts


def load_texts(path: str | os.PathLike[str]) -> Texts:
    """Strings from a ``.txt`` file (one per non-empty line), a ``.json`` list of strings or a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Text file {path} does not exist.")
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(path)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise ValueError(f"{path} must hold a JSON list of strings.")
        texts = data
    else:
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text; put one sentence per line.")
    return Texts(texts)


def load_tokenizer(model_dir: str | os.PathLike[str]):
    """The tokenizer saved in a local Hugging Face model directory (no download)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ValueError("Text data needs transformers: pip install 'simtorch[transformers]'.") from exc
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"No tokenizer in {model_dir} ({type(exc).__name__}); text data needs a model directory that holds its "
            "tokenizer (tokenizer.save_pretrained(DIR)), or pass tokenized tensors instead of strings."
        ) from exc


class TokenizedTexts(Dataset):
    """Strings tokenized once, padded to one length for the whole dataset.

    Parameters
    ----------
    texts : sequence of str
    tokenizer : a Hugging Face tokenizer
    max_length : int, optional
        Pad (and truncate) every text to this many tokens; by default pad to
        the longest text of the dataset.

    Examples
    --------
    >>> ds = TokenizedTexts(["a b", "a"], tokenizer)        # doctest: +SKIP
    >>> ds[1]["attention_mask"]                             # doctest: +SKIP
    tensor([1, 1, 1, 0])
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, *, max_length: int | None = None) -> None:
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("TokenizedTexts needs a non-empty sequence of strings.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
        if getattr(tokenizer, "pad_token", None) is None:
            eos = getattr(tokenizer, "eos_token", None)
            if eos is None:
                raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token before extracting.")
            tokenizer.pad_token = eos
        kwargs: dict[str, Any] = {"padding": "max_length", "truncation": True, "max_length": max_length} \
            if max_length else {"padding": "longest"}
        encoded = tokenizer(texts, return_tensors="pt", **kwargs)
        self.texts = texts
        self.encoded = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        if "attention_mask" not in self.encoded:
            raise ValueError("The tokenizer returned no attention_mask; simtorch needs it to ignore padding.")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.encoded.items()}


def tokenize_for_model(data: Any, model_spec: str, *, max_length: int | None = None) -> Any:
    """``data`` tokenized with the tokenizer of the model directory ``model_spec`` when it is ``Texts``."""
    if not isinstance(data, Texts):
        return data
    if not Path(model_spec).is_dir():
        raise ValueError(f"Text data needs a Hugging Face model directory with its tokenizer as --model; "
                         f"{model_spec!r} is not a directory.")
    return TokenizedTexts(data, load_tokenizer(model_spec), max_length=max_length)


def attention_mask(inputs: Any) -> torch.Tensor | None:
    """The (batch, tokens) boolean attention mask of a batch of keyword inputs, or None."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        return inputs["attention_mask"].to(torch.bool)
    return None


def _token_ids(inputs: Mapping[str, Any]) -> torch.Tensor:
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = next(v for k, v in inputs.items() if k != "attention_mask" and isinstance(v, torch.Tensor))
    return ids


def token_rows(inputs: Mapping[str, Any]) -> np.ndarray:
    """Token ids with the valid tokens first (in order) and padding zeroed: (batch, tokens).

    This is what the store keeps as the inputs of text data; padding to a
    longer length only adds zero columns.
    """
    mask = attention_mask(inputs)
    ids = _token_ids(inputs).detach().cpu()
    return np.ascontiguousarray(compact_tokens(ids, mask.cpu()).numpy())


def fingerprint_rows(inputs: Any, confounder: np.ndarray) -> np.ndarray:
    """The rows the dataset fingerprint hashes.

    For keyword inputs with an attention mask: one SHA-256 digest (32 bytes)
    per sample over the valid tokens of every integer input (ids, token
    types), so padding never changes the fingerprint. Otherwise the flattened
    inputs themselves (``confounder``).
    """
    mask = attention_mask(inputs)
    if mask is None:
        return confounder
    mask = mask.cpu()
    parts = [(k, v.detach().cpu()) for k, v in sorted(inputs.items())
             if k != "attention_mask" and isinstance(v, torch.Tensor) and not v.is_floating_point()
             and v.shape[:2] == mask.shape]
    rows = np.empty((len(mask), 32), dtype=np.uint8)
    for i in range(len(mask)):
        h = hashlib.sha256()
        for key, value in parts:
            h.update(key.encode())
            h.update(value[i][mask[i]].to(torch.int64).numpy().tobytes())
        rows[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return rows
