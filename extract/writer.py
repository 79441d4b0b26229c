"""Background chunk writer: overlaps disk I/O with forward passes.

The extraction loop hands rows of every layer to ``ChunkWriter.add``; rows are
buffered until a whole chunk (``chunk_samples`` rows) is full, then queued to a
single writer thread through a bounded queue (so memory stays bounded when the
disk is slower than the model). The thread writes every array of the chunk and
only then records the chunk as durable, by calling ``on_chunk_written``; a
process killed at any point therefore leaves progress pointing at chunks that
are entirely on disk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from .store import ActivationStore

__all__ = ["ChunkWriter"]

_STOP = object()


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
        Bound on chunks waiting for the disk.
    """

    def __init__(
        self,
        store: ActivationStore,
        chunk_samples: int,
        start: int,
        on_chunk_written: Callable[[int, int], None],
        max_queued_chunks: int = 2,
    ) -> None:
        if start % chunk_samples:
            raise ValueError(f"start={start} is not a multiple of chunk_samples={chunk_samples}.")
        self.store = store
        self.chunk_samples = chunk_samples
        self.position = start  # next row to buffer
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._on_chunk_written = on_chunk_written
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_chunks)
        self._error: BaseException | None = None
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="simtorch-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            start, arrays = item
            try:
                for key, block in arrays.items():
                    self.store.write(key, start, block)
                    self.bytes_written += block.nbytes
                stop = start + len(next(iter(arrays.values())))
                self._on_chunk_written(stop, start // self.chunk_samples)
            except BaseException as exc:  # surfaced on the main thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Buffer rows (same length for every key); queue every chunk that fills up."""
        self._raise_if_failed()
        rows = len(next(iter(arrays.values())))
        offset = 0
        while offset < rows:
            take = min(rows - offset, self.chunk_samples - self._buffered)
            for key, block in arrays.items():
                self._buffer.setdefault(key, []).append(block[offset : offset + take])
            self._buffered += take
            offset += take
            if self._buffered == self.chunk_samples:
                self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        chunk = {key: np.concatenate(parts) for key, parts in self._buffer.items()}
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
