"""The shape shared by every kernel-alignment measure.

CKA, debiased CKA, RBF CKA, minibatch CKA and dCKA all have the form

    S(A, B) = ⟨v(A), w(B)⟩ / √(⟨v(A), w(A)⟩ · ⟨v(B), w(B)⟩)

for per-layer vectors v, w derived from one layer's Gram matrix. ``prepare``
functions return those vectors already divided by the square root of the
layer's self-product, so the whole L_A × L_B matrix is one matrix product of
stacked vectors, computed on the device and copied to the host once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CANCELLATION_RTOL", "UNDEFINED_RTOL", "Prepared", "PreparedLayers", "SharedProducts", "bilinear_matrix",
           "normalized"]

# A self-product below UNDEFINED_RTOL · (its uncentred magnitude) is round-off, not signal: float64
# centring leaves |HKH|² ≈ (n·eps)²·|K|² ≈ 1e-26·|K|² for a constant layer, while a genuine
# variance at float32 resolution (relative 1e-7 of the mean) still gives ≈ 1e-14·|K|².
UNDEFINED_RTOL = 1e-20
# Song et al.'s unbiased HSIC is a difference of terms of size ‖HKH‖², so its round-off is first order:
# a value below CANCELLATION_RTOL · ‖HKH‖² / n² is zero (a layer that differs from a constant in one
# sample has HSIC₁(K, K) = 0 exactly), while genuine values are ≳ ‖HKH‖² / (n² (1 + p/n)).
CANCELLATION_RTOL = 1e-10


@dataclass
class Prepared:
    """One layer's statistic, ready for pairing.

    Attributes
    ----------
    left, right : Tensor
        1-D float64 vectors; S[i, j] = ⟨left_i, right_j⟩ (``right`` may be ``left``).
    defined : bool
        False when the measure is mathematically undefined for this layer
        (zero variance, negative unbiased self-HSIC); ``reason`` says why.
    extras : dict
        Per-layer by-products worth reporting (dCKA's variance explained...).
    """

    left: torch.Tensor
    right: torch.Tensor
    defined: bool = True
    reason: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


def normalized(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, what: str,
               extras: dict[str, Any] | None = None,
               zero_reason: str = "the layer is constant over samples") -> Prepared:
    """Divide by √⟨left, right⟩ in place; mark undefined when that self-product is not clearly positive.

    ``left`` and ``right`` must be vectors the caller made for this layer (they are overwritten).

    ``scale`` is a magnitude of the unnormalised statistic (for example ‖K‖²)
    that sets the round-off threshold: a self-product below ``UNDEFINED_RTOL · scale``
    is treated as zero.
    """
    self_product = torch.dot(left, right)
    value, magnitude = torch.stack([self_product, torch.as_tensor(scale, dtype=self_product.dtype,
                                                                  device=self_product.device)]).tolist()  # one sync
    tolerance = UNDEFINED_RTOL * magnitude
    if not value > tolerance:
        reason = (
            f"{what} is zero: {zero_reason}" if abs(value) <= tolerance
            else f"{what} is negative ({value:.3g})"
        )
        return Prepared(left, right, defined=False, reason=reason, extras=extras or {})
    norm = torch.sqrt(self_product)
    left.div_(norm)  # in place: the vectors are the caller's own (n² each; a fresh copy costs page faults)
    if right is not left:
        right.div_(norm)
    return Prepared(left, right, extras=extras or {})


class PreparedLayers(list):
    """The prepared layers of one store, with their vectors stacked once for every pair they enter.

    When every item is a ``Prepared`` with vectors of one length, ``left`` (and ``right`` when it
    is not ``left``) are stacked into one (n_layers, length) matrix at construction and each item's
    vectors become views of its rows, so memory is not doubled and ``bilinear_matrix`` does not copy
    the vectors again for each of the store's pairs. Other items are kept as a plain list.

    ``out``: (left, right) row blocks of a ``SharedProducts`` to stack into (``right`` may be ``left``).
    """

    def __init__(self, items: Sequence[Any], out: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(items)
        self.stacked: dict[str, torch.Tensor] = {}
        self.shared: tuple[SharedProducts, int] | None = None  # (products, first row), see SharedProducts
        if not self.stackable(self):
            return
        same = all(p.right is p.left for p in self)
        if out is not None and (len(out[0]), out[0].shape[1:], out[0].dtype, out[0].device) == (
                len(self), self[0].left.shape, self[0].left.dtype, self[0].left.device) and same == (out[1] is out[0]):
            self.stacked["left"] = torch.stack([p.left for p in self], out=out[0])
            self.stacked["right"] = out[0] if same else torch.stack([p.right for p in self], out=out[1])
        else:
            self.stacked["left"] = torch.stack([p.left for p in self])
            self.stacked["right"] = self.stacked["left"] if same else torch.stack([p.right for p in self])
        for k, p in enumerate(self):
            p.left = self.stacked["left"][k]
            p.right = p.left if same else self.stacked["right"][k]

    @staticmethod
    def stackable(items: Sequence[Any]) -> bool:
        """Every item a ``Prepared`` with vectors of one shape, dtype and device."""
        return bool(items) and all(isinstance(p, Prepared) for p in items) and len(
            {(p.left.shape, p.left.dtype, p.left.device) for p in items}
            | {(p.right.shape, p.right.dtype, p.right.device) for p in items}) == 1


class SharedProducts:
    """⟨left_a, right_b⟩ for every layer a and b of several stores, as one matrix product.

    Pairing stores one by one multiplies an L_i × length block by an L_j × length block per pair:
    memory-bound, each store's vectors (n² floats per layer) read once per pair it enters. Stacked
    into one (Σ L) × length matrix (``block``) they are read once by a single product (``compute``),
    and ``bilinear_matrix`` of two stores of the group is a slice of it. Same values up to the
    summation order of the dot products (≈ 1e-13 for n = 1024: n² terms each).
    """

    def __init__(self, total_rows: int, first: PreparedLayers) -> None:
        like = first.stacked["left"]
        self.same = first.stacked["right"] is like
        self.left = torch.empty((total_rows, like.shape[1]), dtype=like.dtype, device=like.device)
        self.right = self.left if self.same else torch.empty_like(self.left)
        self.rows = 0
        self.products: torch.Tensor | None = None

    def block(self, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n_layers`` rows of (left, right), to stack one store into (``PreparedLayers(out=)``)."""
        a, b = self.rows, self.rows + n_layers
        left = self.left[a:b]
        return left, left if self.same else self.right[a:b]

    def add(self, layers: PreparedLayers) -> bool:
        """Take ``layers`` into the group (True) when they were stacked into ``block``'s rows."""
        left = layers.stacked.get("left")
        if left is None or len(left) > len(self.left) - self.rows or left.data_ptr() != self.left[self.rows].data_ptr():
            return False
        layers.shared = (self, self.rows)
        self.rows += len(layers)
        return True

    def compute(self) -> None:
        self.products = self.left[: self.rows] @ self.right[: self.rows].T


def _stacked(items: Sequence[Prepared], side: str) -> torch.Tensor:
    if isinstance(items, PreparedLayers) and side in items.stacked:
        return items.stacked[side]
    return torch.stack([getattr(p, side) for p in items])


def bilinear_matrix(rows: Sequence[Prepared], cols: Sequence[Prepared],
                    clamp: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """S[i, j] = ⟨rows[i].left, cols[j].right⟩ as one matrix product; NaN where undefined."""
    shared_rows, shared_cols = getattr(rows, "shared", None), getattr(cols, "shared", None)
    if (shared_rows is not None and shared_cols is not None and shared_rows[0] is shared_cols[0]
            and shared_rows[0].products is not None):
        (group, a), (_, b) = shared_rows, shared_cols
        matrix = group.products[a:a + len(rows), b:b + len(cols)].clone()
    else:
        matrix = _stacked(rows, "left") @ _stacked(cols, "right").T
    if clamp is not None:
        matrix = matrix.clamp(*clamp)
    undefined_rows = [i for i, p in enumerate(rows) if not p.defined]
    undefined_cols = [j for j, p in enumerate(cols) if not p.defined]
    if undefined_rows:
        matrix[undefined_rows, :] = float("nan")
    if undefined_cols:
        matrix[:, undefined_cols] = float("nan")
    return matrix
