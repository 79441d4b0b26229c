"""Background chunk writer: overlaps disk I/O with forward passes.

The extraction loop hands rows of every layer to ``ChunkWriter.add``; rows are
buffered until whole chunks (``chunk_samples`` rows each, as many as make about
``write_bytes`` over all arrays) are full, then queued to a single writer thread
through a bounded queue (so memory stays bounded when the disk is slower than
the model). The thread writes every array of those chunks and only then records
them as durable, by calling ``on_chunk_written``; a process killed at any point
therefore leaves progress pointing at chunks that are entirely on disk. Writing
several chunks per call and recording progress once per call keeps Zarr's fixed
per-call cost small next to the data (narrow layers have chunks of a few KiB).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .store.base import ActivationStore

__all__ = ["ChunkWriter"]

_STOP = object()
WRITE_BYTES = 16 << 20  # default bytes per write (whole chunks grouped over all arrays)


class ChunkWriter:
    """Buffer rows into whole chunks and write them on a background thread.

    Parameters
    ----------
    store : ActivationStore
        Destination, with every array already created.
    chunk_samples : int
        Rows per chunk (the store's chunk length along the sample axis).
    start : int
        First row to write (a chunk boundary, > 0 when resuming).
    on_chunk_written : callable(stop: int, chunk_index: int)
        Called on the writer thread after all arrays of a chunk are written.
    max_queued_chunks : int, default=2
        Bound on writes (groups of chunks) waiting for the disk.
    write_bytes : int, optional
        Whole chunks are grouped into one write of about this many bytes over all arrays
        (default ``WRITE_BYTES``, 16 MiB).
    write_threads : int, default=2
        Arrays of one group written at the same time.
    """

    def __init__(
        self,
        store: ActivationStore,
        chunk_samples: int,
        start: int,
        on_chunk_written: Callable[[int, int], None],
        max_queued_chunks: int = 2,
        write_bytes: int | None = None,
        write_threads: int = 2,
    ) -> None:
        if start % chunk_samples:
            raise ValueError(f"start={start} is not a multiple of chunk_samples={chunk_samples}.")
        self.store = store
        self.chunk_samples = chunk_samples
        self.position = start  # next row to buffer
        self.write_bytes = WRITE_BYTES if write_bytes is None else write_bytes
        self._rows_per_write = 0  # chunk_samples × chunks per write, set from the first rows added
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._on_chunk_written = on_chunk_written
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_chunks)
        self._error: BaseException | None = None
        self.bytes_written = 0
        self._pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="simtorch-array-writer")
        self._thread = threading.Thread(target=self._run, name="simtorch-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._pool.shutdown()
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            start, arrays = item
            try:
                # the arrays of a group are written concurrently: Zarr's encoding and file writes release the GIL
                keys = list(arrays)
                list(self._pool.map(self.store.write, keys, [start] * len(keys), [arrays[k] for k in keys]))
                self.bytes_written += sum(block.nbytes for block in arrays.values())
                stop = start + len(next(iter(arrays.values())))
                self._on_chunk_written(stop, (stop - 1) // self.chunk_samples)
            except BaseException as exc:  # surfaced on the main thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Buffer rows (same length for every key); queue every chunk that fills up."""
        self._raise_if_failed()
        rows = len(next(iter(arrays.values())))
        if not self._rows_per_write and rows:
            row_bytes = max(1, sum(block.nbytes for block in arrays.values()) // rows)
            self._rows_per_write = self.chunk_samples * max(1, self.write_bytes // (self.chunk_samples * row_bytes))
        offset = 0
        while offset < rows:
            take = min(rows - offset, self._rows_per_write - self._buffered)
            for key, block in arrays.items():
                self._buffer.setdefault(key, []).append(block[offset : offset + take])
            self._buffered += take
            offset += take
            if self._buffered == self._rows_per_write:
                self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        # rows of one batch are written as they are (a view: no copy); rows of several batches are joined
        chunk = {key: np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)
                 for key, parts in self._buffer.items()}
        self._queue.put((self.position, chunk))
        self.position += self._buffered
        self._buffer = {}
        self._buffered = 0
        self._raise_if_failed()

    def close(self) -> None:
        """Write the last (partial) chunk, wait for the thread, re-raise its error."""
        try:
            if self._error is None:
                self._flush()
        finally:
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the thread without writing what is still buffered."""
        self._buffer = {}
        self._buffered = 0
        self._queue.put(_STOP)
        self._thread.join()
