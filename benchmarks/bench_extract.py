"""Benchmark stage one: extraction against bare forward passes, and the store's codec choice.

    .venv/bin/python benchmarks/bench_extract.py            # both tables (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_extract.py --quick    # smaller data, for a smoke run
    .venv/bin/python benchmarks/bench_extract.py --codecs-only STORES_DIR

Extraction table, per model (6 layers each): the time of ``extract.extract`` (hooks, float32 conversion, fingerprint,
background chunk writer, a fresh store each repeat) next to bare forward passes over the same
DataLoader batches under ``torch.inference_mode()`` (no hooks, nothing kept), the ratio of the two
(target ≤ 1.25×), the CPU time of the process for both (all threads: the extra CPU that extraction
costs, whatever the machine's load), the uncompressed bytes written per second, the on-disk size, and the
on-disk bytes per second of extraction next to the disk's own rate for the same files (a plain copy of the store,
best of 3). Each time is the fastest of ``--repeats`` interleaved runs (the least disturbed by other load on the
machine).

* demo-sized: ``extract.demo.DigitsCNN`` (width 16) on scikit-learn's 1,797 digits, 6 layers.
* larger: a VGG-style CNN (widths 64-128-256-256) on digits upsampled to 32×32, the images and their
  mirror images (3,594 samples), 6 layers (~120 KB of activations per sample).

Codec table: every layer array of real activations (the demo stores, or any folder of stores)
written to a fresh Zarr array with each codec chain (each ends in crc32c), then read back:
compression ratio (raw / on-disk bytes) and write / read throughput in MB/s of raw bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract import ZarrStore, extract  # noqa: E402
from extract.batches import as_loader  # noqa: E402
from extract.demo import DEMO_LAYERS, DigitsCNN, digits  # noqa: E402
from extract.store import DEFAULT_CHUNK_BYTES, chunk_samples  # noqa: E402

MB = 1e6
CHUNK_BYTES = DEFAULT_CHUNK_BYTES


# ----------------------------------------------------------------------------- models and data
class VGGish(nn.Module):
    """Four conv blocks (64, 128, 256, 256 channels) and two linear layers for 1×32×32 inputs."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.block1, self.block2 = block(1, 64), block(64, 128)
        self.block3, self.block4 = block(128, 256), block(256, 256)
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(256 * 2 * 2, 256), nn.ReLU())
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.block1, self.block2, self.block3, self.block4, self.fc1, self.fc2):
            x = layer(x)
        return x


def upsampled_digits(quick: bool) -> torch.Tensor:
    x = digits("all")[0]
    if quick:
        x = x[:600]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return torch.cat([x, x.flip(-1)]).contiguous()


def cases(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, int]]:
    torch.manual_seed(0)
    demo_x = digits("all")[0]
    return [
        ("demo DigitsCNN, digits", DigitsCNN(16).eval(), demo_x, 128),
        ("VGGish 64-256, digits 32x32", VGGish().eval(), upsampled_digits(quick), 64),
    ]


