"""Per-sample reductions of layer outputs: token pooling for sequences, pooling for maps.

A layer's output for one sample is a map (C, H, W), a token sequence (T, D)
or a vector (D,). Measures flatten each sample, so a ResNet block gives
hundreds of thousands of features and a padded transformer layer mixes the
hidden states of padding tokens into the comparison. A reduction is chosen
per layer, either at extraction (smaller stores) or at measurement (from the
same store):

``flatten``
    The identity: every feature is kept. On a token layer of a store with an
    attention mask the valid tokens are moved to the front (order kept) and
    padding positions are zeroed, so padding only adds zero columns, which no
    Gram matrix sees.
``mean``
    Mean over the valid tokens, Σₜ mₜ xₜ / Σₜ mₜ (mask-aware; the default
    for token layers of text models).
``first`` / ``last``
    The first / last valid token (``first`` is BERT's and ViT's [CLS];
    ``last`` the usual choice for causal language models). Left and right
    padding give the same token.
``gap``
    Global average pooling of a map (C, *spatial) over its spatial axes: (C,).
``pool<k>``
    Adaptive average pooling of a map to k per spatial axis (C, k, k) —
    ``torch.nn.functional.adaptive_avg_pool{1,2,3}d``.

Rules are ``"REDUCTION"`` (every layer it fits) or ``"PATTERN=REDUCTION"``
(layers whose name or glob matches; an error when it does not fit). The store
records, per layer, the reduction that produced the stored array
(``StoreInfo.reductions``); ``ReducedStore`` applies a measurement-time
reduction on top of a store as it is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ReductionError, StoreError
from ..globs import matches
from .base import ActivationStore, copy_into
from .format import LAYERS_GROUP, MASK_ARRAY, StoreInfo

__all__ = [
    "REDUCTION_NAMES",
    "LayerReducer",
    "Reduction",
    "ReductionError",
    "ReducedStore",
    "compact_tokens",
    "parse_rules",
    "reduce_store",
    "rules_key",
]

REDUCTION_NAMES = ("flatten", "mean", "first", "last", "gap", "pool<k>")
TOKEN_KINDS = ("mean", "first", "last")
MAP_KINDS = ("gap", "pool")

ReduceSpec = Union[None, str, Sequence[str], Mapping[str, str]]


@dataclass(frozen=True)
class Reduction:
    """One per-sample reduction (see the module docstring).

    Parameters
    ----------
    kind : {"flatten", "mean", "first", "last", "gap", "pool"}
    size : int, default=0
        Output size per spatial axis of ``"pool"``.
    """

    kind: str
    size: int = 0

    @classmethod
    def parse(cls, text: str) -> Reduction:
        """``"mean"``, ``"gap"``, ``"pool4"`` (also ``"pool(4)"``, ``"pool:4"``) -> Reduction."""
        t = str(text).strip().lower()
        if t in ("flatten", "mean", "first", "last", "gap"):
            return cls(t)
        m = re.fullmatch(r"pool[:(]?(\d+)\)?", t)
        if m and int(m.group(1)) >= 1:
            return cls("pool", int(m.group(1)))
        raise ReductionError(
            f"Unknown reduction {text!r}; choose one of flatten, mean, first, last, gap or pool<k> "
            "(adaptive average pooling to k per spatial axis, e.g. pool4)."
        )

    def __str__(self) -> str:
        return f"pool{self.size}" if self.kind == "pool" else self.kind

    @property
    def is_identity(self) -> bool:
        return self.kind == "flatten"

    # ------------------------------------------------------------------ fit and shape
    def fit_error(self, shape: tuple[int, ...], token_layer: bool) -> str:
        """Why this reduction cannot reduce a per-sample ``shape`` ('' when it can)."""
        if self.kind == "flatten":
            return ""
        if self.kind in TOKEN_KINDS:
            if len(shape) < 2:
                return f"'{self}' pools over tokens but the layer's samples have shape {shape} (no token axis)"
            return ""
        if token_layer:
            return (f"'{self}' pools maps (C, H, W) but the layer is a token sequence {shape}; "
                    "use mean, first or last")
        if len(shape) < 2:
            return f"'{self}' pools maps (C, *spatial) but the layer's samples have shape {shape}"
        if self.kind == "pool" and len(shape) > 4:
            return f"'{self}' pools 1 to 3 spatial axes but the layer's samples have shape {shape}"
        return ""

    def fits_by_default(self, shape: tuple[int, ...], token_layer: bool, has_mask: bool) -> bool:
        """Whether a bare rule (no layer pattern) applies to a layer of this per-sample ``shape``."""
        if self.kind == "flatten":
            return True
        if self.kind in TOKEN_KINDS:
            return token_layer or (not has_mask and len(shape) == 2)
        return not token_layer and not self.fit_error(shape, token_layer)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape after the reduction."""
        if self.kind == "flatten":
            return tuple(shape)
        if self.kind in TOKEN_KINDS:
            return tuple(shape[1:])
        if self.kind == "gap":
            return (shape[0],)
        return (shape[0],) + (self.size,) * (len(shape) - 1)

    # ------------------------------------------------------------------ compute
    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None, token_layer: bool = False) -> torch.Tensor:
        """Reduce a batch ``x`` of shape (batch, *per_sample).

        ``mask`` (batch, T) marks valid tokens (True/1) of token layers;
        ``None`` means every token is valid. Mean and pooling are computed in
        float64 and returned in ``x``'s floating dtype.
        """
        if self.kind == "flatten":
            if token_layer and mask is not None:
                return compact_tokens(x, _bool_mask(mask, x))
            return x
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.kind in TOKEN_KINDS:
            m = _bool_mask(mask, x) if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                                          device=x.device)
            counts = m.sum(dim=1)
            if bool((counts == 0).any()):
                bad = torch.nonzero(counts == 0).flatten()[:5].tolist()
                raise ReductionError(f"Samples {bad} of the batch have no valid token (all-zero attention mask); "
                                     f"'{self}' is undefined for them. Remove empty texts from the data.")
            if self.kind == "mean":
                w = m.to(torch.float64).reshape(*m.shape, *([1] * (x.ndim - 2)))
                return ((x.to(torch.float64) * w).sum(dim=1) / w.sum(dim=1)).to(out_dtype)
            t = x.shape[1]
            idx = m.to(torch.int8).argmax(dim=1) if self.kind == "first" else t - 1 - m.flip(1).to(torch.int8).argmax(1)
            return x[torch.arange(len(x), device=x.device), idx]
        xd = x.to(torch.float64)
        if self.kind == "gap":
            return xd.mean(dim=tuple(range(2, x.ndim))).to(out_dtype)
        pool = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[x.ndim]
        return pool(xd, self.size).to(out_dtype)


