"""Chunks of a local Zarr v3 array written to and read from their chunk files directly.

``array[a:b] = rows`` and ``array[a:b]`` run zarr-python's asyncio codec
pipeline: each chunk is handed between its event loop and worker threads and
copied on the way (decoded into a fresh buffer, then into the result; its
checksum appended or stripped by another copy). For the chain simtorch writes
(``bytes`` → ``blosc`` → ``crc32c``, little-endian, see ``extract.store.format``;
``bytes`` → ``crc32c`` for the statistics cache, ``measure.cache``) on a local
store, ``ChunkFiles`` does the same work, with numcodecs' Blosc configured from
the array's own codec metadata:

* ``write`` encodes whole chunks, appends the little-endian CRC-32C as zarr's
  ``crc32c`` codec does, and writes each chunk file under the array's chunk
  key atomically (a temporary file, then a rename), as zarr's ``LocalStore``
  does. The files are byte-identical to zarr's (``tests/test_store.py``).
* ``read`` checks each chunk's CRC-32C and decodes it (or, uncompressed, reads
  it) straight into the caller's rows. It returns False (and the caller reads through zarr, which
  names a bad chunk or fills a missing one as before) on anything unexpected.

Timings are in ``benchmarks/README.md``. Any other chain, a remote store, or
a partial chunk is written by zarr.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["ChunkFiles"]

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ChunkFiles:
    """Reader and writer of the chunk files of one zarr array (chunked along the first axis only).

    Build it with ``ChunkFiles.of(array)``, which returns None when the array is not one it
    reads and writes exactly as zarr would.
    """

    def __init__(self, folder: Path, metadata, blosc) -> None:
        self.folder = folder
        self.metadata = metadata
        self.blosc = blosc
        self.rows = metadata.chunk_grid.chunk_shape[0]
        self.dtype = np.dtype(metadata.data_type.to_native_dtype()).newbyteorder("<")

    @classmethod
    def of(cls, array) -> ChunkFiles | None:
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
        from zarr.storage import LocalStore

        metadata = array.metadata
        store = array.store_path.store
        if getattr(metadata, "zarr_format", None) != 3 or not isinstance(store, LocalStore) or not metadata.shape:
            return None
        codecs = metadata.codecs
        if [type(c) for c in codecs] not in ([BytesCodec, BloscCodec, Crc32cCodec], [BytesCodec, Crc32cCodec]):
            return None
        if codecs[0].endian is not None and codecs[0].endian.value != "little":
            return None
        if tuple(metadata.chunk_grid.chunk_shape[1:]) != tuple(metadata.shape[1:]):
            return None  # chunked along more than the sample axis
        numcodec = None
        if len(codecs) == 3:
            blosc = codecs[1]
            if blosc.typesize is None or blosc.shuffle is None or blosc.cname is None or blosc.clevel is None:
                return None  # settings zarr fills in from the array: not what we can reproduce
            settings = {"cname": blosc.cname.value, "clevel": blosc.clevel,
                        "shuffle": _SHUFFLE[blosc.shuffle.value], "blocksize": blosc.blocksize}
            try:  # numcodecs ≥ 0.16 takes the typesize, and zarr then passes it; older ones take it from the bytes
                numcodec = Blosc(**settings, typesize=blosc.typesize)
            except TypeError:
                numcodec = Blosc(**settings)
        return cls(Path(store.root) / array.store_path.path, metadata, numcodec)

    def whole_chunks(self, start: int, n_rows: int) -> int:
        """How many of ``n_rows`` rows from ``start`` lie in whole chunks this writer can write (from start)."""
        if start % self.rows:
            return 0
        inside = max(0, min(n_rows, self.metadata.shape[0] - start))  # rows past the end: zarr refuses them
        return inside // self.rows * self.rows

    def _path(self, chunk: int, ndim: int) -> Path:
        return self.folder / self.metadata.encode_chunk_key((chunk, *(0,) * (ndim - 1)))

    def read(self, start: int, out: np.ndarray) -> bool:
        """Decode rows ``start : start + len(out)`` into ``out`` (C-contiguous, the array's dtype); True if done.

        False, with ``out`` partly written, when a chunk file is missing, fails its CRC-32C or does not
        decode to a whole chunk: the caller then reads through zarr, which raises or fills as it does.
        """
        stop = start + len(out)
        if (out.dtype != self.dtype or not out.flags.c_contiguous or stop > self.metadata.shape[0]
                or out.shape[1:] != tuple(self.metadata.shape[1:])):
            return False
        flat = out.reshape(len(out), int(np.prod(out.shape[1:], dtype=np.int64))).view(np.uint8)
        spare = None
        for chunk in range(start // self.rows, -(-stop // self.rows)):
            lo, hi = max(start, chunk * self.rows), min(stop, (chunk + 1) * self.rows)
            if (lo, hi) == (chunk * self.rows, (chunk + 1) * self.rows):  # a whole chunk: decoded in place
                if not self._decode(chunk, out.ndim, flat[lo - start:hi - start].reshape(-1)):
                    return False
            else:  # fewer rows than the chunk holds (zarr pads the edge chunk)
                if spare is None:
                    spare = np.empty((self.rows, flat.shape[1]), np.uint8)
                if not self._decode(chunk, out.ndim, spare.reshape(-1)):
                    return False
                first = lo - chunk * self.rows
                flat[lo - start:hi - start] = spare[first:first + hi - lo]
        return True

    def _decode(self, chunk: int, ndim: int, dest: np.ndarray) -> bool:
        """Chunk ``chunk`` into the bytes ``dest`` (exactly one chunk long) after checking its CRC-32C."""
        import crc32c

        path = self._path(chunk, ndim)
        try:
            if self.blosc is None:  # stored as is: read straight into dest
                with open(path, "rb") as handle:
                    size, tail = handle.readinto(dest), handle.read()
                return size == dest.nbytes and len(tail) == 4 and crc32c.crc32c(dest) == int.from_bytes(tail, "little")
            raw = path.read_bytes()
        except OSError:
            return False
        data = memoryview(raw)[:-4]
        if len(raw) < 4 or crc32c.crc32c(data) != int.from_bytes(raw[-4:], "little"):
            return False
        try:
            # a valid frame of another size would decode into part of dest without a word: the Blosc
            # header (16 bytes) holds the decoded size, little-endian, at bytes 4-7
            if len(data) < 16 or int.from_bytes(data[4:8], "little") != dest.nbytes:
                return False
            self.blosc.decode(data, out=dest)
        except (RuntimeError, ValueError):  # numcodecs: not a blosc frame
            return False
        return True

    def write(self, start: int, block: np.ndarray) -> None:
        """Write rows ``block`` (whole chunks, from chunk boundary ``start``) as the chunks' files."""
        import crc32c

        block = np.ascontiguousarray(block, dtype=self.dtype)
        for offset in range(0, len(block), self.rows):
            rows = block[offset:offset + self.rows].reshape(-1).view(np.uint8)
            encoded = rows if self.blosc is None else self.blosc.encode(rows)  # the uint8 view, as zarr passes it
            checksum = crc32c.crc32c(encoded).to_bytes(4, "little")
            path = self._path((start + offset) // self.rows, block.ndim)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            try:
                with open(partial, "wb") as handle:
                    handle.write(encoded)
                    handle.write(checksum)
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
