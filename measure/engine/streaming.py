"""Per-layer statistics streamed from an ``ActivationStore``.

The Gram matrix K = X Xᵀ (float64, n × n) of a layer is built from row blocks
of X: when the layer fits the memory budget it is read once (chunk by chunk,
the next chunk read on a background thread while the device works) and
multiplied once; otherwise K is assembled block by block, K[a, b] = X_a X_bᵀ,
holding one row block while the later rows stream past (``gram_block_rows``),
so peak memory is the budget plus K itself.
Every block is checked for NaN/Inf on the device with one host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from extract.store import ActivationStore

from ..errors import MeasureError
from ..functional.gram import column_means, cross_gram, linear_gram
from ..validation import check_finite

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "iter_row_blocks",
    "layer_features",
    "layer_gram",
    "layer_gram_blocks",
    "layer_grams",
]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of float64 features held at once


def _chunk_rows(store: ActivationStore, layer: str | None) -> int:
    chunk = store.info.chunk_samples or store.n_samples
    return max(1, min(chunk, store.n_samples))


def _what(store: ActivationStore, layer: str | None) -> str:
    return f"layer {layer!r} of {store}" if layer is not None else f"the inputs of {store}"


def iter_row_blocks(store: ActivationStore, layer: str | None, start: int, stop: int, rows: int,
                    device: torch.device, *, check: bool = True,
                    dtype: torch.dtype = torch.float64) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, block on ``device`` in ``dtype``) for rows start:stop, reading one block ahead on a thread.

    ``layer=None`` reads the stored inputs. ``check=False`` skips the per-block NaN/Inf check
    (``layer_gram`` checks the Gram's diagonal instead, which is cheaper and equivalent).
    """
    what = _what(store, layer)

    def read(a: int) -> np.ndarray:
        b = min(stop, a + rows)
        return store.read_layer(layer, a, b) if layer is not None else store.read_inputs(a, b)

    offsets = list(range(start, stop, rows))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, offsets[0]) if offsets else None
        for i, offset in enumerate(offsets):
            array = pending.result()
            pending = pool.submit(read, offsets[i + 1]) if i + 1 < len(offsets) else None
            block = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            block = block.reshape(len(block), -1).to(dtype)
            if check:
                check_finite(block, what, offset)
            yield offset, block


def _features_bytes(store: ActivationStore, layer: str | None) -> int:
    shape = store.layer_shape(layer) if layer is not None else tuple(store.info.input_shape)
    return int(np.prod(shape, dtype=np.int64)) * 8


GATHER_STAGING_BYTES = 32 << 20  # stored bytes decoded per read when the rows must be converted