def _bool_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask, device=x.device)
    if mask.ndim != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[1]:
        raise ReductionError(f"The attention mask has shape {tuple(mask.shape)} but the token layer has shape "
                             f"{tuple(x.shape)}; the mask must be (batch, tokens).")
    return mask.to(torch.bool)


def compact_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens moved to the front in order, padding positions zeroed (same shape)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    index = order.reshape(*order.shape, *([1] * (x.ndim - 2))).expand_as(x)
    moved = torch.gather(x, 1, index)
    keep = torch.gather(mask, 1, order).reshape(*order.shape, *([1] * (x.ndim - 2)))
    return moved * keep.to(moved.dtype) if moved.is_floating_point() else moved * keep


# ---------------------------------------------------------------------- rules
Rule = tuple[Union[str, None], Reduction]


def parse_rules(spec: ReduceSpec) -> list[Rule]:
    """Rules from ``None``, ``"gap"``, ``["block*=pool2", "fc*=flatten"]`` or ``{"block*": "gap"}``."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        items = [f"{k}={v}" for k, v in spec.items()]
    elif isinstance(spec, str):
        items = [spec]
    else:
        items = list(spec)
    rules: list[Rule] = []
    for item in items:
        if not isinstance(item, str):
            raise ReductionError(f"Reduction rules are strings like 'gap' or 'block*=pool2', got {item!r}.")
        pattern, eq, name = item.rpartition("=")
        rules.append(((pattern.strip() or None) if eq else None, Reduction.parse(name)))
    return rules


def rules_key(spec: ReduceSpec) -> str:
    """A canonical string of the rules (recorded in the store request)."""
    return json.dumps([[p, str(r)] for p, r in parse_rules(spec)])


def resolve(rules: Sequence[Rule], shapes: Mapping[str, tuple[int, ...]], token_layers: set[str], *,
            has_mask: bool, default_token: Reduction | None) -> dict[str, Reduction]:
    """The reduction of every layer: the first matching rule, else ``default_token`` for token layers, else flatten.

    Raises
    ------
    ReductionError
        If a pattern matches no layer, or a pattern rule does not fit a layer it names.
    """
    chosen: dict[str, Reduction] = {}
    for pattern, reduction in rules:
        if pattern is not None and not any(matches(pattern, layer) for layer in shapes):
            raise ReductionError(f"Reduction rule '{pattern}={reduction}' matches no layer; layers are "
                                 f"{list(shapes)}.")
    for layer, shape in shapes.items():
        token = layer in token_layers
        for pattern, reduction in rules:
            if pattern is None:
                if reduction.fits_by_default(shape, token, has_mask):
                    chosen[layer] = reduction
                    break
            elif matches(pattern, layer):
                why = reduction.fit_error(shape, token)
                if why:
                    raise ReductionError(f"Layer {layer!r}: {why}. Choose another reduction for it.")
                chosen[layer] = reduction
                break
        else:
            chosen[layer] = default_token if (token and default_token is not None) else Reduction("flatten")
    return chosen


class LayerReducer:
    """Extraction-time reductions: resolved on the first batch, then applied to every batch.

    Parameters
    ----------
    spec : str, list of str or dict, optional
        Rules (see ``parse_rules``). Token layers without a rule get ``mean``
        (when the batch has an attention mask), every other layer ``flatten``.

    Attributes
    ----------
    reductions : dict of str to Reduction
        Per layer, after the first call.
    token_layers : list of str
        Layers whose first per-sample axis is the token axis of the mask.
    """

    def __init__(self, spec: ReduceSpec = None) -> None:
        self.rules = parse_rules(spec)
        self.reductions: dict[str, Reduction] | None = None
        self.token_layers: list[str] = []

    def __call__(self, outputs: Mapping[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.reductions is None:
            shapes = {k: tuple(v.shape[1:]) for k, v in outputs.items()}
            t = mask.shape[1] if mask is not None else None
            self.token_layers = [k for k, s in shapes.items() if t is not None and len(s) >= 2 and s[0] == t]
            self.reductions = resolve(self.rules, shapes, set(self.token_layers), has_mask=mask is not None,
                                      default_token=Reduction("mean"))
        token = set(self.token_layers)
        # 'flatten' stores what the forward pass gave (padding included); ReducedStore masks it when read
        return {k: v if self.reductions[k].is_identity else self.reductions[k].apply(v, mask, k in token)
                for k, v in outputs.items()}

    @property
    def recorded(self) -> dict[str, str]:
        """``{layer: reduction name}`` as written to ``StoreInfo.reductions``."""
        return {k: str(r) for k, r in (self.reductions or {}).items()}


# ---------------------------------------------------------------------- measurement-time view
def _token_layers(store: ActivationStore) -> set[str]:
    info = store.info
    recorded = info.request.get("token_layers") if isinstance(info.request, Mapping) else None
    if recorded is not None:  # token layers still holding their token axis (stored in full)
        return {layer for layer in recorded if info.reductions.get(layer, "flatten") == "flatten"}
    if not store.has_array(MASK_ARRAY):
        return set()
    t = store.array_shape(MASK_ARRAY)[1]
    out = set()
    for layer in info.layers:
        shape = store.layer_shape(layer)
        if len(shape) >= 2 and shape[0] == t and info.reductions.get(layer, "flatten") == "flatten":
            out.add(layer)
    return out


class ReducedStore(ActivationStore):
    """A read-only view of ``store`` whose layers are reduced as they are read.

    Its ``info.reductions`` holds the effective reduction of every layer: the
    one recorded at extraction, or the measurement-time one applied on top of
    a layer stored in full. Token layers of a store with an attention mask are
    read mask-aware even under ``flatten`` (padding is zeroed and moved last).

    Parameters
    ----------
    store : ActivationStore
    spec : str, list of str or dict, optional
        Measurement-time rules (see ``parse_rules``); ``None`` keeps the
        stored reductions.
    """

    def __init__(self, store: ActivationStore, spec: ReduceSpec = None) -> None:
        super().__init__(read_only=True)
        self.inner = store
        base = store.info
        self._has_mask = store.has_array(MASK_ARRAY)
        self._token = _token_layers(store)
        stored = {layer: base.reductions.get(layer, "flatten") for layer in base.layers}
        shapes = {layer: tuple(store.layer_shape(layer)) for layer in base.layers}
        rules = parse_rules(spec)
        for pattern, reduction in rules:
            if pattern is not None and not any(matches(pattern, layer) for layer in base.layers):
                raise ReductionError(f"Reduction rule '{pattern}={reduction}' matches no layer of {store}; its "
                                     f"layers are {base.layers}.")
        bare = next((r for p, r in rules if p is None), None)
        self._apply: dict[str, Reduction] = {}
        effective: dict[str, str] = {}
        for layer in base.layers:
            token = layer in self._token
            explicit = next((r for p, r in rules if p is not None and matches(p, layer)), None)
            request = explicit
            if request is None and bare is not None and bare.fits_by_default(shapes[layer], token, self._has_mask):
                request = bare
            effective[layer] = stored[layer]
            if request is None or str(request) == stored[layer]:
                continue
            if stored[layer] != "flatten":
                if explicit is not None:
                    raise ReductionError(
                        f"Layer {layer!r} of {store} was stored reduced with '{stored[layer]}' at extraction; "
                        f"'{request}' cannot be applied to it. Re-extract it with --reduce '{layer}=flatten'.")
                continue
            why = request.fit_error(shapes[layer], token)
            if why:
                raise ReductionError(f"Layer {layer!r} of {store}: {why}. Choose another reduction for it.")
            self._apply[layer] = request
            effective[layer] = str(request)
        self._info = replace(base, reductions=effective)

    def __repr__(self) -> str:
        return repr(self.inner)

    @property
    def path(self) -> str:
        return getattr(self.inner, "path", repr(self.inner))

    @property
    def info(self) -> StoreInfo:
        return self._info

    def write_info(self, info: StoreInfo) -> None:
        self._check_writable()

    def create_array(self, key: str, shape: tuple[int, ...], dtype: str, chunk_samples: int) -> None:
        self._check_writable()

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        self._check_writable()

    def has_array(self, key: str) -> bool:
        return self.inner.has_array(key)

    def _layer(self, key: str) -> str | None:
        prefix = f"{LAYERS_GROUP}/"
        return key[len(prefix):] if key.startswith(prefix) else None

    def array_shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self.inner.array_shape(key))
        layer = self._layer(key)
        if layer in self._apply:
            return (shape[0], *self._apply[layer].output_shape(shape[1:]))
        return shape

    def _reduces(self, key: str) -> bool:
        layer = self._layer(key)
        return layer is not None and (layer in self._apply or (layer in self._token and self._has_mask))

    def array_dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float64) if self._reduces(key) else self.inner.array_dtype(key)

    def read(self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        if not self._reduces(key):
            return self.inner.read(key, start, stop, out)
        block = self.inner.read(key, start, stop)
        layer = self._layer(key)
        token = layer in self._token and self._has_mask
        reduction = self._apply.get(layer)
        reduction = reduction or Reduction("flatten")
        mask = None
        if self._has_mask and (token or reduction.kind in TOKEN_KINDS):
            mask = torch.from_numpy(np.asarray(self.inner.read(MASK_ARRAY, start, stop)).astype(bool))
        x = torch.from_numpy(np.ascontiguousarray(block))
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if reduction.kind in TOKEN_KINDS and mask is not None and not token:
            mask = None  # a layer without the mask's token axis: every token is valid
        return copy_into(out, reduction.apply(x.to(torch.float64), mask, token).numpy())


def reduce_store(store: ActivationStore, spec: ReduceSpec = None) -> ActivationStore:
    """``store`` viewed through measurement-time reductions (``ReducedStore``); views are not nested."""
    if isinstance(store, ReducedStore):
        if spec is None:
            return store
        store = store.inner
    return ReducedStore(store, spec)


def check_reductions(stores: Sequence[ActivationStore], layers: Sequence[Sequence[str]], *,
                     allow_mixed: bool = False) -> list[str]:
    """Refuse to compare a layer with the same-named layer of another store under a different reduction.

    Returns the list of mixed layers (non-empty only with ``allow_mixed=True``).

    Raises
    ------
    StoreError
        If a layer name appears in two stores with different effective
        reductions and ``allow_mixed`` is False.
    """
    seen: dict[str, tuple[str, str]] = {}
    mixed: list[str] = []
    for store, names in zip(stores, layers, strict=True):
        reductions = store.info.reductions
        for layer in names:
            r = reductions.get(layer, "flatten")
            if layer in seen and seen[layer][0] != r:
                message = (f"Layer {layer!r} is reduced with '{seen[layer][0]}' in {seen[layer][1]} but with '{r}' "
                           f"in {store}")
                if not allow_mixed:
                    raise StoreError(
                        message + "; the two are different representations. Choose one with --reduce "
                        f"('{layer}={seen[layer][0]}'), or pass --mixed-reductions to compare them anyway.")
                mixed.append(message)
            seen.setdefault(layer, (r, repr(store)))
    return mixed


def describe(reductions: Mapping[str, str]) -> str:
    """'block1..block4: gap, fc1: flatten' style one-liner for reports and ``info``."""
    groups: dict[str, list[str]] = {}
    for layer, r in reductions.items():
        groups.setdefault(r, []).append(layer)
    return ", ".join(f"{r}: {', '.join(ls)}" for r, ls in groups.items())

