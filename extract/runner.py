"""Stage one: run a model once over a dataset and write a resumable store.

``extract(model, data, path, ...)`` captures the chosen layers with
``SimilarityModel``, streams their outputs through a ``ChunkWriter`` into a
``ZarrStore`` and records, after every durable chunk, how many samples are
done. Rerunning the same call after a crash resumes from the last durable
chunk; rerunning a finished extraction only re-reads the data to check its
fingerprint and does no inference; a second process on the same store is
refused.

The work is split in steps, each a small function: ``extract`` reuses a
finished store or opens a ``_Run`` (the state of one run: store, progress,
fingerprint, writer); ``_write_store`` feeds it the batches
(``_write_batch``: fingerprint, forward pass, reductions, writer) and
``_finish`` closes the writer and sets the completion marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ._version import __version__
from .batches import as_loader, batch_len, confounder_rows, model_input, to_device
from .errors import LayerSelectionError, StoreError
from .hooks import SimilarityModel
from .images import sample_labels
from .options import STORAGE_DTYPES, ExtractOptions
from .store.format import (
    DEFAULT_CHUNK_BYTES,
    INPUTS_ARRAY,
    LAYERS_GROUP,
    MASK_ARRAY,
    StoreInfo,
    chunk_samples,
    dimension_names,
    layer_name_problem,
)
from .store.reductions import LayerReducer, rules_key
from .store.remote import as_path, remove_tree
from .store.zarr_store import ZarrStore
from .text import attention_mask, fingerprint_rows
from .writer import ChunkWriter

__all__ = ["ExtractInterrupted", "ExtractResult", "extract", "weights_digest"]


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C during an extraction; its message says whether a rerun resumes the store or starts it again."""


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

    return {
        "simtorch": __version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
    }


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


