"""The model-pair API within its memory budget: spilled = held, temporary stores removed, peaks measured.

``CKA(...).compute(loader)`` holds the captured activations in memory while they fit half of
``memory_budget`` and spills them to temporary Zarr stores beyond it; ``MinibatchCKA`` streams one
batch at a time. Values must not depend on either, and peak memory is measured in a child process
(``ru_maxrss``), where nothing else of the test run counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import measure.spill as spill
from extract import SimilarityModel
from measure import CKA, DeconfoundedCKA, MeasureError
from measure.accumulators.minibatch import MinibatchCKAMatrix
from measure.engine import Engine
from measure.similarity import MinibatchCKA, capture

N = 400
LAYERS = ["1", "2", "5", "6"]  # ReLU (32×8×8), pool (32×4×4), tanh (12), logits (5)
BUDGET = 16 << 20  # holds 8 MiB of rows; the two models' float64 activations take 16.5 MiB, so they spill
# float32 activations get float32 Gram products on rows shifted by column means (precision "auto"): in
# core by all rows' means, out of core by the first row block's, so a spilled run (read in blocks) may
# round differently; that scheme's error on CKA is below 1e-9 (benchmarks/README.md, bench_measure (a32))
FLOAT32_GRAMS_ATOL = 5e-9
N_MB = 120  # the minibatch tests store nothing and need no more

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small products


def _cnn(seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 12), nn.Tanh(),
        nn.Linear(12, 5),
    ).to(dtype)


def _pair(seeds=(0, 1), dtype: torch.dtype = torch.float64, layers=LAYERS) -> list[SimilarityModel]:
    return [SimilarityModel(_cnn(s, dtype), model_name=f"net{s}", layers_to_include=layers) for s in seeds]


def _loader(n: int = N, batch_size: int = 37, dtype: torch.dtype = torch.float64, seed: int = 0) -> DataLoader:
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


@pytest.fixture
def spill_folders(monkeypatch, tmp_path):
    """Temporary folders go under ``tmp_path``; yields the list of folders the captures spilled to."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    original = spill.SpillingCapture._spill

    def spy(self, first):
        original(self, first)
        seen.append(self.spilled_to)

    monkeypatch.setattr(spill.SpillingCapture, "_spill", spy)
    return seen


