"""Remote stores: extract into and measure from a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from extract.runner import extract  # noqa: E402
from extract.store import ZarrStore  # noqa: E402
from measure.engine import Engine  # noqa: E402
from measure.engine.cache import StatisticsCache  # noqa: E402
from measure.report import read_matrix_csv  # noqa: E402

N = 48
BUCKET = "simtorch-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moto's S3 server in a thread; stopping and restarting it keeps the buckets (moto's state is in-process)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._server = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="module")
def s3():
    server = Server()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # credentials and endpoint from the environment, as a user would set them
    server.start()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))


def _data() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((N, 12)).astype(np.float32))


def _extract(out: str | Path, seed: int):
    target = f"{out}/m{seed}.zarr" if isinstance(out, str) else out / f"m{seed}.zarr"
    return extract(_model(seed), _data(), target, name=f"m{seed}", layers=["0", "2"], batch_size=16,
                   progress=False, chunk_bytes=16 * 12 * 4, device="cpu")


@pytest.fixture(scope="module")
def zoos(s3, tmp_path_factory):
    """The same three models extracted into S3 and into a local folder."""
    os.environ.setdefault("SIMTORCH_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))
    local = tmp_path_factory.mktemp("local")
    remote = f"s3://{BUCKET}/zoo"
    for seed in (0, 1, 2):
        _extract(remote, seed)
        _extract(local, seed)
    return remote, local


def test_extract_into_s3_equals_local(zoos):
    remote, local = zoos
    for seed in (0, 1, 2):
        r, lo = ZarrStore(f"{remote}/m{seed}.zarr"), ZarrStore(local / f"m{seed}.zarr")
        assert r.info.complete and r.info.fingerprint == lo.info.fingerprint
        for layer in ("0", "2"):
            np.testing.assert_array_equal(r.read_layer(layer), lo.read_layer(layer))
    # rerunning the extraction reuses the finished remote store (no inference)
    assert _extract(remote, 0).cached


def test_measure_from_s3_equals_local(zoos):
    remote, local = zoos
    measures = [("cka", {}), ("dcka", {})]
    pairs = [(0, 1), (1, 2), (0, 0)]
    run = Engine([ZarrStore(f"{remote}/m{s}.zarr") for s in (0, 1, 2)], device="cpu").run(measures, pairs)
    ref = Engine([ZarrStore(local / f"m{s}.zarr") for s in (0, 1, 2)], device="cpu").run(measures, pairs)
    for a, b in zip(run, ref, strict=True):
        np.testing.assert_allclose(a.matrix, b.matrix, rtol=0, atol=1e-12)


def test_cli_server_stopped_mid_measure_then_rerun_completes(zoos, s3, tmp_path, capsys, monkeypatch):
    from pipeline import main

    remote, local = zoos
    results = f"s3://{BUCKET}/results"
    # the Gram route (the narrow layers' auto route would take moments): what is cached per layer
    args = ["measure", remote, "--measures", "cka(route=gram)", "--out", results, "--no-plots", "--quiet"]
    layers_read: set = set()
    original = ZarrStore.read

    cache = StatisticsCache(f"s3://{BUCKET}/zoo/.simtorch-cache.zarr")

    def complete_entries() -> int:
        return sum(1 for a in cache.entries().values() if a.get("complete"))

    def read_then_fail(self, key, start=0, stop=None, out=None):
        layers_read.add((self.path, key))
        if len(layers_read) == 4 and start == 0:  # the fourth layer starts: the server goes away once the
            deadline = time.monotonic() + 30     # background writer has stored two Grams in the remote cache
            while complete_entries() < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            s3.stop()
        return original(self, key, start, stop, out)

    monkeypatch.setattr(ZarrStore, "read", read_then_fail)
    try:
        code = main(args)
    finally:
        monkeypatch.setattr(ZarrStore, "read", original)
        s3.start()
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not be reached" in lines[0] and "rerun" in lines[0], err
    assert "Traceback" not in err

    kept = complete_entries()
    assert kept >= 2  # the Grams written before the failure were kept in the remote cache

    assert main([a for a in args if a != "--quiet"]) == 0  # the rerun completes, reusing what was cached
    printed = capsys.readouterr().out
    assert f"statistics: {6 - kept} computed, {kept} reused" in printed

    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    local_out = tmp_path / "from_s3"
    fs.get(f"{BUCKET}/results/", str(local_out) + "/", recursive=True)
    assert main(["measure", str(local), "--measures", "cka(route=gram)", "--out", str(tmp_path / "local_out"),
                 "--no-plots", "--quiet", "--no-cache"]) == 0
    capsys.readouterr()
    for pair in ("m0__m1", "m0__m2", "m1__m2", "m0__m0"):
        _, _, got = read_matrix_csv(local_out / "cka" / f"{pair}.csv")
        _, _, want = read_matrix_csv(tmp_path / "local_out" / "cka" / f"{pair}.csv")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_missing_remote_store_is_a_clear_error(s3, capsys):
    from pipeline import main

    code = main(["measure", f"s3://{BUCKET}/nothing-here", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "No store at" in err


def test_cli_extract_into_s3_then_rerun_reuses_it(s3, zoos, capsys, tmp_path):
    from extract.demo import cnn
    from pipeline import main

    torch.manual_seed(0)
    torch.save(cnn().state_dict(), tmp_path / "w.pt")
    args = ["extract", "--model", "extract.demo:cnn", "--weights", str(tmp_path / "w.pt"), "--data", "digits",
            "--layers", "fc2", "--name", "cli", "--out", f"s3://{BUCKET}/cli", "--device", "cpu", "--quiet",
            "--no-inputs"]
    assert main(args) == 0
    store = ZarrStore(f"s3://{BUCKET}/cli/cli.zarr")
    assert store.info.complete and store.layers == ["fc2"] and store.read_layer("fc2").shape[1:] == (10,)
    capsys.readouterr()
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
