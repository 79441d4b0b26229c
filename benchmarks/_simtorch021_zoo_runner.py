"""simtorch 0.2.1 on every pair of a zoo, in one process (run inside simtorch 0.2.1's own venv).

Started by ``bench_zoo.py`` as ``<simtorch venv>/bin/python _simtorch021_zoo_runner.py JOB.json``. For each
of the M(M-1)/2 pairs it builds both models from their state dicts, wraps them in simtorch's
``SimilarityModel`` and runs ``CKA(...).compute(loader)`` as a user would: inference is rerun for
every pair. Only the ``compute`` calls are timed (model construction and imports are not). With
``max_pairs`` only the first pairs are run and the time is scaled to all pairs (every pair has the same
models' shapes and data, so the same cost); the JSON says how many were measured.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_measure_models import LAYERS, WideCNN  # noqa: E402


def main(job_path: str) -> None:
    from simtorch.model.sim_model import SimilarityModel
    from simtorch.similarity import CKA
    from simtorch.version import VERSION

    job = json.loads(Path(job_path).read_text())
    device = job["device"]
    inputs = torch.load(job["inputs"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=job["batch_size"],
                                         shuffle=False)
    seconds = cpu_seconds = 0.0
    pairs = list(itertools.combinations(range(len(job["state_dicts"])), 2))
    measured = pairs[: job.get("max_pairs") or len(pairs)]  # every pair costs the same: same models' shapes, data
    for i, j in measured:
        sims = []
        for k in (i, j):
            model = WideCNN(job["width"])
            model.load_state_dict(torch.load(job["state_dicts"][k]))
            layers = list(job.get("layers", LAYERS))
            sims.append(SimilarityModel(model, model_name=f"model{k}", layers_to_include=layers, device=device))
        cka = CKA(sims[0], sims[1], device=device)
        started, cpu_started = time.perf_counter(), time.process_time()
        cka.compute(loader)
        seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
    scale = len(pairs) / len(measured)
    Path(job["out"]).write_text(json.dumps({"seconds": seconds * scale, "cpu_seconds": cpu_seconds * scale,
                                            "pairs": len(pairs), "measured_pairs": len(measured),
                                            "measured_seconds": seconds,
                                            "simtorch_version": VERSION, "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
