"""Stage one: run a model once over a dataset and write a resumable store.

``extract(model, data, path, ...)`` captures the chosen layers with
``SimilarityModel``, streams their outputs through a ``ChunkWriter`` into a
``ZarrStore`` and records, after every durable chunk, how many samples are
done. Rerunning the same call after a crash resumes from the last durable
chunk; rerunning a finished extraction only re-reads the data to check its
fingerprint and does no inference; a second process on the same store is
refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .hooks import LayerSelectionError, SimilarityModel
from .reductions import LayerReducer, rules_key
from .remote import as_path, remove_tree
from .store import INPUTS_ARRAY, LAYERS_GROUP, MASK_ARRAY, StoreError, StoreInfo, ZarrStore
from .text import attention_mask, fingerprint_rows, token_rows

__all__ = ["ExtractResult", "as_loader", "extract", "weights_digest"]

DEFAULT_CHUNK_BYTES = 4 * 2**20
STORAGE_DTYPES = ("float32", "float16")


@dataclass
class ExtractResult:
    """What ``extract`` did."""

    path: Path
    n_samples: int
    layers: list[str]
    cached: bool  # True when a finished store was reused without inference
    resumed_from: int  # first sample computed in this run
    seconds: float
    bytes_written: int


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _library_versions() -> dict[str, str]:
    import numcodecs
    import zarr

    from . import __version__

    return {
        "simtorch": __version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
    }


class _ArrayBatches:
    """Consecutive slices of a tensor or NumPy array (memory-mapped ones included), as tensors.

    Slicing replaces ``DataLoader(TensorDataset(x))``, which indexes and re-stacks every sample. Each
    batch is a copy (one memcpy): read-only and memory-mapped arrays become ordinary writable tensors,
    and a model that modifies its input in place leaves the caller's data alone.
    """

    def __init__(self, data: torch.Tensor | np.ndarray, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.data), self.batch_size):
            part = self.data[start : start + self.batch_size]
            # copies, so that a model that modifies its input in place cannot modify the caller's data
            yield torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part.clone()


def as_loader(data: Any, batch_size: int) -> tuple[Any, int]:
    """An iterable of batches in dataset order, and the number of samples.

    ``data`` may be a tensor or NumPy array of shape (n_samples, ...), a
    map-style ``Dataset`` with ``__len__``, or a ``DataLoader`` without
    shuffling.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim < 1 or len(data) == 0:
            raise ValueError(
                f"Expected data of shape (n_samples, ...) with n_samples > 0, got shape {tuple(data.shape)}."
            )
        if isinstance(data, np.ndarray) and not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise TypeError(f"Expected numeric data, got a NumPy array of dtype {data.dtype}.")
        return _ArrayBatches(data, batch_size), len(data)
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                "The DataLoader shuffles its data; stores must hold samples in dataset order so that "
                "stores of different models can be compared. Pass shuffle=False."
            )
        loader = data
        n = len(data.dataset)  # type: ignore[arg-type]
    elif isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise ValueError("The dataset has no __len__; simtorch needs the sample count up front.")
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        n = len(data)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"Expected a tensor, NumPy array, Dataset or DataLoader, got {type(data).__name__}."
        )
    if n == 0:
        raise ValueError("The dataset is empty; there is nothing to extract.")
    return loader, n


def _model_input(batch: Any) -> Any:
    """The model's input from one batch: the batch, its first element, or a dict of tensors."""
    if isinstance(batch, torch.Tensor) or isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"Cannot find the model input in a batch of type {type(batch).__name__}.")


