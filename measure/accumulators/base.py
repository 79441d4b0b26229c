"""The ``Accumulator`` base: registered states with merge rules, update count, compute cache.

Subclasses declare their states in ``__init__`` with ``add_state`` and implement ``_update``
(assigning the kernel's new state to ``self``) and ``_compute`` (calling the compute kernel);
the base class does the rest, in the manner of ``torchmetrics.Metric``: it counts updates,
clears the cached value on every update, warns when ``compute`` runs before any update,
merges two accumulators state by state, resets, and moves states between devices.
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..errors import MeasureError

__all__ = ["Accumulator"]

MergeRule = str | Callable[[Any, Any], Any]


def _sum(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: _sum(a.get(k), b.get(k)) for k in {**a, **b}}
    return a + b


def _equal(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    same = (torch.equal(a, b) if isinstance(a, torch.Tensor) else
            len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
            if isinstance(a, (list, tuple))
            else a == b)
    if not same:
        raise MeasureError("Cannot merge accumulators whose configuration differs (shift, layer widths); "
                           "construct both with the same arguments.")
    return a


_RULES: dict[str, Callable[[Any, Any], Any]] = {"sum": _sum, "equal": _equal}


class Accumulator(ABC):
    """Stateful update / merge / compute, with one merge rule per registered state.

    A state registered with ``merge="sum"`` is additive (sums, counts, moment matrices), so
    merging two accumulators is adding their states; ``merge="equal"`` marks configuration
    that both sides must share; a callable ``merge(a, b)`` handles anything else (for example
    the parallel-variance formula of Chan et al. for running means).
    """

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._merge_rules: dict[str, Callable[[Any, Any], Any]] = {}
        self._update_count = 0
        self._computed: Any = None

    # ------------------------------------------------------------------ states
    def add_state(self, name: str, default: Any, merge: MergeRule = "sum") -> None:
        """Register state ``name`` with its initial value and merge rule ("sum", "equal" or a callable)."""
        if isinstance(merge, str):
            if merge not in _RULES:
                raise ValueError(f"merge must be one of {sorted(_RULES)} or a callable, got {merge!r}.")
            merge = _RULES[merge]
        self._defaults[name] = default
        self._merge_rules[name] = merge
        setattr(self, name, copy.deepcopy(default))

    @property
    def update_count(self) -> int:
        """How many times ``update`` has run since construction or the last ``reset``."""
        return self._update_count

    def state(self) -> dict[str, Any]:
        """The registered states by name."""
        return {name: getattr(self, name) for name in self._defaults}

    # ------------------------------------------------------------------ the three verbs
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Fold one chunk of data into the states (see the subclass's ``_update``)."""
        self._computed = None
        self._update(*args, **kwargs)
        self._update_count += 1

    def compute(self) -> Any:
        """The value over everything seen so far (cached until the next update, merge or reset)."""
        if self._update_count == 0:
            warnings.warn(f"{type(self).__name__}.compute() was called before any update(); "
                          "feed it data first.", UserWarning, stacklevel=2)
        if self._computed is None:
            self._computed = self._compute()
        return self._computed

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other``'s states into this accumulator (as if it had seen ``other``'s data); returns self."""
        if type(other) is not type(self):
            raise TypeError(f"Cannot merge a {type(other).__name__} into a {type(self).__name__}.")
        for name, rule in self._merge_rules.items():
            setattr(self, name, rule(getattr(self, name), getattr(other, name)))
        self._update_count += other._update_count
        self._computed = None
        return self

    def reset(self) -> None:
        """Back to the initial states."""
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))
        self._update_count = 0
        self._computed = None

    def to(self, device: str | torch.device) -> Accumulator:
        """Move every tensor state to ``device``; returns self."""
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(move(v) for v in value)
            return value

        for name in self._defaults:
            setattr(self, name, move(getattr(self, name)))
        self._computed = None
        return self

    @abstractmethod
    def _update(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def _compute(self) -> Any: ...
