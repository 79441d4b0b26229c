"""Feature-route statistics streamed from stores: each layer's own moments, and a pair's cross moments.

Linear CKA from moments (``measure.functional.moments``) needs, per layer, its shifted sums Σz, ZᵀZ and
the fourth-order sums, and per pair of stores the cross products ZᵢᵀWⱼ. The first are a layer's own
(``layer_self_moments``: formed once per run, cached like a Gram), the second a pair's
(``pair_cross_moments``). Both read the rows in blocks of whole store chunks (about 2,048 rows), the next
block read on a background thread while the products run, in the precision chosen: float32 products of
float32 blocks summed into float64 (``"float32"``), or float64 throughout.

Each layer is shifted by the mean of its first block (CKA is translation invariant; the shift keeps the
float sums of large-mean activations from cancelling). The shift is kept with the layer's own moments
and reused by every pair, so both see the same shifted rows, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from extract.store import ActivationStore

from ..functional.moments import cross_moments, pack_self_moments, self_moments, unpack_self_moments
from .streaming import DEFAULT_MEMORY_BUDGET, _check_gram_diagonal, _chunk_rows, _dtype, _what, iter_row_blocks

__all__ = ["FEATURE_BLOCK_ROWS", "feature_block_rows", "layer_self_moments", "pair_cross_moments"]

FEATURE_BLOCK_ROWS = 2048  # rows per product: large enough for the GEMM rate, small enough to overlap the reads


def feature_block_rows(store: ActivationStore, bytes_per_row: int, memory_budget: int) -> int:
    """Rows per block: whole store chunks, about ``FEATURE_BLOCK_ROWS``, fewer when ``memory_budget`` says so.

    ``bytes_per_row``: what one row of every layer read together costs (the block, its read-ahead copy).
    """
    n, chunk = store.n_samples, _chunk_rows(store, None)
    rows = chunk * max(1, -(-FEATURE_BLOCK_ROWS // chunk))
    cap = memory_budget // max(1, bytes_per_row)
    if rows > cap:
        rows = cap // chunk * chunk if cap >= chunk else cap
    return max(1, min(n, rows))


def layer_self_moments(store: ActivationStore, layer: str, device: torch.device, precision: str = "float64",
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """One layer's own moments (``pack_self_moments``: its shift, Σz, ZᵀZ, Σa, Σa², Σaz) over all samples.

    The shift is the mean of the first block, rounded to the precision's dtype. A non-finite value in the
    layer is named by sample (a rescan, only when ZᵀZ's diagonal is not finite).
    """
    dtype = _dtype(precision)
    n = store.n_samples
    width = int(np.prod(store.layer_shape(layer), dtype=np.int64))
    rows = feature_block_rows(store, 2 * width * dtype.itemsize, memory_budget)
    shift, total = None, None
    for _, x in iter_row_blocks(store, layer, 0, n, rows, device, check=False, dtype=dtype):
        if shift is None:
            shift = x.mean(dim=0, dtype=torch.float64).to(dtype)
        total = self_moments(x.sub_(shift), out=total)
    _check_gram_diagonal(total["g"], lambda: iter_row_blocks(store, layer, 0, n, rows, device, check=False),
                         _what(store, layer), precision)
    return pack_self_moments(shift, total)


def pair_cross_moments(stores: tuple[ActivationStore, ActivationStore], layers: tuple[Sequence[str], Sequence[str]],
                       selfs: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]], precisions: tuple[str, str],
                       device: torch.device, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                       terms: str = "products") -> dict[str, torch.Tensor]:
    """The cross moments (``cross_moments``, ``terms``) of two stores' layers over all samples, in one pass
    over both.

    ``selfs``: each layer's packed own moments (``layer_self_moments``), whose shifts are reused;
    ``precisions``: the precision each store's own moments were formed in. The products are float32 when both
    are, float64 otherwise. A store paired with itself (the same store and layers) is read once.
    """
    same = stores[0] is stores[1] and list(layers[0]) == list(layers[1])
    sides = (0,) if same else (0, 1)
    dtypes = [_dtype(p) for p in precisions]
    product = torch.float32 if all(d == torch.float32 for d in dtypes) else torch.float64
    widths = [[int(np.prod(stores[k].layer_shape(layer), dtype=np.int64)) for layer in layers[k]] for k in sides]
    rows = feature_block_rows(stores[0], 2 * 8 * sum(map(sum, widths)), memory_budget)
    n = stores[0].n_samples
    shifts = [[unpack_self_moments(flat)[0].to(dtypes[k]) for flat in selfs[k]] for k in sides]
    readers = [iter_row_blocks(stores[k], layer, 0, n, rows, device, check=False, dtype=dtypes[k])
               for k in sides for layer in layers[k]]
    total = None
    for blocks in zip(*readers, strict=True):
        zs = [x.sub_(c).to(product) for (_, x), c in zip(blocks, [c for k in sides for c in shifts[k]], strict=True)]
        split = len(layers[0])
        total = cross_moments(zs[:split], None if same else zs[split:], terms, out=total)
    return total
