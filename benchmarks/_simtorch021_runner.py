"""Run simtorch 0.2.1's ``CKA.compute`` on the benchmark's models and data (inside simtorch's own venv).

Started by ``bench_measure.py`` as ``<simtorch venv>/bin/python _simtorch021_runner.py JOB.json``. The job
file names the state dicts, the input tensor, the batch size and device; the runner builds the models
from ``bench_measure_models`` (pure torch), runs ``simtorch.similarity.CKA(...).compute(loader)``
exactly as a user would (no ``no_grad``, its own per-batch loop) and writes the elapsed wall and CPU seconds, the
matrix and the versions it ran with to the job's ``out`` path as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_measure_models import LAYERS, WideCNN  # noqa: E402


def main(job_path: str) -> None:
    import simtorch
    from simtorch.model.sim_model import SimilarityModel
    from simtorch.similarity import CKA
    from simtorch.version import VERSION

    job = json.loads(Path(job_path).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = job["device"]
    inputs = torch.load(job["inputs"])
    sims = []
    for i, state in enumerate(job["state_dicts"]):
        model = WideCNN(job["width"])
        model.load_state_dict(torch.load(state))
        sims.append(SimilarityModel(model, model_name=f"model{i}", layers_to_include=list(job.get("layers", LAYERS)),
                                    device=device))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=job["batch_size"],
                                         shuffle=False)
    cka = CKA(sims[0], sims[1], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    matrix = cka.compute(loader)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    layers = [list(s.model_activations) for s in sims]
    Path(job["out"]).write_text(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "matrix": matrix.tolist(), "n_batches": len(loader),
        "layers": layers,
        "simtorch_version": VERSION, "simtorch_file": simtorch.__file__, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