def _engine_matrix(models, loader, name, **options) -> np.ndarray:
    """The committed route: every activation captured into ``MemoryStore``s, then the engine on them."""
    stores = capture(models, loader, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the minibatch estimator warns about a left-out partial batch
        return Engine(stores, device="cpu").run([(name, options)], [(0, 1)])[0].matrix


# ----------------------------------------------------------------------------- exact route: held or spilled
@pytest.mark.parametrize("cls,kwargs,name", [
    (CKA, {}, "cka"), (CKA, {"unbiased": True}, "cka_debiased"), (DeconfoundedCKA, {}, "dcka"),
])
def test_spilled_equals_held_equals_engine(spill_folders, tmp_path, cls, kwargs, name):
    loader = _loader()
    held = cls(*_pair(), device="cpu", **kwargs).compute(loader)
    assert spill_folders == []  # 16.5 MiB of rows fit half of the default 1 GiB
    spilled = cls(*_pair(), device="cpu", memory_budget=BUDGET, **kwargs).compute(loader)
    assert len(spill_folders) == 1 and spill_folders[0].parent == tmp_path
    assert not spill_folders[0].exists() and list(tmp_path.iterdir()) == []
    # the same float64 rows, read back from Zarr chunks instead of one array: only the engine's block
    # boundaries (its budget) differ, which moves the Grams' summation order, hence round-off and not 0
    np.testing.assert_allclose(spilled, held, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(held, _engine_matrix(_pair(), loader, name))


def test_float32_activations_spill_as_float32(spill_folders):
    loader = _loader(dtype=torch.float32)
    models = _pair(dtype=torch.float32)
    held = CKA(*models, device="cpu").compute(loader)
    spilled = CKA(*models, device="cpu", memory_budget=BUDGET // 2).compute(loader)  # 8.3 MiB of float32 rows
    assert len(spill_folders) == 1
    np.testing.assert_allclose(spilled, held, rtol=0, atol=FLOAT32_GRAMS_ATOL)
    np.testing.assert_array_equal(held, _engine_matrix(models, loader, "cka"))


def test_spill_folder_is_removed_after_an_error(spill_folders, tmp_path):
    def failing_loader():
        for k, batch in enumerate(_loader(batch_size=50)):
            if k == 6:  # 300 rows in: past the 8 MiB held, so already spilled
                raise RuntimeError("loader broke")
            yield batch

    with pytest.raises(RuntimeError, match="loader broke"):
        CKA(*_pair(), device="cpu", memory_budget=BUDGET).compute(failing_loader())
    assert len(spill_folders) == 1 and list(tmp_path.iterdir()) == []

    x = next(iter(_loader(batch_size=N)))[0]
    x[N - 3, 0, 4, 4] = float("nan")  # found by the engine, reading the spilled stores
    with pytest.raises(MeasureError, match="NaN or Inf"):
        CKA(*_pair(), device="cpu", memory_budget=BUDGET).compute(DataLoader(TensorDataset(x), batch_size=37))
    assert len(spill_folders) == 2 and list(tmp_path.iterdir()) == []


def test_spilling_capture_holds_under_its_bound_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = np.random.default_rng(0)
    blocks = [(rng.standard_normal((10, 3)), {"a": rng.standard_normal((10, 4, 2)).astype(np.float32)})
              for _ in range(7)]
    with spill.SpillingCapture(["m"], hold_bytes=1000) as captured:
        for rows, out in blocks:
            captured.add(rows, [out])
            assert captured.held_bytes <= 1000
        assert captured.spilled_to is not None and captured.spilled_to.exists()
        (store,) = captured.finish()
        assert store.n_samples == 70 and store.info.complete and store.info.dtype == "float32"
        np.testing.assert_array_equal(store.read("layers/a", 0, 70), np.concatenate([o["a"] for _, o in blocks]))
        np.testing.assert_array_equal(store.read("inputs", 0, 70), np.concatenate([r for r, _ in blocks]))
    assert list(tmp_path.iterdir()) == []
    with spill.SpillingCapture(["m"], hold_bytes=None) as captured:
        for rows, out in blocks:
            captured.add(rows, [out])
        (store,) = captured.finish()
    assert captured.spilled_to is None and type(store).__name__ == "MemoryStore"


def test_bad_memory_budget():
    with pytest.raises(MeasureError, match="memory_budget must be a positive number of bytes"):
        CKA(*_pair(), device="cpu", memory_budget=0).compute(_loader())


# ----------------------------------------------------------------------------- minibatch CKA, streamed
def _hsic1(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (JMLR 2012) unbiased HSIC, eq. 5: K̃, L̃ the Grams with zeroed diagonals."""
    n = len(k)
    kt, lt = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    ones = np.ones(n)
    value = (np.sum(kt * lt.T) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones @ kt @ lt @ ones)
    return value / (n * (n - 3))


def _numpy_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Nguyen et al. (2021): Σₜ HSIC₁(Kₜ, Lₜ) / √(Σₜ HSIC₁(Kₜ, Kₜ) · Σₜ HSIC₁(Lₜ, Lₜ)), float64, full batches."""
    def grams(a):
        return [a[s:s + batch_size] @ a[s:s + batch_size].T for s in range(0, len(a) - batch_size + 1, batch_size)]
    gx, gy = [grams(x) for x in xs], [grams(y) for y in ys]
    sx = [sum(_hsic1(k, k) for k in g) for g in gx]
    sy = [sum(_hsic1(k, k) for k in g) for g in gy]
    return np.array([[sum(_hsic1(k, l_) for k, l_ in zip(a, b, strict=True)) / np.sqrt(sx[i] * sy[j])
                      for j, b in enumerate(gy)] for i, a in enumerate(gx)])


@pytest.mark.parametrize("n,widths,batch_size,loader_batch", [
    (90, ((5, 3), (4,)), 20, 7),  # fewer features than samples; a partial batch of 10 left out
    (48, ((200, 9), (150, 300)), 12, 5),  # more features than samples in every batch
])
def test_minibatch_accumulator_equals_numpy_reference(n, widths, batch_size, loader_batch):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, p, generator=g, dtype=torch.float64) for p in widths[0]]
    ys = [torch.randn(n, q, generator=g, dtype=torch.float64) + 0.5 * xs[0][:, :1] for q in widths[1]]
    acc = MinibatchCKAMatrix(batch_size=batch_size)
    for rows in torch.arange(n).split(loader_batch):
        acc.update([x[rows] for x in xs], [y[rows] for y in ys])
    out = acc.compute()
    expected = _numpy_minibatch_cka([x.numpy() for x in xs], [y.numpy() for y in ys], batch_size)
    assert out["n_batches"] == n // batch_size and out["n_samples"] == n
    # different algebra (centred Grams and Song's vectors against the literal formula): float64
    # round-off of sums of b² terms, well under 1e-12 for values of order 1
    np.testing.assert_allclose(out["cka_minibatch"].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,batch_size,loader_batch", [
    (torch.float64, 8, 8), (torch.float64, 16, 7), (torch.float32, 16, 7), (torch.float32, 50, 37),
    (torch.float64, N_MB, 64),
])
def test_streamed_minibatch_equals_engine(monkeypatch, dtype, batch_size, loader_batch):
    import measure.similarity as similarity

    def no_store(*args, **kwargs):
        raise AssertionError("the per-batch estimator must not keep the activations")

    loader = _loader(N_MB, batch_size=loader_batch, dtype=dtype)
    expected = _engine_matrix(_pair(dtype=dtype), loader, "cka_minibatch", batch_size=batch_size)
    monkeypatch.setattr(similarity, "_to_stores", no_store)
    mb = MinibatchCKA(*_pair(dtype=dtype), device="cpu", batch_size=batch_size)
    matrix = mb.compute(loader)
    # the same per-batch Grams and vectors; the engine takes one dot product over the concatenated
    # per-batch vectors where the stream adds one per batch: float64 round-off of the order of sums
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-13)
    assert mb.result.measure == "cka_minibatch" and mb.result.rows == LAYERS and mb.result.cols == LAYERS


