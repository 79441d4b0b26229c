"""Shared input checks. Every message names the argument, what was expected, what arrived and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import MeasureError

__all__ = ["as_samples_matrix", "check_finite", "check_min_samples", "check_options", "check_same_samples"]


def as_samples_matrix(x: Any, name: str = "x", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x`` of shape (n_samples, ...) as a (n_samples, n_features) tensor, flattened per sample."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise MeasureError(
            f"{name} must be a torch.Tensor or numpy.ndarray of shape (n_samples, ...), got {type(x).__name__}."
        )
    if x.ndim < 2:
        raise MeasureError(
            f"{name} must have shape (n_samples, n_features, ...), got shape {tuple(x.shape)}; "
            "reshape a single feature with x.reshape(-1, 1)."
        )
    if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32,
                                                                   torch.int64, torch.uint8, torch.bool)):
        raise MeasureError(f"{name} must hold real numbers, got dtype {x.dtype}.")
    return x.reshape(len(x), -1).to(dtype)


def check_same_samples(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    if len(x) != len(y):
        raise MeasureError(
            f"{names[0]} and {names[1]} must hold the same samples in the same order; got {len(x)} and "
            f"{len(y)} samples (shapes {tuple(x.shape)} and {tuple(y.shape)})."
        )


def check_min_samples(n: int, minimum: int, what: str, why: str = "") -> None:
    """Raise unless there are at least ``minimum`` samples: the one place that checks sample counts.

    >>> check_min_samples(3, 4, "cka_debiased", "unbiased HSIC")
    Traceback (most recent call last):
    ...
    measure.errors.MeasureError: cka_debiased needs at least 4 samples (unbiased HSIC), got 3; measure more samples.
    """
    if n < minimum:
        because = f" ({why})" if why else ""
        raise MeasureError(f"{what} needs at least {minimum} samples{because}, got {n}; measure more samples.")


def check_finite(x: torch.Tensor, what: str, offset: int = 0) -> None:
    """Raise naming ``what`` and the first bad sample range if ``x`` holds NaN or Inf (one host sync)."""
    bad_rows = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad_rows.any()):
        idx = torch.nonzero(bad_rows).flatten().cpu()
        first, last = int(idx[0]) + offset, int(idx[-1]) + offset
        raise MeasureError(
            f"{what} holds NaN or Inf in {len(idx)} sample(s), between sample {first} and {last}; "
            "fix the model or data (or drop the layer with --layers) before measuring."
        )


def check_options(measure: str, given: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Merge ``given`` into the defaults ``allowed``; unknown names are an error listing the valid ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise MeasureError(f"Unknown option(s) {unknown} for measure {measure!r}; valid options: {valid}.")
    return {**allowed, **given}