def _batch_len(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs.to(device)


def _confounder_rows(inputs: Any) -> np.ndarray:
    """Inputs flattened per sample, the bytes that are fingerprinted and stored."""
    if isinstance(inputs, Mapping) and attention_mask(inputs) is not None:
        return token_rows(inputs)  # padding-free: valid tokens first, padding zeroed
    if isinstance(inputs, Mapping):
        tensor = inputs.get("input_ids", next(iter(inputs.values())))
    else:
        tensor = inputs
    array = tensor.detach().cpu().numpy()
    # A copy: the model may modify its input in place, and the writer keeps these rows until the chunk is full.
    return np.array(array.reshape(len(array), -1))


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the store; a second process is refused, a killed one releases it."""
    lock_path = path.parent / f".{path.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed by the with-block below
    except OSError as exc:
        raise StoreError(
            f"Cannot write into the output folder {path.parent} ({exc.strerror or exc}); "
            "choose a writable folder with --out."
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"Another process is extracting into {path}; wait for it to finish, or choose another --out."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _request(sim: SimilarityModel, dtype: str, store_inputs: bool, model_spec: str, weights: str,
             reduce: Any = None) -> dict:
    return {
        "reduce": rules_key(reduce),
        "model_spec": model_spec,
        "weights_digest": weights,
        "layer_patterns": [p if isinstance(p, str) else f"type:{p.__name__}" for p in sim.layers_to_include],
        "output_selector": repr(sim.output_selector),
        "dtype": dtype,
        "inputs_stored": store_inputs,
    }


def _existing_request(info: StoreInfo) -> dict:
    return {
        "reduce": info.request.get("reduce", rules_key(None)),
        "model_spec": info.model_spec,
        "weights_digest": info.weights_digest,
        "layer_patterns": info.request.get("layer_patterns"),
        "output_selector": info.request.get("output_selector"),
        "dtype": info.dtype,
        "inputs_stored": info.inputs_stored,
    }


class _Fingerprint:
    """Running SHA-256 of the inputs in order, plus one digest per store chunk."""

    def __init__(self, chunk_samples: int) -> None:
        self.chunk_samples = chunk_samples
        self.total = hashlib.sha256()
        self.chunk = hashlib.sha256()
        self.rows = 0
        self.chunk_digests: list[str] = []
        self._result: str | None = None

    def update(self, rows: np.ndarray) -> None:
        offset = 0
        while offset < len(rows):
            take = min(len(rows) - offset, self.chunk_samples - self.rows % self.chunk_samples)
            part = np.ascontiguousarray(rows[offset : offset + take])
            if self.rows == 0:
                header = f"{part.dtype.str}:{part.shape[1:]};".encode()
                self.total.update(header)
            self.total.update(part.tobytes())
            self.chunk.update(part.tobytes())
            self.rows += take
            offset += take
            if self.rows % self.chunk_samples == 0:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self.chunk_digests.append(self.chunk.hexdigest())
        self.chunk = hashlib.sha256()

    def finish(self) -> str:
        """The dataset fingerprint; closes the digest of a final partial chunk (idempotent)."""
        if self._result is None:
            if self.rows % self.chunk_samples:
                self._close_chunk()
            self._result = f"sha256:{self.total.hexdigest()}:n={self.rows}"
        return self._result


def chunk_samples(bytes_per_sample: int, n: int, chunk_bytes: int) -> int:
    """Rows per chunk: at most ``chunk_bytes`` per chunk, with the rows spread evenly over the chunks.

    Zarr stores an edge chunk at full size, so 540 rows in chunks of 512 would cost 1,024 rows on
    disk; evening out the chunks (2 × 270 here) keeps the padding below one row per chunk.
    """
    per_chunk = max(1, chunk_bytes // max(1, bytes_per_sample))
    n_chunks = -(-n // per_chunk)
    return int(-(-n // n_chunks))


def extract(
    model: nn.Module | SimilarityModel,
    data: Any,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    layers: Sequence[str | type[nn.Module]] | None = None,
    batch_size: int = 64,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    force: bool = False,
    store_inputs: bool = True,
    output_selector: Any = None,
    model_spec: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    reduce: Any = None,
    replace_stale: bool = False,
) -> ExtractResult:
    """Run ``model`` once over ``data`` and write the chosen layers to the store at ``path``.

    Parameters
    ----------
    model : nn.Module or SimilarityModel
        The network, or an already wrapped one (then ``layers`` is ignored).
    data : Tensor, ndarray, Dataset or DataLoader
        Samples in a fixed order; batches may be tensors, ``(inputs, target)``
        tuples, or dicts of tensors (passed as keyword arguments).
    path : path-like
        The store (a directory ending in ``.zarr``).
    name, layers, output_selector
        As in ``SimilarityModel``.
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype of the activations.
    force : bool, default=False
        Overwrite an existing store instead of resuming or reusing it.
    store_inputs : bool, default=True
        Also store the flattened inputs (dCKA's confounder).
    replace_stale : bool, default=False
        Overwrite an existing store written with other weights, options or
        data (the demo does this when its zoo is retrained); by default such a
        store is an error, so that nothing is overwritten by mistake.
    reduce : str, list of str or dict, optional
        Per-layer reductions applied before storing (``extract.reductions``):
        ``"gap"``, ``["block*=pool2", "fc*=flatten"]``... Token layers of text
        inputs default to ``mean`` over valid tokens, other layers to
        ``flatten``; the store records each layer's reduction.

    Returns
    -------
    ExtractResult
    """
    started = time.perf_counter()
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}.")
    sim = model if isinstance(model, SimilarityModel) else SimilarityModel(
        model, name, layers, output_selector=output_selector
    )
    run_device = torch.device(device) if device is not None else sim.device
    sim.model.to(run_device)
    loader, n = as_loader(data, batch_size)
    path = as_path(path)  # a pathlib.Path, or a UrlPath for s3://... (extract.remote)
    request = _request(sim, dtype, store_inputs, model_spec, weights_digest(sim.model), reduce)

    with _exclusive_lock(path):
        info = _reusable_info(path, request, force or replace_stale and _is_stale(path, request))
        if info is not None and info.complete:
            try:
                _verify_fingerprint(loader, info, path)
            except StoreError:
                if not replace_stale:
                    raise
                info = _reusable_info(path, request, True)
            if info is not None:
                return ExtractResult(path, info.n_samples, info.layers, True, info.n_samples,
                                     time.perf_counter() - started, 0)
        return _run(sim, loader, n, path, request, info, dtype, store_inputs, run_device,
                    chunk_bytes, progress, started, reduce)


def _is_stale(path: Path, request: dict) -> bool:
    """Whether ``path`` holds a store, or a broken one, that was not written for ``request``."""
    if not path.exists():
        return False
    try:
        return _existing_request(ZarrStore(path, read_only=True).info) != request
    except StoreError:
        return True


def _reusable_info(path: Path, request: dict, force: bool) -> StoreInfo | None:
    """Info of the store already at ``path`` if it can be resumed or reused, None if there is none."""
    if not path.exists():
        return None
    if force:
        remove_tree(path)
        return None
    try:
        info = ZarrStore(path, read_only=True).info
    except StoreError as exc:
        raise StoreError(
            f"{path} exists but is not a simtorch store ({exc}); remove it, choose another --out, "
            "or pass --force to overwrite it."
        ) from exc
    existing = _existing_request(info)
    if existing != request:
        diff = [k for k in request if existing.get(k) != request[k]]
        raise StoreError(
            f"The store at {path} was written with a different {', '.join(diff)} "
            f"(model {info.model_name!r}); pass --force to overwrite it or choose another --out."
        )
    return info


def _verify_fingerprint(loader: DataLoader, info: StoreInfo, path: Path) -> None:
    """Hash the data (no inference) and check it is the data the finished store was made from."""
    fp = _Fingerprint(info.chunk_samples)
    for batch in loader:
        inputs = _model_input(batch)
        fp.update(fingerprint_rows(inputs, _confounder_rows(inputs)))
    if fp.finish() != info.fingerprint:
        raise StoreError(
            f"The finished store at {path} was extracted from different data (fingerprint mismatch); "
            "pass --force to re-extract it, or choose another --out."
        )


def _run(sim, loader, n, path, request, info, dtype, store_inputs, device, chunk_bytes, progress, started,
         reduce=None):
    from tqdm.auto import tqdm

    created_here = info is None
    store = ZarrStore(path, read_only=False, create=created_here)
    resume_from = info.samples_done if info is not None else 0
    if info is not None and info.n_samples != n:
        raise StoreError(
            f"The partial store at {path} was started for {info.n_samples} samples, the data has {n}; "
            "pass --force to start again."
        )
    if info is None:
        info = StoreInfo(
            model_name=sim.model_name,
            model_spec=request["model_spec"],
            weights_digest=request["weights_digest"],
            dtype=dtype,
            n_samples=n,
            inputs_stored=store_inputs,
            versions=_library_versions(),
            request={k: request[k] for k in ("layer_patterns", "output_selector", "reduce")},
        )
        store.write_info(info)
    _remove_partial_files(path)
    fp: _Fingerprint | None = _Fingerprint(info.chunk_samples) if info.chunk_samples else None
    writer = None
    position = 0
    per_sample: dict[str, tuple[int, ...]] = {}
    reducer = LayerReducer(reduce)
    bar = tqdm(total=n, initial=resume_from, desc=f"extract {sim.model_name}", unit="sample",
               disable=not progress, leave=False)
    verified = 0  # chunk digests already checked against the partial store's
    try:
        with sim.hooked():
            for batch_index, batch in enumerate(loader):
                inputs = _model_input(batch)
                rows = _batch_len(inputs)
                confounder = _confounder_rows(inputs)
                fingerprinted = fingerprint_rows(inputs, confounder)
                stop = position + rows
                if fp is not None:
                    fp.update(fingerprinted)
                    verified = _check_resumed_chunks(fp, info, resume_from, path, verified)
                if stop <= resume_from:
                    position = stop
                    continue
                try:
                    outputs = sim.forward(_to_device(inputs, device))
                except LayerSelectionError:
                    raise
                except Exception as exc:
                    raise RuntimeError(
                        f"Model {sim.model_name!r} failed on batch {batch_index} (samples {position}..{stop - 1}) "
                        f"with inputs of shape {_describe(inputs)}: {type(exc).__name__}: {exc}. "
                        "Check that the data has the shape and dtype the model expects."
                    ) from exc
                mask = attention_mask(inputs)
                outputs = reducer(outputs, None if mask is None else mask.to(device))
                arrays = {f"{LAYERS_GROUP}/{k}": _as_storage(v, dtype, k) for k, v in outputs.items()}
                if store_inputs:
                    arrays[INPUTS_ARRAY] = confounder
                if mask is not None:
                    arrays[MASK_ARRAY] = mask.cpu().numpy().astype(np.uint8)
                _check_batch_shapes(arrays, per_sample, batch_index)
                if writer is None:
                    if not info.chunk_samples:
                        info.reductions = reducer.recorded
                        info.request["token_layers"] = list(reducer.token_layers)
                    info = _prepare_arrays(store, info, sim.layers, arrays, n, chunk_bytes, path)
                    if fp is None:
                        fp = _Fingerprint(info.chunk_samples)
                        fp.update(fingerprinted)
                    writer = _start_writer(store, info, fp, resume_from)
                skip = max(0, resume_from - position)
                writer.add({k: v[skip:] for k, v in arrays.items()})
                bar.update(rows - skip)
                position = stop
            if position != n:
                raise ValueError(f"The data yielded {position} samples but reports {n} (len); fix its __len__.")
            # Close the last partial chunk's digest before the writer records that chunk as durable.
            fingerprint = fp.finish()
            _check_resumed_chunks(fp, info, resume_from, path, verified)
            if writer is not None:
                writer.close()
                bytes_written = writer.bytes_written
            else:
                bytes_written = 0
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if created_here and store.info.samples_done == 0:
            remove_tree(path, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreError(
                f"Writing the store at {path} failed ({exc.strerror or exc}); free disk space or choose a "
                "writable --out, then rerun the same command to resume."
            ) from exc
        raise
    finally:
        bar.close()
    info = store.info
    info.fingerprint = fingerprint
    info.chunk_digests = fp.chunk_digests
    info.samples_done = n
    info.complete = True
    store.write_info(info)
    return ExtractResult(path, n, info.layers, False, resume_from, time.perf_counter() - started, bytes_written)


def _as_storage(tensor: torch.Tensor, dtype: str, layer: str) -> np.ndarray:
    if not (tensor.is_floating_point() or tensor.is_complex()) and tensor.dtype != torch.bool:
        tensor = tensor.float()
    if tensor.is_complex():
        raise ValueError(f"Layer {layer!r} outputs complex values; choose a real-valued layer.")
    return tensor.to(dtype=getattr(torch, dtype)).cpu().numpy()


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(getattr(v, 'shape', ()))}" for k, v in inputs.items()) + "}"
    return f"{tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"


def _check_batch_shapes(arrays: dict[str, np.ndarray], per_sample: dict[str, tuple[int, ...]], batch: int) -> None:
    """Every batch must give every array the per-sample shape of the first batch (fills ``per_sample``)."""
    for key, block in arrays.items():
        expected = per_sample.setdefault(key, block.shape[1:])
        if block.shape[1:] != expected:
            raise ValueError(
                f"{key!r} has per-sample shape {block.shape[1:]} in batch {batch} but {expected} in the first "
                "batch; a store needs one shape per array. Pad or resize the inputs to one shape, "
                "or pick a layer whose output shape does not depend on the input (--reduce mean)."
            )


def _prepare_arrays(store, info, layers, arrays, n, chunk_bytes, path) -> StoreInfo:
    """Create the arrays (first run) or check them (resume) from the first captured batch."""
    per_sample = {k: v.shape[1:] for k, v in arrays.items()}
    if info.chunk_samples:  # resuming: shapes must match what is on disk
        if info.layers != list(layers):
            raise StoreError(
                f"The partial store at {path} holds layers {info.layers} but the model now gives {list(layers)}; "
                "pass --force to start again."
            )
        for key, shape in per_sample.items():
            if not store.has_array(key) or store.array_shape(key)[1:] != shape:
                raise StoreError(
                    f"The partial store at {path} has no array {key!r} of per-sample shape {shape}; "
                    "the model changed since it was started. Pass --force to start again."
                )
        return info
    widest = max(int(np.prod(s, dtype=np.int64)) * arrays[k].dtype.itemsize for k, s in per_sample.items())
    info.chunk_samples = chunk_samples(widest, n, chunk_bytes)
    for key, shape in per_sample.items():
        store.create_array(key, (n, *shape), str(arrays[key].dtype), info.chunk_samples)
    info.layers = list(layers)
    info.input_shape = list(arrays[INPUTS_ARRAY].shape[1:]) if INPUTS_ARRAY in arrays else []
    store.write_info(info)
    return info


def _start_writer(store, info: StoreInfo, fp: _Fingerprint, resume_from: int):
    from .writer import ChunkWriter

    def on_chunk_written(stop: int, chunk_index: int) -> None:
        current = store.info
        current.samples_done = stop
        current.chunk_digests = fp.chunk_digests[: chunk_index + 1]
        store.write_info(current)

    return ChunkWriter(store, info.chunk_samples, resume_from, on_chunk_written)


def _check_resumed_chunks(fp: _Fingerprint, info: StoreInfo, resume_from: int, path: Path, first: int = 0) -> int:
    """On resume, the data's chunk digests must equal those recorded for the chunks already written.

    Checks the digests from index ``first`` on and returns the index to start from next time.
    """
    done = -(-resume_from // info.chunk_samples) if info.chunk_samples else 0  # ceil: a final partial chunk
    last = min(done, len(fp.chunk_digests))
    for i in range(first, last):
        if i < len(info.chunk_digests) and fp.chunk_digests[i] != info.chunk_digests[i]:
            raise StoreError(
                f"The data differs from the data the partial store at {path} was started with "
                f"(chunk {i}); pass --force to start again, or choose another --out."
            )
    return max(first, last)


def _remove_partial_files(path: Path) -> None:
    """Delete temporary files a killed writer may have left (zarr writes via *.partial + rename)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