def _gather(store: ActivationStore, layer: str | None, start: int, stop: int, chunk: int,
            device: torch.device, check: bool = True, dtype: torch.dtype = torch.float64,
            buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start:stop as one (rows, n_features) tensor in ``dtype``, in ``buffer`` when it is given.

    ``buffer``: flat, of ``dtype`` on ``device``, at least rows × n_features long (a freed layer's
    memory: writing into fresh memory costs a page fault per 4 KiB, about half the read time).

    When the stored dtype is ``dtype`` and the device the CPU (float32 stores measured in float32),
    the rows are decoded straight into the result in one read. Otherwise they are read in whole
    chunks of about 32 MiB into one reused staging buffer and converted into the result.
    (One read per chunk into fresh arrays cost 2-3x the decode time on the benchmark's zoo.)
    """
    key = store.array_key(layer)
    shape = tuple(store.array_shape(key)[1:])
    stored = np.dtype(store.array_dtype(key))
    width = int(np.prod(shape, dtype=np.int64))
    if buffer is not None and buffer.numel() >= (stop - start) * width:
        out = buffer[: (stop - start) * width].view(stop - start, width)
    else:
        out = torch.empty((stop - start, width), dtype=dtype, device=device)
    what = _what(store, layer)
    if device.type == "cpu" and stored.kind == "f" and torch.from_numpy(np.empty(0, stored)).dtype == dtype:
        if stop > start:
            store.read(key, start, stop, out.numpy().reshape(stop - start, *shape))
            if check:
                check_finite(out, what, start)
        return out
    rows = max(chunk, GATHER_STAGING_BYTES // max(1, width * stored.itemsize) // chunk * chunk)
    staging = np.empty((min(rows, stop - start), *shape), stored)
    for a in range(start, stop, rows):
        b = min(stop, a + rows)
        block = torch.from_numpy(store.read(key, a, b, staging[: b - a]).reshape(b - a, width))
        target = out[a - start: b - start]
        target.copy_(block)
        if check:
            check_finite(target, what, a)
    return out


def layer_features(store: ActivationStore, layer: str | None, device: torch.device, *,
                   dtype: torch.dtype = torch.float64, check: bool = True,
                   buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The whole (n_samples, n_features) matrix of ``layer`` (or of the inputs, layer=None), in ``dtype``.

    ``check=False`` skips the per-block NaN/Inf check (for callers that check the Gram instead).
    ``buffer``: memory to reuse, as in ``_gather``.
    """
    return _gather(store, layer, 0, store.n_samples, _chunk_rows(store, layer), device, check=check, dtype=dtype,
                   buffer=buffer)


def gram_block_rows(n: int, chunk: int, per_row: int, memory_budget: int) -> tuple[int, int]:
    """(rows of the held block A, rows of each streamed block B) for an out-of-core Gram.

    ``per_row`` is the float64 bytes of one sample's features. A streamed block costs about twice
    its float64 size (the decoded block, its float64 copy, the next block read ahead), so B gets
    one sixth of the budget and A what is left after reading costs (two chunks), in whole chunks
    so that reads stay aligned. ``A >= n`` means the layer fits and is read once.
    """
    overhead = 2 * chunk * per_row
    if n * per_row + overhead <= memory_budget:
        return n, n
    b_rows = max(chunk, (memory_budget // 6) // per_row // chunk * chunk)
    a_rows = max(chunk, (memory_budget - overhead - 2 * b_rows * per_row) // per_row // chunk * chunk)
    return a_rows, b_rows


def _check_gram_diagonal(gram: torch.Tensor, rows: Callable[[], Iterator[tuple[int, torch.Tensor]]],
                         what: str, precision: str) -> None:
    """Raise naming the samples when K = X Xᵀ is not finite (one host sync when it is).

    In float64 K[i, i] = Σⱼ x_ij² is NaN or Inf exactly when row i of X holds a NaN or an Inf
    (float32 inputs cannot overflow it). A float32 Gram mixes every row through the column
    means, so a non-finite diagonal rescans X (``rows()``) to name the bad samples; finding
    none there means the float32 products overflowed.
    """
    if bool(torch.isfinite(torch.diagonal(gram)).all()):
        return
    for offset, block in rows():
        check_finite(block, what, offset)
    if precision == "float32":
        raise MeasureError(
            f"The Gram of {what} overflows in float32 products (activations beyond ~1e17 in magnitude); "
            "measure with precision='float64' (--precision float64)."
        )
    raise MeasureError(f"The Gram of {what} overflows float64 (activations beyond ~1e154 in magnitude); "
                       "rescale the layer before measuring.")


def _dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "float32" else torch.float64


def layer_gram(store: ActivationStore, layer: str | None, device: torch.device,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, precision: str = "float64",
               features: torch.Tensor | None = None) -> torch.Tensor:
    """K = X Xᵀ in float64 on ``device``, holding about ``memory_budget`` bytes of X at once.

    ``precision="float32"`` forms the products in float32 after a float64 shift by the column
    means (``linear_gram``); K is float64 either way.
    Out of core, K is filled block by block, K[A, B] = X_A X_Bᵀ: a block A of rows is held
    while the rows after it stream past in blocks B, so X is read about n / |A| times and the
    peak memory is the budget plus K itself (n² float64), whatever the store's size. In float32
    the shift is the column means of the first block A (the identity behind it holds for any
    shift; means of a block are close enough to keep the shifted values small).
    ``features``: the layer's rows already read (``layer_grams`` reads ahead), for a layer that fits.
    """
    n = store.n_samples
    chunk = _chunk_rows(store, layer)
    per_row = max(1, _features_bytes(store, layer))
    a_rows, b_rows = gram_block_rows(n, chunk, per_row, memory_budget)
    dtype = _dtype(precision)
    what = _what(store, layer)

    def rescan() -> Iterator[tuple[int, torch.Tensor]]:
        return iter_row_blocks(store, layer, 0, n, chunk, device, check=False)

    if a_rows >= n:
        if features is None:
            features = layer_features(store, layer, device, dtype=dtype, check=False)
        gram = linear_gram(features, precision)
        del features
        _check_gram_diagonal(gram, rescan, what, precision)
        return gram
    gram = torch.empty((n, n), dtype=torch.float64, device=device)
    shift = None
    for a0 in range(0, n, a_rows):
        a1 = min(n, a0 + a_rows)
        xa = _gather(store, layer, a0, a1, chunk, device, check=False, dtype=dtype)
        if shift is None and precision == "float32":
            shift = column_means(xa)
        gram[a0:a1, a0:a1] = linear_gram(xa, precision, shift)
        for b0, xb in iter_row_blocks(store, layer, a1, n, b_rows, device, check=False, dtype=dtype):
            b1 = b0 + len(xb)
            cross = cross_gram(xa, xb, precision, shift)
            gram[a0:a1, b0:b1] = cross
            gram[b0:b1, a0:a1] = cross.T
            del xb, cross
        del xa
    _check_gram_diagonal(gram, rescan, what, precision)
    return gram


def _fits(store: ActivationStore, layer: str, memory_budget: int) -> bool:
    """Whether ``layer_gram`` reads the layer once (in core) under ``memory_budget``."""
    per_row = max(1, _features_bytes(store, layer))
    return gram_block_rows(store.n_samples, _chunk_rows(store, layer), per_row, memory_budget)[0] >= store.n_samples


def layer_grams(jobs: Sequence[tuple[ActivationStore, str]], device: torch.device,
                memory_budget: int = DEFAULT_MEMORY_BUDGET, precision: str = "float64") -> Iterator[torch.Tensor]:
    """``layer_gram`` of each (store, layer) in order, reading the next layer while this one is multiplied.

    The next layer is read ahead on a background thread only when both layers' features fit the
    budget together, so the peak memory stays within ``memory_budget`` plus the Grams.
    """
    dtype = _dtype(precision)

    def size(k: int) -> int:  # float64 bytes: in float32 the layer and its shifted copy
        store, layer = jobs[k]
        return store.n_samples * _features_bytes(store, layer)

    def read(k: int, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's features, the whole memory they live in, to hand to a later read)."""
        features = layer_features(*jobs[k], device, dtype=dtype, check=False, buffer=buffer)
        reused = buffer is not None and features.data_ptr() == buffer.data_ptr()
        return features, buffer if reused else features.reshape(-1)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead: tuple[int, Any] | None = None
        spare: torch.Tensor | None = None  # the last layer's memory (flat), refilled by the next read
        for k, (store, layer) in enumerate(jobs):
            features, memory = ahead[1].result() if ahead is not None and ahead[0] == k else (None, None)
            ahead = None
            if (k + 1 < len(jobs) and _fits(store, layer, memory_budget) and _fits(*jobs[k + 1], memory_budget)
                    and size(k) + size(k + 1) <= memory_budget):
                reuse = spare is not None and size(k + 1) <= 8 * spare.numel() <= memory_budget - size(k)
                ahead = (k + 1, pool.submit(read, k + 1, spare if reuse else None))
            spare = None
            yield layer_gram(store, layer, device, memory_budget, precision, features=features)
            spare, features, memory = memory, None, None


def layer_gram_blocks(store: ActivationStore, layer: str, batch_size: int,
                      device: torch.device, precision: str = "float64") -> list[torch.Tensor]:
    """Grams of consecutive batches of ``batch_size`` samples (a final partial batch is dropped).

    ``precision`` as in ``layer_gram``; in float32 each batch is shifted by its own column means.
    """
    n_full = (store.n_samples // batch_size) * batch_size
    what = _what(store, layer)
    grams = []
    for offset, block in iter_row_blocks(store, layer, 0, n_full, batch_size, device, check=False,
                                         dtype=_dtype(precision)):
        gram = linear_gram(block, precision)
        _check_gram_diagonal(gram, lambda rows=((offset, block),): iter(rows), what, precision)
        grams.append(gram)
    return grams


def layer_widths(store: ActivationStore, layers: Sequence[str]) -> list[int]:
    """Flattened feature count of each layer."""
    return [int(np.prod(store.layer_shape(layer), dtype=np.int64)) for layer in layers]
