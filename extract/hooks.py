"""Capture layer outputs with forward hooks.

``SimilarityModel`` is the original simtorch wrapper, kept compatible
(``SimilarityModel(model, model_name=..., layers_to_include=[...])``) and made
stricter: layers are chosen by exact name, glob pattern or module type; a
pattern that matches nothing is an error naming the nearest real layers; a
module called more than once per forward is captured per call under distinct
names (or refused); layer order is the order of first execution.

This module never imports zarr: hooks detach outputs and hand them over; what
happens to them (a store, memory) is the caller's business.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .errors import LayerSelectionError
from .globs import GLOB_CHARS, glob_regex

__all__ = ["LayerSelectionError", "SimilarityModel", "resolve_layers", "select_tensor"]

Selector = int | str | None


def _is_descendant(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def resolve_layers(model: nn.Module, patterns: Sequence[str | type[nn.Module]]) -> list[str]:
    """Module names of ``model`` selected by ``patterns``, in registration order.

    Each pattern is a module type (``nn.Conv2d``), an exact module name, a glob
    (``"layer*.conv?"``) or, for compatibility with simtorch 0.2.1, a substring
    of module names. Names selected explicitly (exact name) are always kept;
    among names selected by a type, glob or substring, a module whose ancestor
    is also selected is dropped with a warning. In globs ``*`` matches within
    one dotted part (``layer*`` is ``layer1`` but not ``layer1.0``) and ``**``
    matches across dots, so that a container and its
    children are never captured twice by accident.

    Raises
    ------
    LayerSelectionError
        If a pattern matches no module; the message lists the nearest names.
    """
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    if not patterns:
        raise LayerSelectionError(
            "No layers to capture: pass layers_to_include=[...] with module names, globs or types, "
            f"for example {names[:3]}."
        )
    explicit: set[str] = set()
    matched: set[str] = set()
    for pattern in patterns:
        if isinstance(pattern, type) and issubclass(pattern, nn.Module):
            hits = [n for n in names if isinstance(modules[n], pattern)]
            what = f"module type {pattern.__name__}"
        elif isinstance(pattern, str):
            if pattern in modules and pattern:
                explicit.add(pattern)
                continue
            if GLOB_CHARS & set(pattern):
                regex = glob_regex(pattern)
                hits = [n for n in names if regex.fullmatch(n)]
            else:
                hits = [n for n in names if pattern in n]
            what = f"layer pattern {pattern!r}"
        else:
            raise LayerSelectionError(
                f"Layer selectors must be module names, glob patterns or nn.Module types; got {pattern!r} "
                f"of type {type(pattern).__name__}."
            )
        if not hits:
            near = difflib.get_close_matches(str(pattern), names, n=5, cutoff=0.3) or names[:5]
            raise LayerSelectionError(
                f"The {what} matches no module of {type(model).__name__}. Nearest names: {near}. "
                "Use an exact name from model.named_modules(), a glob such as 'layer*.conv?', or a type."
            )
        matched.update(hits)
    dropped = sorted(
        n for n in matched - explicit if any(_is_descendant(n, a) for a in (matched | explicit) - {n})
    )
    if dropped:
        warnings.warn(
            f"Not capturing {len(dropped)} module(s) whose container is also selected "
            f"(e.g. {dropped[:3]}); name them exactly to capture both.",
            stacklevel=3,
        )
    chosen = (matched - set(dropped)) | explicit
    return [n for n in names if n in chosen]


def select_tensor(output: Any, selector: Selector, layer: str) -> torch.Tensor:
    """The tensor to capture from a module's ``output``.

    Tensors pass through; tuples and lists are indexed by ``selector`` (default:
    the first tensor); dicts, Hugging Face ``ModelOutput`` objects and
    dataclasses are indexed by key/field name (default: the first tensor value).
    """
    if isinstance(output, torch.Tensor):
        if selector not in (None, 0):
            raise LayerSelectionError(
                f"Layer {layer!r} returns a single tensor; its output selector must be None, got {selector!r}."
            )
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, Mapping):
        output = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, Mapping):
        items = list(output.items())
        if selector is None:
            found = [v for _, v in items if isinstance(v, torch.Tensor)]
        elif selector in output:
            found = [output[selector]]
        else:
            raise LayerSelectionError(
                f"Layer {layer!r} returns keys {list(output)}; output selector {selector!r} is not one of them."
            )
    elif isinstance(output, (tuple, list)):
        if selector is None:
            found = [v for v in output if isinstance(v, torch.Tensor)]
        elif isinstance(selector, int) and -len(output) <= selector < len(output):
            found = [output[selector]]
        else:
            raise LayerSelectionError(
                f"Layer {layer!r} returns a {type(output).__name__} of length {len(output)}; "
                f"output selector {selector!r} must be an index into it."
            )
    else:
        found = []
    if not found or not isinstance(found[0], torch.Tensor):
        raise LayerSelectionError(
            f"Layer {layer!r} returned {type(output).__name__}, which holds no tensor to capture "
            f"with selector {selector!r}; choose another layer or selector."
        )
    return found[0]


class SimilarityModel:
    """A model with forward hooks on the layers to compare.

    Parameters
    ----------
    model : nn.Module
        The network. It is put in eval mode; forward passes run under
        ``torch.inference_mode()``.
    model_name : str, default=class name of ``model``
        Name used in stores, plots and results.
    layers_to_include : list of str or nn.Module types
        Exact module names, globs (``"layer*.conv?"``), substrings (simtorch
        0.2.1 behaviour) or module types; see ``resolve_layers``.
    output_selector : int, str or dict, default=None
        Which tensor to capture from outputs that are tuples, dicts or
        dataclasses: one selector for every layer, or ``{layer name: selector}``.
        ``None`` takes the first tensor.
    repeated_calls : {"per_call", "error"}, default="per_call"
        A module run several times per forward pass is captured once per call
        as ``name``, ``name#1``, ``name#2``...; ``"error"`` refuses such models.
    device : str or torch.device, default=None
        Moves the model there if given.

    Attributes
    ----------
    layers : list of str
        Captured layer names, in order of first execution once a forward pass
        has run (registration order before).
    model_activations : dict of str to Tensor
        Outputs of the last forward pass (detached), keyed by layer name.
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str | None = None,
        layers_to_include: Sequence[str | type[nn.Module]] | None = None,
        *,
        output_selector: Selector | Mapping[str, Selector] = None,
        repeated_calls: Literal["per_call", "error"] = "per_call",
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if repeated_calls not in ("per_call", "error"):
            raise ValueError(f"repeated_calls must be 'per_call' or 'error', got {repeated_calls!r}.")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.model_name = model_name or type(model).__name__
        self.layers_to_include = list(layers_to_include or [])
        self.module_names = resolve_layers(model, self.layers_to_include)
        self.output_selector = output_selector
        self.repeated_calls = repeated_calls
        self.layers: list[str] = list(self.module_names)
        self.model_activations: dict[str, torch.Tensor] = {}
        self._order_known = False
        self._calls: dict[str, int] = {}
        self._order: list[str] = []

    # ------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _selector(self, name: str) -> Selector:
        if isinstance(self.output_selector, Mapping):
            return self.output_selector.get(name)
        return self.output_selector

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        if count and self.repeated_calls == "error":
            raise LayerSelectionError(
                f"Module {name!r} ran {count + 1} times in one forward pass; its outputs would overwrite "
                "each other. Use repeated_calls='per_call' to capture each call, or pick another layer."
            )
        key = name if count == 0 else f"{name}#{count}"
        tensor = select_tensor(output, self._selector(name), name)
        self.model_activations[key] = tensor.detach()
        if not self._order_known:
            self._order.append(key)

    @contextmanager
    def hooked(self) -> Iterator[SimilarityModel]:
        """Register the hooks; they are removed on exit, even after an error."""
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for name in self.module_names:
                handles.append(
                    modules[name].register_forward_hook(
                        lambda mod, args, out, _name=name: self._hook(_name, mod, args, out)
                    )
                )
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Run one forward pass (inside ``hooked()``) and return the captured outputs in order."""
        self.model_activations = {}
        self._calls = {}
        self._order = []
        with torch.inference_mode():
            if isinstance(inputs, Mapping):
                self.model(**inputs)
            else:
                self.model(inputs)
        if not self._order_known:
            missing = [n for n in self.module_names if n not in self._calls]
            if missing:
                raise LayerSelectionError(
                    f"Layers {missing} of {self.model_name!r} never ran in the forward pass, so they "
                    "cannot be captured; remove them from layers_to_include."
                )
            self.layers = list(self._order)
            self._order_known = True
        elif list(self.model_activations) != self.layers:
            raise LayerSelectionError(
                f"{self.model_name!r} ran layers {list(self.model_activations)} in this batch but "
                f"{self.layers} in the first one; data-dependent control flow cannot be captured consistently."
            )
        return {k: self.model_activations[k] for k in self.layers}

    def __call__(self, inputs: Any) -> dict[str, torch.Tensor]:
        with self.hooked():
            return self.forward(inputs)

    def __repr__(self) -> str:
        return f"SimilarityModel({self.model_name!r}, layers={self.layers})"
