"""Captured activations: held in memory under a budget, spilled to temporary Zarr stores beyond it.

``SpillingCapture`` receives, batch by batch, the flattened inputs and each model's layer outputs
(NumPy arrays in the dtype they are stored in) and builds one complete store per model:

* while everything received fits ``hold_bytes``, the rows are held in memory and become
  ``MemoryStore``s;
* once the next batch would pass it, a temporary folder (``tempfile.TemporaryDirectory``) gets one
  ``ZarrStore`` per model, in the format ``extract`` writes. The rows held so far go to a
  background ``ChunkWriter`` per store and are dropped as they are written; every later batch
  follows them. The engine then streams those stores chunk by chunk like any other, so memory
  no longer grows with the number of samples.

The sample count is not known while rows arrive (a loader need not have a length), so spilled
arrays are created with room for ``CAPACITY`` rows, which costs nothing (Zarr writes only the
chunks written), and cut to the final count at the end without touching any chunk: none lies
past the last row.

Used as a context manager it removes the temporary folder on exit, after an error too, so the
stores it returned are valid only inside the ``with`` block.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from extract.store import INPUTS_ARRAY, LAYERS_GROUP, ActivationStore, MemoryStore, StoreInfo, ZarrStore
from extract.store.format import DEFAULT_CHUNK_BYTES
from extract.writer import WRITE_BYTES, ChunkWriter

__all__ = ["CAPACITY", "SpillingCapture"]

CAPACITY = 2**31  # rows a spilled array has room for before its final length is known
MIN_CHUNK_BYTES = 64 << 10  # smallest chunk a small budget may ask for (whole chunks per write stay cheap)


class SpillingCapture:
    """One complete store per model from batches of rows: in memory while they fit, on disk beyond.

    Parameters
    ----------
    model_names : list of str
        The name of each model's store, in the order of ``add``'s ``outputs``.
    hold_bytes : int or None
        Bytes of rows held in memory at most; None: never spill.
    store_inputs : bool, default=True
        Keep the flattened inputs as each store's ``inputs`` array (dCKA's confounder).

    Attributes
    ----------
    held_bytes : int
        Bytes of rows held in memory, by the ``MemoryStore``s once ``finish`` has made them (0 once
        spilled).
    spilled_to : Path or None
        The temporary folder of the spilled stores, None while everything is in memory.
    n_samples : int
        Rows received so far.
    """

    def __init__(self, model_names: Sequence[str], hold_bytes: int | None, store_inputs: bool = True) -> None:
        self.model_names = list(model_names)
        self.hold_bytes = hold_bytes
        self.store_inputs = store_inputs
        self.held_bytes = 0
        self.n_samples = 0
        self.spilled_to: Path | None = None
        self._held: list[list[dict[str, np.ndarray]]] = [[] for _ in self.model_names]  # per model, per batch
        self._digest = hashlib.sha256()
        self._folder: tempfile.TemporaryDirectory | None = None
        self._stores: list[ZarrStore] = []
        self._dtypes: list[dict[str, np.dtype]] = []  # of each spilled store's arrays, in capture order
        self._writers: list[ChunkWriter] = []
        self._chunk_samples: list[int] = []

    # ------------------------------------------------------------------ context
    def __enter__(self) -> SpillingCapture:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the writers without writing what they still buffer, drop held rows, remove the folder."""
        try:
            for writer in self._writers:
                writer.abort()
        finally:
            self._writers = []
            self._held = [[] for _ in self.model_names]
            self.held_bytes = 0
            if self._folder is not None:
                self._folder.cleanup()
                self._folder = None

    # ------------------------------------------------------------------ rows in
    def add(self, rows: np.ndarray, outputs: Sequence[dict[str, np.ndarray]]) -> None:
        """Take one batch: ``rows``, the flattened inputs (n_rows, n_input_features), and for each model
        its layer outputs ``{layer: (n_rows, ...)}`` in capture order."""
        self._digest.update(rows.tobytes())
        self.n_samples += len(rows)
        batch = [self._arrays(rows, model_outputs) for model_outputs in outputs]
        if self.spilled_to is None:
            size = sum(a.nbytes for arrays in batch for a in arrays.values())
            if self.hold_bytes is None or self.held_bytes + size <= self.hold_bytes:
                for held, arrays in zip(self._held, batch, strict=True):
                    held.append(arrays)
                self.held_bytes += size
                return
            self._spill(batch)
        for writer, arrays in zip(self._writers, batch, strict=True):
            writer.add(arrays)

    def _arrays(self, rows: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {f"{LAYERS_GROUP}/{layer}": block for layer, block in outputs.items()}
        if self.store_inputs:
            arrays[INPUTS_ARRAY] = rows
        return arrays

    def _spill(self, first: list[dict[str, np.ndarray]]) -> None:
        """Open the temporary stores and hand them the held rows, dropping each batch once it is queued."""
        self._folder = tempfile.TemporaryDirectory(prefix="simtorch-spill-")
        self.spilled_to = Path(self._folder.name)
        # chunks of at most 4 MiB, less under a small budget; writes of whole chunks of every array, about a
        # 32nd of the budget per store (a writer holds up to four writes: one filling, two queued, one written)
        budget = self.hold_bytes or DEFAULT_CHUNK_BYTES
        chunk_bytes = min(DEFAULT_CHUNK_BYTES, max(MIN_CHUNK_BYTES, budget // 64))
        write_bytes = min(WRITE_BYTES, budget // (32 * len(self.model_names)))
        for k, arrays in enumerate(first):
            store = ZarrStore(self.spilled_to / f"model{k}.zarr", read_only=False, create=True)
            widest = max(block.nbytes // max(1, len(block)) for block in arrays.values())
            chunk = max(1, chunk_bytes // max(1, widest))
            for key, block in arrays.items():
                store.create_array(key, (CAPACITY, *block.shape[1:]), str(block.dtype), chunk)
            self._stores.append(store)
            self._dtypes.append({key: block.dtype for key, block in arrays.items()})
            self._chunk_samples.append(chunk)
            self._writers.append(ChunkWriter(store, chunk, 0, lambda stop, index: None, write_bytes=write_bytes))
        for held, writer in zip(self._held, self._writers, strict=True):
            while held:
                arrays = held.pop(0)
                self.held_bytes -= sum(a.nbytes for a in arrays.values())
                writer.add(arrays)
                del arrays
        self.held_bytes = 0

    # ------------------------------------------------------------------ stores out
    def finish(self) -> list[ActivationStore]:
        """The complete stores, one per model: ``MemoryStore``s, or read-only ``ZarrStore``s once spilled."""
        if self.n_samples == 0:
            raise ValueError("The dataloader yielded no samples.")
        n = self.n_samples
        fingerprint = f"memory:sha256:{self._digest.hexdigest()}:n={n}"
        if self.spilled_to is None:
            return [self._memory_store(k, fingerprint) for k in range(len(self.model_names))]
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()
        return [self._complete(k, fingerprint) for k in range(len(self.model_names))]

    def _info(self, k: int, layers: list[str], dtypes: dict[str, np.dtype], chunk: int,
              fingerprint: str) -> StoreInfo:
        """The attributes of model ``k``'s store: float64 when a layer is held in float64, else float32."""
        prefix = f"{LAYERS_GROUP}/"
        wide = any(dtype == np.float64 for key, dtype in dtypes.items() if key.startswith(prefix))
        return StoreInfo(model_name=self.model_names[k], layers=layers, n_samples=self.n_samples,
                         dtype="float64" if wide else "float32", chunk_samples=chunk, samples_done=self.n_samples,
                         complete=True, inputs_stored=self.store_inputs, fingerprint=fingerprint)

    def _memory_store(self, k: int, fingerprint: str) -> MemoryStore:
        """Model ``k``'s held rows as one ``MemoryStore``, joined array by array (each array's blocks are
        dropped once joined, so the copy costs at most one array beyond the rows held)."""
        held = self._held[k]
        keys = list(held[0])
        prefix = f"{LAYERS_GROUP}/"
        info = self._info(k, [key[len(prefix):] for key in keys if key.startswith(prefix)],
                          {key: held[0][key].dtype for key in keys}, self.n_samples, fingerprint)
        store = MemoryStore(info)
        for key in keys:
            array = np.concatenate([arrays.pop(key) for arrays in held])
            store.create_array(key, array.shape, str(array.dtype), self.n_samples)
            store.write(key, 0, array)
            del array
        if self.store_inputs:
            info.input_shape = list(store.array_shape(INPUTS_ARRAY)[1:])
        self._held[k] = []
        return store

    def _complete(self, k: int, fingerprint: str) -> ZarrStore:
        """Cut model ``k``'s spilled arrays to the sample count, mark the store complete, reopen it read-only."""
        from zarr.api.asynchronous import open_array
        from zarr.core.sync import sync

        async def cut(path: Path) -> tuple[int, ...]:
            array = await open_array(store=str(path), mode="r+", zarr_format=3)
            await array.resize((self.n_samples, *array.shape[1:]), delete_outside_chunks=False)
            return tuple(array.shape)

        store, dtypes = self._stores[k], self._dtypes[k]
        shapes = {key: sync(cut(Path(store.path) / key)) for key in dtypes}
        prefix = f"{LAYERS_GROUP}/"
        info = self._info(k, [key[len(prefix):] for key in dtypes if key.startswith(prefix)], dtypes,
                          self._chunk_samples[k], fingerprint)
        if self.store_inputs:
            info.input_shape = list(shapes[INPUTS_ARRAY][1:])
        store.write_info(info)
        return ZarrStore(store.path)
