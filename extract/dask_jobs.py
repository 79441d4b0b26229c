"""Extraction of several models as dask tasks: one task per model, each writing its own store.

``extract_many(jobs, workers=N)`` starts a ``LocalCluster`` of N single-threaded
worker processes, ``scheduler="tcp://host:port"`` uses a running
``dask.distributed`` cluster and ``scheduler="threads"`` dask's local threaded
scheduler. A job names its model, weights and data by *spec* (strings such as
``extract.demo:cnn`` and ``digits``, or an array), so the worker loads them
itself, and with ``device=None`` the worker picks its own device (CUDA when it
has one). Stores are disjoint, so tasks never write the same files; each store
is resumable exactly as with a local run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["dask_client", "extract_job", "extract_many"]


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``workers``/``scheduler`` (closed on exit), or None for local work.

    ``scheduler`` may be None or "threads" (no client: dask's threaded scheduler), or a
    ``tcp://host:port`` address of a running scheduler.
    """
    if workers is not None and scheduler not in (None, "threads"):
        raise ValueError("Pass either --workers N (a local cluster) or --scheduler ADDRESS, not both.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive integer, got {workers!r}.")
    if workers is None and scheduler in (None, "threads"):
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ValueError("--workers/--scheduler need dask.distributed; install it with "
                         "`pip install 'simtorch[distributed]'`.") from exc
    if workers is not None:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                yield client
        return
    if "://" not in str(scheduler):
        raise ValueError(f"--scheduler must be 'threads' or a scheduler address such as tcp://host:8786, "
                         f"got {scheduler!r}.")
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise ValueError(f"Could not connect to the dask scheduler at {scheduler} ({exc}); start it with "
                         "`dask scheduler` (and workers with `dask worker ADDRESS`), or drop --scheduler.") from exc
    try:
        yield client
    finally:
        client.close()


def extract_job(model: str, data: Any, path: Any, *, weights: str | None = None, max_length: int | None = None,
                device: str | None = None, images: Any = None, **options: Any):
    """Runs on a worker: load ``model`` (a spec) and ``data`` (a spec or an array), then ``extract``.

    ``device=None`` picks CUDA when this worker has it, else CPU; ``images`` preprocesses an image
    folder (``extract.specs.load_data``).
    """
    import torch

    from .runner import extract
    from .specs import load_data, load_model, prepare_for_model

    net = load_model(model, weights)
    if isinstance(data, str):
        data = prepare_for_model(load_data(data, images), net, str(model), max_length=max_length)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return extract(net, data, path, device=device, progress=False, **options)


def extract_many(jobs: Sequence[dict[str, Any]], *, workers: int | None = None,
                 scheduler: str | None = "threads") -> list[Any]:
    """``extract_job(**job)`` for every job as a dask task; the ``ExtractResult`` of each, in order."""
    with dask_client(workers, scheduler) as client:
        if client is not None:
            futures = [client.submit(extract_job, pure=False, **job) for job in jobs]
            return list(client.gather(futures))
        import dask

        tasks = [dask.delayed(extract_job, pure=False)(**job) for job in jobs]
        return list(dask.compute(*tasks, scheduler=scheduler or "threads"))
