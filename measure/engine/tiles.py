"""All-pairs measures of a zoo in tiles, within a memory budget.

The engine's all-pairs products have one row per (store, layer) of the run: for a bilinear
measure (the CKA family, dCKA) the whole zoo is one matrix product of stacked per-layer vectors
(``SharedProducts``), and every pair of stores is a slice of it. When the prepared layers of the
whole zoo do not fit the memory budget, the rows are taken in blocks instead:

- a *row block* of consecutive rows is prepared and held;
- every later row is then prepared once more, in *column blocks* of the same size, and each
  (row block, column block) tile gives both orientations of the pairs it covers;
- the next row block starts after the last row of the previous one.

With T row blocks, row r of row block k is prepared 1 + k times (once as a row, once as a
column of every earlier row block): at most T times, (T + 1) / 2 on average. Each preparation
reads the layer's statistic (its Gram) from memory, the statistics cache or the store. Only a
row block, a column block and one layer being prepared are held at once, so the memory is
``2 · (block bytes) + transient`` whatever the number of stores.

Values: a tile forms the same dot products as the untiled product, as smaller matrix
products. BLAS may sum a dot product in another order for another matrix shape, so tiled
and untiled values agree to the round-off of an n²-term float64 dot product of unit vectors
(≲ n² · 2⁻⁵³ ≈ 1e-10 at n = 10⁴, far less in practice); measures that are not bilinear
(Procrustes, the CCA family...) compute each pair exactly as untiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import MeasureError
from ..functional._bilinear import Prepared

__all__ = ["Row", "plan_budget", "prepared_bytes", "tiled_pair_matrices"]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the all-pairs product: layer ``k`` (index into the store's layers) of store ``s``."""

    s: int
    k: int


def prepared_bytes(item: Any) -> int:
    """Bytes of the tensors a prepared layer holds (each distinct tensor counted once)."""
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if not dataclasses.is_dataclass(item):
        return 0
    seen: set[int] = set()
    total = 0
    for f in dataclasses.fields(item):
        value = getattr(item, f.name)
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
            seen.add(value.untyped_storage().data_ptr())
            total += value.numel() * value.element_size()
    return total


def plan_budget(row_bytes: int, transient: int, memory_budget: int) -> int:
    """Bytes for each of the row and column blocks: half the budget left after ``transient``.

    Raises ``MeasureError`` naming the smallest budget that works when not even one row fits.
    """
    half = (memory_budget - transient) // 2
    if half < row_bytes:
        smallest = np.ceil((2 * row_bytes + transient) / GiB * 100) / 100
        raise MeasureError(
            f"--memory-budget {memory_budget / GiB:.3g} GiB is too small for one tile of the all-pairs products: "
            f"one prepared layer takes {row_bytes / GiB:.3g} GiB, and a tile holds a row and a column layer plus "
            f"{transient / GiB:.3g} GiB while preparing one. Use --memory-budget {smallest:.2f} "
            "or more (memory_budget=... in the Python API)."
        )
    return half


class _Block:
    """Prepared rows held together; ``Prepared`` vectors copied into one preallocated matrix each."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.items: list[Any] = []
        self.bytes = 0
        self.left: torch.Tensor | None = None
        self.right: torch.Tensor | None = None

    def add(self, row: Row, item: Any, capacity: int) -> None:
        if isinstance(item, Prepared):
            if self.left is None:
                self.left = item.left.new_empty((capacity, *item.left.shape))
                self.right = self.left if item.right is item.left else item.left.new_empty(self.left.shape)
            k = len(self.items)
            self.left[k].copy_(item.left)
            same = item.right is item.left
            item.left = self.left[k]
            if same and self.right is self.left:
                item.right = item.left
            else:
                self.right[k].copy_(item.right)
                item.right = self.right[k]
        self.rows.append(row)
        self.items.append(item)
        self.bytes += prepared_bytes(item)

    def release(self) -> None:
        self.rows, self.items, self.left, self.right = [], [], None, None


class _Tile:
    """The products of a row block and a column block, sliced like ``SharedProducts`` for ``bilinear_matrix``."""

    def __init__(self, a: _Block, b: _Block | None) -> None:
        blocks = [a] if b is None else [a, b]
        self.offsets = {id(block): sum(len(x.rows) for x in blocks[:i]) for i, block in enumerate(blocks)}
        size = sum(len(x.rows) for x in blocks)
        self.products: torch.Tensor | None = None
        if a.left is None or (b is not None and b.left is None):
            return
        left = a.left[: len(a.rows)]
        right = a.right[: len(a.rows)]
        if b is None:
            self.products = left @ right.T
            return
        self.products = torch.full((size, size), float("nan"), dtype=left.dtype, device=left.device)
        na = len(a.rows)
        self.products[:na, na:] = left @ b.right[: len(b.rows)].T
        self.products[na:, :na] = b.left[: len(b.rows)] @ right.T

    def layers(self, block: _Block, s: int) -> _TileLayers:
        """Store ``s``'s prepared layers in ``block``, viewing this tile's products when it has them."""
        picked = [(k, item) for k, (row, item) in enumerate(zip(block.rows, block.items, strict=True)) if row.s == s]
        out = _TileLayers(item for _, item in picked)
        if self.products is not None and picked and picked[-1][0] - picked[0][0] == len(picked) - 1:
            out.shared = (self, self.offsets[id(block)] + picked[0][0])
        return out


class _TileLayers(list):
    """Prepared layers of one store within a tile (``shared``: their rows of the tile's products, as
    ``PreparedLayers.shared`` for ``bilinear_matrix``); the vectors stay in their block's matrix."""

    shared: tuple[_Tile, int] | None = None