def _request(sim: SimilarityModel, options: ExtractOptions, weights: str) -> dict:
    return {
        "reduce": rules_key(options.reduce),
        "model_spec": options.model_spec,
        "weights_digest": weights,
        "layer_patterns": [p if isinstance(p, str) else f"type:{p.__name__}" for p in sim.layers_to_include],
        "output_selector": repr(sim.output_selector),
        "dtype": options.dtype,
        "inputs_stored": options.store_inputs,
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


def extract(
    model: nn.Module | SimilarityModel,
    data: Any,
    path: str | os.PathLike[str],
    *,
    options: ExtractOptions | None = None,
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
    options : ExtractOptions, optional
        Every option below as one object (``extract.options``); then the
        keyword options must be left at their defaults.
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
        Per-layer reductions applied before storing (``extract.store.reductions``):
        ``"gap"``, ``["block*=pool2", "fc*=flatten"]``... Token layers of text
        inputs default to ``mean`` over valid tokens, other layers to
        ``flatten``; the store records each layer's reduction.

    Returns
    -------
    ExtractResult
    """
    given = ExtractOptions(
        name=name, layers=layers, batch_size=batch_size, dtype=dtype, device=device, force=force,
        store_inputs=store_inputs, output_selector=output_selector, model_spec=model_spec, chunk_bytes=chunk_bytes,
        progress=progress, reduce=reduce, replace_stale=replace_stale,
    )
    if options is None:
        options = given
    elif given != ExtractOptions():
        raise TypeError("Pass extract()'s options either as options=ExtractOptions(...) or as keyword arguments, "
                        "not both.")
    return _extract(model, data, path, options)


def _extract(model: nn.Module | SimilarityModel, data: Any, path: str | os.PathLike[str],
             options: ExtractOptions) -> ExtractResult:
    """``extract`` with its options as one object: reuse a finished store, or write (or resume) it."""
    started = time.perf_counter()
    if options.dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {options.dtype!r}.")
    sim = model if isinstance(model, SimilarityModel) else SimilarityModel(
        model, options.name, options.layers, output_selector=options.output_selector
    )
    for layer in sim.module_names:  # before anything is written: a store that could never be completed
        problem = layer_name_problem(layer, sim.module_names)
        if problem:
            raise LayerSelectionError(f"Model {sim.model_name!r}: {problem}.")
    run_device = torch.device(options.device) if options.device is not None else sim.device
    sim.model.to(run_device)
    loader, n = as_loader(data, options.batch_size)
    path = as_path(path)  # a pathlib.Path, or a UrlPath for s3://... (extract.store.remote)
    request = _request(sim, options, weights_digest(sim.model))

    with _exclusive_lock(path):
        info = _reusable_info(path, request, options.force or options.replace_stale and _is_stale(path, request))
        if info is not None and info.complete:
            try:
                _verify_fingerprint(loader, info, path)
            except StoreError:
                if not options.replace_stale:
                    raise
                info = _reusable_info(path, request, True)
            if info is not None:
                return ExtractResult(path, info.n_samples, info.layers, True, info.n_samples,
                                     time.perf_counter() - started, 0)
        run = _Run.open(sim=sim, n=n, path=path, request=request, info=info, options=options, device=run_device)
        run.labels = sample_labels(data)
        return _write_store(run, loader, started)


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
        inputs = model_input(batch)
        fp.update(fingerprint_rows(inputs, confounder_rows(inputs)))
    if fp.finish() != info.fingerprint:
        raise StoreError(
            f"The finished store at {path} was extracted from different data (fingerprint mismatch); "
            "pass --force to re-extract it, or choose another --out."
        )


@dataclass
class _Run:
    """The state of one extraction run, from its first batch to the completion marker."""

    sim: SimilarityModel
    n: int
    path: Path
    options: ExtractOptions
    device: torch.device
    store: ZarrStore
    info: StoreInfo
    created_here: bool
    resume_from: int
    reducer: LayerReducer
    fp: _Fingerprint | None = None
    writer: ChunkWriter | None = None
    position: int = 0  # first sample of the next batch
    verified: int = 0  # chunk digests already checked against the partial store's
    per_sample: dict[str, tuple[int, ...]] = field(default_factory=dict)
    labels: tuple[list[str], list[str]] | None = None  # (file paths, classes) of an image folder

    @classmethod
    def open(cls, *, sim: SimilarityModel, n: int, path: Path, request: dict, info: StoreInfo | None,
             options: ExtractOptions, device: torch.device) -> _Run:
        """Create the store (``info`` None) or reopen the partial one ``info`` describes."""
        created_here = info is None
        store = ZarrStore(path, read_only=False, create=created_here)
        if info is not None and info.n_samples != n:
            raise StoreError(
                f"The partial store at {path} was started for {info.n_samples} samples, the data has {n}; "
                "pass --force to start again."
            )
        if info is None:
            info = _new_info(sim, request, options, n)
            store.write_info(info)
        _remove_partial_files(path)
        return cls(sim=sim, n=n, path=path, options=options, device=device, store=store, info=info,
                   created_here=created_here, resume_from=info.samples_done, reducer=LayerReducer(options.reduce),
                   fp=_Fingerprint(info.chunk_samples) if info.chunk_samples else None)


def _new_info(sim: SimilarityModel, request: dict, options: ExtractOptions, n: int) -> StoreInfo:
    """The attributes of a new store, before its arrays exist."""
    return StoreInfo(
        model_name=sim.model_name,
        model_spec=request["model_spec"],
        weights_digest=request["weights_digest"],
        dtype=options.dtype,
        n_samples=n,
        inputs_stored=options.store_inputs,
        versions=_library_versions(),
        request={k: request[k] for k in ("layer_patterns", "output_selector", "reduce")},
        write_id=uuid.uuid4().hex,
    )


def _write_store(run: _Run, loader: Any, started: float) -> ExtractResult:
    """Feed every batch to ``run`` with the hooks registered, then set the completion marker."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.n, initial=run.resume_from, desc=f"extract {run.sim.model_name}", unit="sample",
               disable=not run.options.progress, leave=False)
    try:
        with run.sim.hooked():
            for batch_index, batch in enumerate(loader):
                added = _write_batch(run, batch_index, batch)
                if added:
                    bar.update(added)
            fingerprint, bytes_written = _close_writer(run)
    except BaseException as exc:
        _clean_up_failed_run(run)
        if isinstance(exc, OSError):
            raise StoreError(
                f"Writing the store at {run.path} failed ({exc.strerror or exc}); free disk space or choose a "
                f"writable --out, then {_rerun_advice(run)}"
            ) from exc
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, ExtractInterrupted):
            raise ExtractInterrupted(f"{run.path}: {_rerun_advice(run)} Finished stores are reused.") from exc
        raise
    finally:
        bar.close()
    return _finish(run, fingerprint, bytes_written, started)