def test_streamed_minibatch_reports_undefined_layers_and_bad_batch_sizes():
    models = _pair()
    with torch.no_grad():
        models[0].model[4].weight.zero_()  # layer "5" is constant over samples
    with pytest.raises(MeasureError, match="undefined for layer '5' of 'net0'"):
        MinibatchCKA(*models, device="cpu", batch_size=20).compute(_loader(N_MB))
    with pytest.raises(MeasureError, match=f"batch_size must be an integer between 4 and {N_MB}"):
        MinibatchCKA(*_pair(), device="cpu", batch_size=N_MB + 1).compute(_loader(N_MB))
    with pytest.raises(MeasureError, match="batch_size must be an integer ≥ 4"):
        MinibatchCKA(*_pair(), device="cpu", batch_size=3).compute(_loader(N_MB))


def test_minibatch_accumulator_holds_less_than_one_batch():
    acc = MinibatchCKAMatrix(batch_size=16)
    g = torch.Generator().manual_seed(0)
    for size in (5, 7, 30, 1, 40, 3):
        acc.update([torch.randn(size, 6, generator=g, dtype=torch.float64)],
                   [torch.randn(size, 4, generator=g, dtype=torch.float64)])
        assert sum(len(xs[0]) for xs, _ in acc.pending) < 16
    assert acc.compute()["n_batches"] == 86 // 16


# ----------------------------------------------------------------------------- peak memory, in a child process
CHILD = r"""
import json, resource, sys
import torch
from torch import nn
from extract import SimilarityModel
from measure.similarity import CKA, MinibatchCKA

torch.set_num_threads(1)
name, n, budget, channels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


class Inputs:  # drawn batch by batch: the inputs are never all held
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for start in range(0, self.n, 64):
            yield torch.randn(min(64, self.n - start), 3, 16, 16, generator=g)


def models():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        out.append(SimilarityModel(net, model_name=f"m{seed}", layers_to_include=["0", "1"]))
    return out


def run(n_samples):
    if name == "cka":
        return CKA(*models(), device="cpu", memory_budget=budget).compute(Inputs(n_samples))
    return MinibatchCKA(*models(), device="cpu", batch_size=128).compute(Inputs(n_samples))


run(256)  # imports, thread pools, the first spill: everything but the rows
def kib():  # this process's peak RSS: VmHWM (ru_maxrss keeps the pytest parent's peak across fork and exec)
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = kib()
matrix = run(n)
print(json.dumps({"base_mib": base / 1024, "peak_mib": kib() / 1024, "value": float(matrix[0, 1])}))
"""


def _child_peak(subprocess_env, tmp_path, name: str, n: int, budget: int, channels: int) -> dict:
    """Peak resident memory of one run in a fresh Python, above its own baseline after a small warm-up run."""
    env = {**subprocess_env, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CHILD, name, str(n), str(budget), str(channels)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["rise_mib"] = out["peak_mib"] - out["base_mib"]
    return out


MIB = 1 << 20
# What the budget does not bound: the n × n Grams (4 layers × 8 MiB at n = 1,024), and the engine's and
# the writers' working buffers, stated as 64 MiB. On the 2-core CPU machine the spilled run below rises
# 95 MiB above its baseline (budget + Grams), the held one 556 MiB
OVERHEAD_MIB = 64


def test_exact_route_peak_stays_under_budget_when_spilling(subprocess_env, tmp_path):
    # n = 1,024, 64 channels × 16 × 16: 64 MiB of float32 per layer, 256 MiB for the 4 layers of the pair
    n, channels, budget = 1024, 64, 64 * MIB
    grams_mib = 4 * n * n * 8 / MIB
    spilled = _child_peak(subprocess_env, tmp_path, "cka", n, budget, channels)
    held = _child_peak(subprocess_env, tmp_path, "cka", n, 1 << 40, channels)  # never spills
    assert list(tmp_path.iterdir()) == []
    assert abs(spilled["value"] - held["value"]) < FLOAT32_GRAMS_ATOL
    bound = budget / MIB + grams_mib + OVERHEAD_MIB
    assert spilled["rise_mib"] < bound, (spilled, held)
    assert held["rise_mib"] > bound + 64, (spilled, held)  # without spilling the same run passes the bound


def test_minibatch_peak_does_not_grow_with_the_number_of_batches(subprocess_env, tmp_path):
    # 16 channels × 16 × 16 = 4,096 float32 features per layer: 64 MiB of activations per 1,024 samples
    few = _child_peak(subprocess_env, tmp_path, "cka_minibatch", 512, 0, 16)  # 4 batches of 128
    many = _child_peak(subprocess_env, tmp_path, "cka_minibatch", 4096, 0, 16)  # 32 batches: 256 MiB if held
    assert many["rise_mib"] - few["rise_mib"] < 16, (few, many)
