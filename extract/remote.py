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

__all__ = ["exists", "find_stores", "is_url", "local_lock_path", "parse_storage_options", "remove", "upload_folder"]

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