def _write_batch(run: _Run, batch_index: int, batch: Any) -> int:
    """Fingerprint one batch and, past the resume point, capture and queue its layers; the samples added."""
    inputs = model_input(batch)
    rows = batch_len(inputs)
    confounder = confounder_rows(inputs)
    fingerprinted = fingerprint_rows(inputs, confounder)
    start, stop = run.position, run.position + rows
    if run.fp is not None:
        run.fp.update(fingerprinted)
        _check_resumed_chunks(run)
    if stop <= run.resume_from:
        run.position = stop
        return 0
    outputs = _forward(run.sim, inputs, run.device, batch_index, start, stop)
    arrays = _batch_arrays(run, outputs, inputs, confounder)
    _check_batch_shapes(arrays, run.per_sample, batch_index)
    if run.writer is None:
        _start_writing(run, arrays, fingerprinted)
    skip = max(0, run.resume_from - start)
    run.writer.add({k: v[skip:] for k, v in arrays.items()})
    run.position = stop
    return rows - skip


def _forward(sim: SimilarityModel, inputs: Any, device: torch.device, batch_index: int, start: int,
             stop: int) -> dict[str, torch.Tensor]:
    """The captured layer outputs of one batch; a model failure names the batch and its samples."""
    try:
        return sim.forward(to_device(inputs, device))
    except LayerSelectionError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"Model {sim.model_name!r} failed on batch {batch_index} (samples {start}..{stop - 1}) "
            f"with inputs of shape {_describe(inputs)}: {type(exc).__name__}: {exc}. "
            "Check that the data has the shape and dtype the model expects."
        ) from exc


