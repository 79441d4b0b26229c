"""The options of one extraction, as one object.

``ExtractOptions`` holds every keyword option of ``extract.extract``; the
function builds one from its keyword arguments, or takes one as
``options=``. The command line builds them from flags and the TOML config in
one place (``extract.cli.plan_extract``) and hands each model's
``ExtractJob`` to ``extract`` locally or to a dask worker
(``extract.dask_jobs.extract_job``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .store.format import DEFAULT_CHUNK_BYTES

__all__ = ["STORAGE_DTYPES", "ExtractJob", "ExtractOptions"]

STORAGE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExtractOptions:
    """How ``extract`` captures and stores one model's layers.

    Parameters
    ----------
    name : str, optional
        Model name recorded in the store (default: the model's class name).
    layers : sequence of str or nn.Module types, optional
        Module names, globs or types (``extract.hooks.resolve_layers``).
    batch_size : int, default=64
        Samples per forward pass.
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype of the activations.
    device : str or torch.device, optional
        Where the model runs (default: where its parameters are).
    force : bool, default=False
        Overwrite an existing store instead of resuming or reusing it.
    store_inputs : bool, default=True
        Also store the flattened inputs (dCKA's confounder).
    output_selector : int, str or dict, optional
        Which tensor to capture from tuple/dict outputs (``SimilarityModel``).
    model_spec : str, default=""
        How the model was built (recorded in the store; the CLI writes
        ``"SPEC|weights=FILE"``).
    chunk_bytes : int, default=4 MiB
        Target bytes per chunk of the widest array.
    progress : bool, default=True
        Show a progress bar.
    reduce : str, list of str or dict, optional
        Per-layer reductions before storing (``extract.store.reductions``).
    replace_stale : bool, default=False
        Overwrite a store written with other weights, options or data.
    """

    name: str | None = None
    layers: Sequence[Any] | None = None
    batch_size: int = 64
    dtype: str = "float32"
    device: Any = None
    force: bool = False
    store_inputs: bool = True
    output_selector: Any = None
    model_spec: str = ""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: bool = True
    reduce: Any = None
    replace_stale: bool = False

    def replace(self, **changes: Any) -> ExtractOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExtractJob:
    """One store to write: the model and data by spec (loaded where the job runs), the store and its options.

    ``data`` is a data spec (``"digits"``, a file, ``module:function``) or an
    array; ``max_length`` pads or truncates text data (``extract.text``);
    ``images`` (an ``extract.images.ImagePreprocessing``, None: the default or
    the model directory's image processor) preprocesses an image folder.
    """

    model: str
    weights: str | None
    data: Any
    path: Any
    options: ExtractOptions
    max_length: int | None = None
    images: Any = None

    def task(self) -> dict[str, Any]:
        """Keyword arguments of ``extract.dask_jobs.extract_job`` (which turns progress bars off)."""
        options = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
        del options["progress"]
        images = {} if self.images is None else {"images": self.images}  # image-folder preprocessing, when set
        return {"model": self.model, "weights": self.weights, "data": self.data, "path": self.path,
                "max_length": self.max_length, **images, **options}