def tiled_pair_matrices(
    rows: Sequence[Row],
    prepare: Callable[[Row], Any],
    pair_matrix: Callable[[Sequence[Any], Sequence[Any]], torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    layer_counts: Sequence[int],
    block_bytes: int,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[tuple[int, int], np.ndarray]:
    """The L_i × L_j matrix of every pair (i, j) of ``pairs``, computed tile by tile.

    Parameters
    ----------
    rows : sequence of Row
        Every (store, layer) of the stores in ``pairs``, each store's layers consecutive and in order.
    prepare : callable(Row) -> prepared layer
        The measure's per-layer object of a row (read from memory, the cache or the store).
    pair_matrix : callable(rows, cols) -> Tensor
        The measure's ``pair_matrix``.
    pairs : sequence of (int, int)
        Ordered store pairs wanted.
    layer_counts : sequence of int
        Layers of each store (indexed by store).
    block_bytes : int
        Bytes of prepared layers in each block (``plan_budget``).
    progress : callable(str)
        Told about each tile.

    Returns
    -------
    dict of (i, j) -> ndarray of shape (layer_counts[i], layer_counts[j]), float64
    """
    wanted = set(pairs)
    out = {(i, j): np.full((layer_counts[i], layer_counts[j]), np.nan) for i, j in wanted}
    capacity = 1

    pending: dict[int, Any] = {}  # a row prepared past a full block: the first row of the next column block

    def fill(start: int) -> tuple[_Block, int]:
        nonlocal capacity
        block = _Block()
        r = start
        while r < len(rows):
            item = pending.pop(r) if r in pending else prepare(rows[r])
            size = prepared_bytes(item)
            if not block.rows:
                capacity = max(1, block_bytes // max(1, size))
            if block.rows and (block.bytes + size > block_bytes or len(block.rows) == capacity):
                pending[r] = item
                break
            block.add(rows[r], item, capacity)
            r += 1
        return block, r

    def pair_up(tile: _Tile, a: _Block, b: _Block) -> None:
        for i in dict.fromkeys(row.s for row in a.rows):
            for j in dict.fromkeys(row.s for row in b.rows):
                if (i, j) not in wanted:
                    continue
                ra, cb = tile.layers(a, i), tile.layers(b, j)
                ks = [row.k for row in a.rows if row.s == i]
                ls = [row.k for row in b.rows if row.s == j]
                matrix = pair_matrix(ra, cb).detach().to("cpu", torch.float64).numpy()
                out[i, j][np.ix_(ks, ls)] = matrix

    start = 0
    while start < len(rows):
        row_block, col_start = fill(start)
        tile = _Tile(row_block, None)
        pair_up(tile, row_block, row_block)
        progress(f"tile rows {start}-{col_start - 1}")
        while col_start < len(rows):
            col_block, next_start = fill(col_start)
            tile = _Tile(row_block, col_block)
            pair_up(tile, row_block, col_block)
            pair_up(tile, col_block, row_block)
            col_block.release()
            col_start = next_start
        start = start + len(row_block.rows)
        pending.clear()  # the next row block starts at a row prepared before; prepared again
        row_block.release()
    return out