def _batch_arrays(run: _Run, outputs: dict[str, torch.Tensor], inputs: Any,
                  confounder: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of every store array for one batch: reduced layers, inputs and attention mask."""
    mask = attention_mask(inputs)
    outputs = run.reducer(outputs, None if mask is None else mask.to(run.device))
    dtype = run.options.dtype
    arrays = {f"{LAYERS_GROUP}/{k}": _as_storage(v, dtype, k) for k, v in outputs.items()}
    if run.options.store_inputs:
        arrays[INPUTS_ARRAY] = confounder
    if mask is not None:
        arrays[MASK_ARRAY] = mask.cpu().numpy().astype(np.uint8)
    return arrays


def _start_writing(run: _Run, arrays: dict[str, np.ndarray], fingerprinted: np.ndarray) -> None:
    """On the first captured batch: create (or check) the arrays and start the chunk writer."""
    if run.info.chunk_samples:  # resuming: what is on disk must fit
        _check_partial_arrays(run, arrays)
    else:
        run.info.reductions = run.reducer.recorded
        run.info.request["token_layers"] = list(run.reducer.token_layers)
        _create_arrays(run, arrays)
    if run.fp is None:
        run.fp = _Fingerprint(run.info.chunk_samples)
        run.fp.update(fingerprinted)
    run.writer = _chunk_writer(run)


def _close_writer(run: _Run) -> tuple[str, int]:
    """After the last batch: the dataset fingerprint and the bytes written, once every chunk is durable."""
    if run.position != run.n:
        raise ValueError(f"The data yielded {run.position} samples but reports {run.n} (len); fix its __len__.")
    # Close the last partial chunk's digest before the writer records that chunk as durable.
    fingerprint = run.fp.finish()
    _check_resumed_chunks(run)
    if run.writer is None:
        return fingerprint, 0
    run.writer.close()
    return fingerprint, run.writer.bytes_written


def _rerun_advice(run: _Run) -> str:
    """What a rerun of a failed or interrupted run does: resume, or (nothing durable yet) start again."""
    done = 0 if not run.path.exists() else run.store.info.samples_done
    if done:
        return f"rerun the same command to resume ({done} of {run.n} samples are written)."
    return "rerun the same command to start again (no sample had been written, so there is nothing to resume)."


def _clean_up_failed_run(run: _Run) -> None:
    """Stop the writer; remove a store this run created before any chunk of it became durable."""
    if run.writer is not None:
        run.writer.abort()
    if run.created_here and run.store.info.samples_done == 0:
        remove_tree(run.path, ignore_errors=True)


def _finish(run: _Run, fingerprint: str, bytes_written: int, started: float) -> ExtractResult:
    """Record the sample labels, the fingerprint and chunk digests, and set the completion marker."""
    if run.labels is not None:
        run.store.write_sample_labels(*run.labels)
    info = run.store.info
    info.fingerprint = fingerprint
    info.chunk_digests = run.fp.chunk_digests
    info.samples_done = run.n
    info.complete = True
    run.store.write_info(info)
    return ExtractResult(run.path, run.n, info.layers, False, run.resume_from, time.perf_counter() - started,
                         bytes_written)


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


def _check_partial_arrays(run: _Run, arrays: dict[str, np.ndarray]) -> None:
    """On resume, the first captured batch must fit the layers and arrays already on disk."""
    layers = list(run.sim.layers)
    if run.info.layers != layers:
        raise StoreError(
            f"The partial store at {run.path} holds layers {run.info.layers} but the model now gives {layers}; "
            "pass --force to start again."
        )
    for key, block in arrays.items():
        shape = block.shape[1:]
        if not run.store.has_array(key) or run.store.array_shape(key)[1:] != shape:
            raise StoreError(
                f"The partial store at {run.path} has no array {key!r} of per-sample shape {shape}; "
                "the model changed since it was started. Pass --force to start again."
            )


def _create_arrays(run: _Run, arrays: dict[str, np.ndarray]) -> None:
    """Create every array, chunked for the widest, from the first captured batch; record layers and shapes."""
    info = run.info
    per_sample = {k: v.shape[1:] for k, v in arrays.items()}
    widest = max(int(np.prod(s, dtype=np.int64)) * arrays[k].dtype.itemsize for k, s in per_sample.items())
    info.chunk_samples = chunk_samples(widest, run.n, run.options.chunk_bytes)
    token_keys = {f"{LAYERS_GROUP}/{k}" for k in run.reducer.token_layers
                  if run.reducer.reductions is None or run.reducer.reductions[k].is_identity}
    for key, shape in per_sample.items():
        run.store.create_array(key, (run.n, *shape), str(arrays[key].dtype), info.chunk_samples,
                               dims=dimension_names(key, (run.n, *shape), key in token_keys))
    info.layers = list(run.sim.layers)
    info.input_shape = list(arrays[INPUTS_ARRAY].shape[1:]) if INPUTS_ARRAY in arrays else []
    run.store.write_info(info)


def _chunk_writer(run: _Run) -> ChunkWriter:
    """The background writer; after each durable write it records progress and chunk digests in the store."""
    store, fp = run.store, run.fp

    def on_chunk_written(stop: int, chunk_index: int) -> None:
        current = store.info
        current.samples_done = stop
        current.chunk_digests = fp.chunk_digests[: chunk_index + 1]
        store.write_info(current)

    return ChunkWriter(store, run.info.chunk_samples, run.resume_from, on_chunk_written)


def _check_resumed_chunks(run: _Run) -> None:
    """On resume, the data's chunk digests must equal those recorded for the chunks already written.

    Checks the digests from index ``run.verified`` on and advances it.
    """
    info, fp = run.info, run.fp
    done = -(-run.resume_from // info.chunk_samples) if info.chunk_samples else 0  # ceil: a final partial chunk
    last = min(done, len(fp.chunk_digests))
    for i in range(run.verified, last):
        if i < len(info.chunk_digests) and fp.chunk_digests[i] != info.chunk_digests[i]:
            raise StoreError(
                f"The data differs from the data the partial store at {run.path} was started with "
                f"(chunk {i}); pass --force to start again, or choose another --out."
            )
    run.verified = max(run.verified, last)


def _remove_partial_files(path: Path) -> None:
    """Delete temporary files a killed writer may have left (zarr writes via *.partial + rename)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
