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
      sample_path             string (n_samples,), each sample's file path relative to the image
                              folder it came from (only for image folders; extract.images)
      sample_class            string (n_samples,), each sample's class: the first sub-folder of
                              its path, "" for files at the top of the folder (image folders only)

Every array names its axes in its zarr.json (Zarr v3 ``dimension_names``), so
that ``xarray.open_zarr(path, group="layers", zarr_format=3, consolidated=False)``
gives each layer as a DataArray (``dimension_names``). The first axis is always
``sample``; the other axes of a layer carry the layer's name, a dot and the
axis name, because xarray requires one size per dimension name in a group and
two layers rarely share their widths::

    (N, D)          fc1: sample, fc1.feature
    (N, C, H, W)    conv1: sample, conv1.channel, conv1.height, conv1.width
    (N, T, D)       a token layer of text inputs: sample, <layer>.token, <layer>.feature
    anything else   sample, <layer>.dim_1, <layer>.dim_2, ...
    inputs          sample, feature
    mask            sample, token
    (N,)            sample

Stores written before the names existed have none: simtorch and zarr read
them as before, xarray refuses them (re-extract with ``--force`` to add the
names). The names live only in zarr.json; the chunk files are the same
either way.

Layer names become array paths under ``layers/``: a name with a ``\\`` (which
Zarr turns into ``/``) or with an empty part between slashes, or one that
is the folder of another chosen layer (``a`` and ``a/b``), cannot be stored
and is refused before the first forward pass (``layer_name_problem``).

Every array is chunked along the sample axis only, with one chunk length per
store, and encoded ``bytes -> blosc(lz4, clevel 5, no shuffle) -> crc32c`` so
that a flipped bit is caught on read. On a local disk, whole chunks of that
chain are written and read by ``extract.store.chunk_files`` (the same bytes as zarr's,
without its per-chunk copies); everything else goes through zarr.

Codec choice: blosc-lz4 without shuffle, clevel 5, then crc32c. The zeros of
ReLU layers, most of what these codecs find, compress as well unshuffled;
the comparison of codec chains (ratio, encode and decode speed) is in
``benchmarks/README.md`` (``benchmarks/bench_extract.py --codecs-only``).
Stores written with byte shuffle are read as they are: zarr reads each
array's codecs.

The root attributes (``StoreInfo``) record the model, its weights digest, the
layers in capture order, the storage dtype, the sample count, the dataset
fingerprint, library versions, the number of samples known to be durable
(``samples_done``) and the completion marker ``complete``.

``sample_path`` and ``sample_class`` (Zarr v3 variable-length UTF-8 strings, same
codec chain) are written just before the completion marker, so the metadata
digests recorded with it cover them; ``zarr.open_group(path)["sample_path"][:]``
reads them without simtorch, ``ZarrStore.sample_labels()`` with it. Stores of
other data have neither array.

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
    "SAMPLE_CLASS_ARRAY",
    "SAMPLE_PATH_ARRAY",
    "StoreInfo",
    "chunk_codecs",
    "chunk_samples",
    "dimension_names",
    "document_digest",
    "layer_name_problem",
]

FORMAT_VERSION = 1
ATTRS_KEY = "simtorch"
LAYERS_GROUP = "layers"
INPUTS_ARRAY = "inputs"
MASK_ARRAY = "mask"
SAMPLE_PATH_ARRAY = "sample_path"
SAMPLE_CLASS_ARRAY = "sample_class"
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
    write_id: str = ""  # random, drawn when an extraction starts a store (kept by a resume): tells rewrites apart
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


def dimension_names(key: str, shape: tuple[int, ...], token_layer: bool = False) -> list[str]:
    """The Zarr v3 ``dimension_names`` of the store array ``key`` of (full) ``shape``.

    Parameters
    ----------
    key : str
        ``"layers/<name>"``, ``"inputs"``, ``"mask"`` or another root array.
    shape : tuple of int
        The array's shape, sample axis first.
    token_layer : bool, default=False
        Whether the layer's first per-sample axis is the token axis of the
        attention mask (``LayerReducer.token_layers``).

    Returns
    -------
    list of str
        ``sample``, then the per-sample axes (the rules are in the module docstring).
    """
    rest = len(shape) - 1
    if rest < 0:
        return []
    if key == MASK_ARRAY and rest == 1:
        axes = ["token"]
    elif token_layer and rest >= 2:
        axes = ["token", "feature"] if rest == 2 else ["token", *(f"dim_{i}" for i in range(2, rest + 1))]
    elif rest == 1:
        axes = ["feature"]
    elif rest == 3:
        axes = ["channel", "height", "width"]
    else:
        axes = [f"dim_{i}" for i in range(1, rest + 1)]
    prefix = f"{LAYERS_GROUP}/"
    if key.startswith(prefix):
        axes = [f"{key[len(prefix):]}.{axis}" for axis in axes]
    return ["sample", *axes]


def layer_name_problem(layer: str, layers: list[str] | tuple[str, ...] = ()) -> str:
    """Why ``layer`` cannot be an array under ``layers/`` of a store ('' when it can).

    ``layers`` are the other layers of the same store: a layer that is the
    folder of another (``a`` and ``a/b``) cannot be stored either.
    """
    if "\\" in layer:
        return (f"layer {layer!r} has a '\\' in its name, which a Zarr store cannot hold (Zarr reads it as '/'); "
                "capture its parent module, or rename the module (e.g. with add_module) before extracting")
    if "/" in layer and "" in layer.split("/"):
        return (f"layer {layer!r} has an empty part between '/' separators, which a Zarr store cannot hold; "
                "rename the module before extracting")
    for other in layers:
        if other != layer and other.startswith(layer + "/"):
            return (f"layer {layer!r} would be the folder of layer {other!r} in the store (Zarr keeps names "
                    "with '/' as nested paths); capture only one of them")
    return ""
