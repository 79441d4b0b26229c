"""The sketch statistic of a layer (``measure.functional.sketch``), streamed from its store.

The store's chunks run along samples: each row block is read once (the next one read ahead on a
thread) and hashed into the two (n_samples, min(p, width)) matrices Z₁, Z₂
(``FeatureHashing``); once every row is in, Z is checked for NaN/Inf (naming the samples), centred
and TensorSketched. The working memory is
16 · n · min(p, d) bytes for Z (8 · n · p when the layer is not hashed, p ≤ d), at most
``FFT_BLOCK_ELEMENTS`` × 40 bytes (80 MiB) of stage-2 temporaries, 2 × ``HASH_BLOCK`` feature
hashes (2 MiB) and the row block being read — nothing that grows with p beyond that block.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.store import ActivationStore

from ..functional.sketch import FFT_BLOCK_ELEMENTS, HASH_BLOCK, FeatureHashing, sketch_from_hashing
from ..validation import check_finite
from .streaming import _chunk_rows, _features_bytes, iter_row_blocks

__all__ = ["SKETCH_FIXED_BYTES", "layer_sketch", "sketch_working_bytes"]


def _block_rows(store: ActivationStore, layer: str, memory_budget: int) -> int:
    """Rows read at once: whole chunks, about a sixth of ``memory_budget`` of float64 features (one chunk at least)."""
    chunk = _chunk_rows(store, layer)
    per_row = max(1, _features_bytes(store, layer))
    return max(chunk, (memory_budget // 6) // per_row // chunk * chunk)


def layer_sketch(store: ActivationStore, layer: str, device: torch.device, memory_budget: int,
                 sketch_size: int, width: int, seed: int) -> torch.Tensor:
    """The (2, sketch_size + 1) float64 sketch statistic of ``layer`` of ``store``, on ``device``."""
    n = store.n_samples
    p = int(np.prod(store.layer_shape(layer), dtype=np.int64))
    hashing = FeatureHashing(n, p, width, seed, device)
    rows = _block_rows(store, layer, memory_budget)
    for offset, block in iter_row_blocks(store, layer, 0, n, rows, device, check=False):
        hashing.update(offset, block)
    # a NaN or Inf in row i of X makes row i of Z₁ non-finite (sums keep NaN, and Inf turns Z's entry into
    # ±Inf or NaN), so checking Z names the same samples as checking every block, on n · d values, not n · p
    for copy in hashing.z:
        check_finite(copy, f"layer {layer!r} of {store}")
    return sketch_from_hashing(hashing, sketch_size, seed)


def sketch_working_bytes(n_samples: int, n_features: int, width: int) -> int:
    """Bytes of Z while a layer is sketched: the part of the working memory that grows with the data
    (the stage-2 temporaries and the feature hashes add at most ``SKETCH_FIXED_BYTES``)."""
    return 8 * n_samples * (2 * width if n_features > width else n_features)


SKETCH_FIXED_BYTES = 40 * FFT_BLOCK_ELEMENTS + 2 * 16 * HASH_BLOCK  # 82 MiB: FFT or Gram-row blocks, hashes
