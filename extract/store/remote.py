"""Stores on fsspec URLs (``s3://bucket/zoo/model.zarr``, ``gcs://...``, ``memory://...``).

Local paths keep using ``pathlib``; these helpers give URLs the few file-system
operations the stages need (exists, remove, list a folder of stores, glob).
Credentials are never taken from code: s3fs reads ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (or
``~/.aws``) from the environment, and anything else goes in
``storage_options`` (the CLI's ``--storage-options JSON``).

Object stores have no file locks, so ``extract`` serialises writers to one URL
with an ``fcntl`` lock on a file in a local lock folder (``local_lock_path``):
that protects against two processes on one machine, not against two machines
writing the same URL; give each machine its own ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "UrlPath", "as_path", "exists", "find_stores", "is_url", "local_lock_path", "parse_storage_options", "remove",
    "remove_tree", "unreachable_message", "upload_folder",
]

LOCK_DIR_ENV = "SIMTORCH_LOCK_DIR"


def is_url(path: Any) -> bool:
    """True for ``protocol://...`` strings other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` JSON text -> dict (None when not given); ValueError naming the flag otherwise."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options must be a JSON object such as '{{\"anon\": true}}'; "
                         f"could not parse {text!r} ({exc.msg}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options must be a JSON object such as '{{\"anon\": true}}', "
                         f"got a {type(value).__name__}.")
    return value


def _fs(url: str, storage_options: dict[str, Any] | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root


def _with_protocol(url: str, path: str) -> str:
    protocol = url.split("://", 1)[0]
    return f"{protocol}://{path.split('://', 1)[-1]}"


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything exists at ``url``."""
    fs, root = _fs(url, storage_options)
    fs.invalidate_cache()
    return bool(fs.exists(root))


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove everything under ``url`` (no error when nothing is there)."""
    fs, root = _fs(url, storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.invalidate_cache()


def find_stores(spec: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Store URLs from one URL: a store, a folder holding ``*.zarr`` stores, or a glob.

    Hidden entries (names starting with a dot, e.g. the statistics cache) are skipped.
    """
    fs, root = _fs(spec, storage_options)
    fs.invalidate_cache()
    if any(c in root for c in "*?["):
        found = fs.glob(root)
    elif fs.exists(f"{root.rstrip('/')}/zarr.json"):
        found = [root]
    elif fs.isdir(root):
        found = [p for p in fs.ls(root, detail=False) if p.rstrip("/").endswith(".zarr")]
    else:
        found = []
    found = [p.rstrip("/") for p in found if not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")]
    return sorted(_with_protocol(spec, p) for p in found)


def local_lock_path(url: str) -> Path:
    """A local lock file standing in for the sibling lock file a URL cannot have."""
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path.home() / ".cache" / "simtorch" / "locks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.lock"


def upload_folder(local: str | os.PathLike[str], url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy the local folder ``local`` (recursively) to ``url``."""
    fs, root = _fs(url, storage_options)
    fs.put(str(local).rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
    fs.invalidate_cache()


class UrlPath:
    """The few ``pathlib.Path`` operations ``extract`` uses, for a store at a URL.

    ``parent`` is the *local* lock folder (``local_lock_path``): an object store has no
    sibling lock file, so writers to one URL are serialised per machine only.
    ``rglob`` finds nothing: fsspec writes whole objects, never ``*.partial`` files.
    """

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Path:
        return local_lock_path(self.url).parent / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def exists(self) -> bool:
        return exists(self.url)

    def rglob(self, pattern: str) -> list[Path]:
        return []


def as_path(path: str | os.PathLike[str] | UrlPath) -> Path | UrlPath:
    """``UrlPath`` for URLs, ``pathlib.Path`` otherwise."""
    if isinstance(path, UrlPath):
        return path
    return UrlPath(str(path)) if is_url(path) else Path(path)


def remove_tree(path: Path | UrlPath, ignore_errors: bool = False) -> None:
    """``shutil.rmtree`` for local folders, a recursive delete for URLs."""
    import shutil

    if isinstance(path, UrlPath):
        try:
            remove(path.url)
        except Exception:
            if not ignore_errors:
                raise
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


_CONNECTION_ERRORS = ("ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                      "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "TimeoutError")


def unreachable_message(what: str, exc: BaseException) -> str | None:
    """A one-line explanation when ``exc`` (or its cause) is a lost connection to remote storage, else None."""
    seen = 0
    while exc is not None and seen < 8:
        if any(cls.__name__ in _CONNECTION_ERRORS for cls in type(exc).__mro__):
            return (f"{what} could not be reached ({type(exc).__name__}: {exc}); the storage server is down or "
                    "unreachable. Check the endpoint (AWS_ENDPOINT_URL / --storage-options) and the network, then "
                    "rerun the same command: finished work is kept (stores resume, measure reuses its cache).")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