# ----------------------------------------------------------------------------- extraction
def bare_forward(model: nn.Module, data: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of forward passes that keep nothing."""
    loader, _ = as_loader(data, batch_size)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in loader:
            model(batch)
    return time.perf_counter() - started, time.process_time() - cpu


def timed_extract(model: nn.Module, data: torch.Tensor, batch_size: int,
                  folder: Path) -> tuple[float, float, int, int]:
    """(wall s, CPU s, raw bytes written, bytes on disk) of one extraction into a fresh store."""
    path = folder / "bench.zarr"
    shutil.rmtree(path, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    result = extract(model, data, path, layers=DEMO_LAYERS, batch_size=batch_size, progress=False,
                     chunk_bytes=CHUNK_BYTES)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return seconds, cpu, result.bytes_written, on_disk


def copy_rate(folder: Path) -> float:
    """The disk's own rate for the store just written: MB of its files per second of a plain copy, best of 3."""
    path = folder / "bench.zarr"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    best = float("inf")
    for _ in range(3):
        target = folder / "bench-copy.zarr"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        shutil.copytree(path, target)
        best = min(best, time.perf_counter() - started)
    shutil.rmtree(folder / "bench-copy.zarr", ignore_errors=True)
    return size / MB / best


def extraction_table(quick: bool, repeats: int, folder: Path) -> list[str]:
    rows = ["| model | samples | MB/sample | bare forward s | extract s | ratio | bare CPU s | extract CPU s | "
            "write MB/s | on disk MB | on-disk MB/s (of a plain copy) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for title, model, data, batch_size in cases(quick):
        bare_forward(model, data[:batch_size], batch_size)  # warm-up
        bare, ext = [], []
        raw = disk = 0
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            bare.append(bare_forward(model, data, batch_size))
            seconds, cpu, raw, disk = timed_extract(model, data, batch_size, folder)
            ext.append((seconds, cpu))
        (b, b_cpu), (e, e_cpu) = min(bare), min(ext)
        copy = copy_rate(folder)
        rows.append(f"| {title} | {len(data)} | {raw / len(data) / MB:.3f} | {b:.2f} | {e:.2f} | {e / b:.2f}x | "
                    f"{b_cpu:.2f} | {e_cpu:.2f} | {raw / MB / e:.0f} | {disk / MB:.1f} | "
                    f"{disk / MB / e:.0f} ({disk / MB / e / copy:.0%} of {copy:.0f}) |")
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- codecs
def codec_chains() -> dict[str, tuple[list, list]]:
    """Each chain as (zarr v3 codecs, the same codecs in numcodecs, for CPU timing without I/O)."""
    from numcodecs import CRC32C, Blosc, Zstd
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    return {
        "none + crc32c": ([Crc32cCodec()], [CRC32C()]),
        "blosc-lz4 shuffle clevel 5 + crc32c": (
            [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
            [Blosc("lz4", 5, Blosc.SHUFFLE), CRC32C()]),
        "blosc-lz4 noshuffle clevel 5 + crc32c": (
            [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()],
            [Blosc("lz4", 5, Blosc.NOSHUFFLE), CRC32C()]),
        "blosc-lz4 bitshuffle clevel 5 + crc32c": (
            [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
            [Blosc("lz4", 5, Blosc.BITSHUFFLE), CRC32C()]),
        "blosc-zstd shuffle clevel 1 + crc32c": (
            [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
            [Blosc("zstd", 1, Blosc.SHUFFLE), CRC32C()]),
        "zstd level 1 + crc32c": ([ZstdCodec(level=1), Crc32cCodec()], [Zstd(1), CRC32C()]),
        "zstd level 3 + crc32c": ([ZstdCodec(level=3), Crc32cCodec()], [Zstd(3), CRC32C()]),
    }


def cpu_throughput(chunks: list[np.ndarray], codecs: list, repeats: int) -> tuple[float, float]:
    """Encode and decode MB/s of raw bytes per CPU-second (all threads), no disk involved."""
    raw = sum(c.nbytes for c in chunks)
    enc, dec = [], []
    for _ in range(repeats):
        started = time.process_time()
        encoded = []
        for c in chunks:
            buf = c
            for codec in codecs:
                buf = codec.encode(buf)
            encoded.append(buf)
        enc.append(time.process_time() - started)
        started = time.process_time()
        for buf, c in zip(encoded, chunks, strict=True):
            for codec in reversed(codecs):
                buf = codec.decode(buf)
            assert np.frombuffer(buf, dtype=c.dtype).size == c.size
        dec.append(time.process_time() - started)
    return raw / MB / statistics.median(enc), raw / MB / statistics.median(dec)


def demo_arrays(stores_dir: Path) -> list[np.ndarray]:
    arrays = []
    for path in sorted(p for p in stores_dir.glob("*.zarr") if not p.name.startswith(".")):  # not the cache
        store = ZarrStore(path)
        arrays += [store.read_layer(layer) for layer in store.layers]
    if not arrays:
        raise SystemExit(f"No stores in {stores_dir}; run `python pipeline.py extract` first.")
    return arrays


def codec_table(stores_dir: Path, folder: Path, repeats: int) -> list[str]:
    import zarr

    arrays = demo_arrays(stores_dir)
    raw = sum(a.nbytes for a in arrays)
    chunks = []
    for a in arrays:
        rows = chunk_samples(a[0].nbytes, len(a), DEFAULT_CHUNK_BYTES)  # as the store chunks it
        chunks += [np.ascontiguousarray(a[i : i + rows]) for i in range(0, len(a), rows)]
    rows = [f"Activations: {len(arrays)} layer arrays from {stores_dir}, {raw / MB:.1f} MB raw float32.", "",
            "| codec chain | ratio | encode MB/CPU-s | decode MB/CPU-s | zarr write MB/s | zarr read MB/s |",
            "|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for title, (compressors, numcodecs_chain) in codec_chains().items():
        encode, decode = cpu_throughput(chunks, numcodecs_chain, repeats)
        writes, reads = [], []
        for _ in range(repeats):
            path = folder / "codec.zarr"
            shutil.rmtree(path, ignore_errors=True)
            group = zarr.open_group(path, mode="w", zarr_format=3)
            started = time.perf_counter()
            for i, a in enumerate(arrays):
                n_rows = chunk_samples(a[0].nbytes, len(a), DEFAULT_CHUNK_BYTES)
                z = group.create_array(f"a{i}", shape=a.shape, chunks=(n_rows, *a.shape[1:]), dtype=a.dtype,
                                       compressors=compressors, fill_value=0)
                z[:] = a
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            for i, a in enumerate(arrays):
                assert np.array_equal(group[f"a{i}"][:], a)
            reads.append(time.perf_counter() - started)
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
        rows.append(f"| {title} | {raw / disk:.2f} | {encode:.0f} | {decode:.0f} | "
                    f"{raw / MB / statistics.median(writes):.0f} | {raw / MB / statistics.median(reads):.0f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="runs per timing (median; default 3, quick 1)")
    parser.add_argument("--stores", default=str(ROOT / "data" / "activations"),
                        help="folder of stores for the codec table (default data/activations)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--chunk-mb", type=float, default=None, help="store chunk size in MB (default: extract's)")
    parser.add_argument("--codecs-only", action="store_true", help="only the codec table")
    parser.add_argument("--extract-only", action="store_true", help="only the extraction table")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_mb:
        global CHUNK_BYTES
        CHUNK_BYTES = int(args.chunk_mb * 2**20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        folder = Path(tmp)
        if not args.codecs_only:
            extraction_table(args.quick, repeats, folder)
        if not args.extract_only:
            print()
            codec_table(Path(args.stores), folder, repeats)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
