"""The store format: the on-disk contract between ``extract`` and ``measure``.

A store holds one model run over one dataset. On disk it is a plain Zarr v3
group that ``zarr.open_group`` and ``dask.array.from_zarr`` read without
simtorch::

    model.zarr/
      zarr.json               root attributes under the key "simtorch" (below)
      layers/<layer name>     float32 (or float16), shape (n_samples, *per_sample_shape)
      inputs                  the flattened inputs, shape (n_samples, n_input_features),
                              dCKA's confounder (absent with store_inputs=False)
      mask                    uint8 (n_samples, n_tokens), the attention mask of text inputs
                              (only for token inputs; see extract.store.reductions)

Every array is chunked along the sample axis only, with one chunk length per
store, and encoded ``bytes -> blosc(lz4, clevel 5, no shuffle) -> crc32c`` so
that a flipped bit is caught on read. On a local disk, whole chunks of that
chain are written and read by ``extract.store.chunk_files`` (the same bytes as zarr's,
without its per-chunk copies); everything else goes through zarr.

Codec choice (``benchmarks/bench_extract.py --codecs-only --stores DIR``):
every layer of the five demo stores (30.7 MB) / an untrained VGG-style CNN
on 600 upsampled digits (45 MB) / one random-init ``WideCNN`` store of
``bench_zoo.py`` (176 MB), float32; MB of raw data per CPU-second, numcodecs,
no disk::

    chain (each ends in crc32c)      ratio               encode               decode
    none                             1.00 / 1.00 / 1.00  1823 / 1943 / 2749   12308 / 12179 / 12694
    blosc-lz4 noshuffle, clevel 5    1.37 / 1.60 / 2.27  1099 / 1135 / 1504    3135 /  5147 /  7651
    blosc-lz4 shuffle, clevel 5      1.29 / 1.61 / 2.35   996 /  868 / 1066    3069 /  3231 /  4065
    blosc-lz4 bitshuffle, clevel 5   1.19 / 1.41 / 1.95  1512 /  851 /  941    3475 /  2679 /  2928
    blosc-zstd shuffle, clevel 1     1.58 / 1.86 / 2.71   268 /  299 /  381     818 /   845 /  1319
    zstd level 1                     1.67 / 1.91 / 2.72   519 /  605 /  799    1205 /  1653 /  2297

blosc-lz4 without shuffle is kept: as small as byte shuffle (the zeros of ReLU
layers, most of what these codecs find, compress as well unshuffled), 1.1-1.4x
faster to encode and up to 1.9x faster to decode; zstd 1 would save another
16-22 % of disk for about twice the CPU. Stores written with byte shuffle
(simtorch 0.3.0 before this choice) read as before: zarr reads each array's codecs.

The root attributes (``StoreInfo``) record the model, its weights digest, the
layers in capture order, the storage dtype, the sample count, the dataset
fingerprint, library versions, the number of samples known to be durable
(``samples_done``) and the completion marker ``complete``.

This module holds the names, the attributes, the codec chain, the chunking
rule and the metadata digests; the backends (``base``, ``memory``,
``zarr_store``) only move arrays and attributes, and the extraction logic lives
in ``extract.runner`` and never touches Zarr directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ATTRS_KEY",
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "INPUTS_ARRAY",
    "LAYERS_GROUP",
    "MASK_ARRAY",
    "StoreInfo",
    "chunk_codecs",
    "chunk_samples",
    "document_digest",
]

FORMAT_VERSION = 1
ATTRS_KEY = "simtorch"
LAYERS_GROUP = "layers"
INPUTS_ARRAY = "inputs"
MASK_ARRAY = "mask"
DEFAULT_CHUNK_BYTES = 4 * 2**20


@dataclass
class StoreInfo:
    """The attributes every store carries (JSON-serialisable)."""

    model_name: str
    model_spec: str = ""
    weights_digest: str = ""
    layers: list[str] = field(default_factory=list)
    dtype: str = "float32"
    n_samples: int = 0
    chunk_samples: int = 0
    samples_done: int = 0
    fingerprint: str = ""
    complete: bool = False
    inputs_stored: bool = True
    input_shape: list[int] = field(default_factory=list)
    chunk_digests: list[str] = field(default_factory=list)
    reductions: dict[str, str] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreInfo:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def chunk_codecs() -> list:
    """The codecs after ``bytes`` of every store array: blosc (lz4, clevel 5, no shuffle), then crc32c."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()]


def chunk_samples(bytes_per_sample: int, n: int, chunk_bytes: int) -> int:
    """Rows per chunk: at most ``chunk_bytes`` per chunk, with the rows spread evenly over the chunks.

    Zarr stores an edge chunk at full size, so 540 rows in chunks of 512 would cost 1,024 rows on
    disk; evening out the chunks (2 × 270 here) keeps the padding below one row per chunk.
    """
    per_chunk = max(1, chunk_bytes // max(1, bytes_per_sample))
    n_chunks = -(-n // per_chunk)
    return int(-(-n // n_chunks))


def document_digest(document: Any) -> str:
    """SHA-256 of a parsed zarr.json in canonical form, leaving out the digests themselves."""
    import copy
    import hashlib
    import json

    document = copy.deepcopy(document)
    attrs = document.get("attributes", {}).get(ATTRS_KEY) if isinstance(document, dict) else None
    if isinstance(attrs, dict):
        attrs.pop("integrity", None)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
