"""Linear CKA, biased and debiased, accumulated from feature moments (the feature route).

``LinearCKAMatrix`` holds, in float64, the sample count, Σx, Σy, the per-layer XᵀX and YᵀY,
the cross products XᵀY of every layer pair and the fourth-order terms Σ‖x‖², Σ‖x‖⁴,
Σ‖x‖²x, Σ‖x‖²‖y‖², Σ‖y‖²x, Σ‖x‖²y (and their y twins) that Song et al.'s unbiased HSIC needs;
see ``measure.functional.moments._cka_moments_update``. All of them are sums over samples, so
k chunk updates, or several accumulators merged, give the full-data moments and hence
exactly the linear CKA and debiased linear CKA of the Gram route — with memory set by the
feature widths (p² + q² + p·q) instead of n². ``LinearCKA`` is the one-pair version.

Features are shifted by a per-layer constant (by default the mean of the first chunk)
before they are accumulated; CKA and unbiased HSIC are translation invariant, and the
shift keeps float64 sums of large-mean activations from cancelling (Chan et al.).
Accumulators with different shifts merge exactly: the moments are re-expressed in the
other shift (``_cka_moments_reshift``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..errors import MeasureError
from ..functional.moments import _cka_moments_reshift, _cka_moments_update, cka_from_moments
from ..validation import as_samples_matrix, check_min_samples, check_same_samples
from .base import Accumulator

__all__ = ["FEATURE_ROUTE_MAX_N", "LinearCKA", "LinearCKAMatrix", "choose_route"]

Route = Literal["auto", "gram", "features"]
FEATURE_ROUTE_MAX_N = 8192  # above this many samples, n × n Grams (512 MiB each in float64) are avoided


def choose_route(route: str, n: int, widths_a: Sequence[int], widths_b: Sequence[int],
                 grams_formed: bool = False) -> str:
    """"gram" or "features" for linear CKA between layers of widths ``widths_a`` and ``widths_b``.

    Rule for ``route="auto"``. The Gram route keeps one n × n Gram per layer, S_g = n²·(L_A + L_B)
    numbers, and forms them in about n²·(ΣP + ΣQ) multiply-adds (upper blocks only) plus several float64
    passes over each n × n Gram; the feature route keeps the per-layer XᵀX, YᵀY and every cross product
    XᵢᵀYⱼ, S_f = Σpᵢ² + Σqⱼ² + (Σpᵢ)(Σqⱼ) numbers, formed in n·S_f. Choose features when they take no
    more memory (S_f ≤ S_g) and either their work is at most ¾ of the Grams' (4·S_f ≤ 3·n·(ΣP + ΣQ),
    the crossover measured in ``benchmarks/bench_features.py``) or n > 8192 (Grams of 512 MiB each).
    ``grams_formed``: the same Grams are formed anyway (another measure of the run needs them), so the
    feature route would only add work: "gram".
    """
    if route not in ("auto", "gram", "features"):
        raise MeasureError(f"route must be 'auto', 'gram' or 'features', got {route!r}.")
    if route != "auto":
        return route
    s_f = sum(p * p for p in widths_a) + sum(q * q for q in widths_b) + sum(widths_a) * sum(widths_b)
    s_g = n * n * (len(widths_a) + len(widths_b))
    if grams_formed or s_f > s_g:
        return "gram"
    cheaper = 4 * s_f <= 3 * n * (sum(widths_a) + sum(widths_b))
    return "features" if cheaper or n > FEATURE_ROUTE_MAX_N else "gram"


def _as_block(x: Any, name: str, device: torch.device | None) -> torch.Tensor:
    block = as_samples_matrix(x, name)
    if device is not None and block.device != device:
        raise MeasureError(f"{name} is on {block.device} but the accumulator's states are on {device}; "
                           f"move the data there or call .to({str(block.device)!r}) on the accumulator first.")
    return block


class LinearCKAMatrix(Accumulator):
    """Biased and debiased linear CKA between every layer of A and every layer of B, streamed.

    Parameters
    ----------
    shift : {"first", "none"}, default="first"
        Subtract each layer's mean over the first chunk before accumulating ("none": raw sums).

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(100, 5, generator=g), torch.randn(100, 7, generator=g)
    >>> acc = LinearCKAMatrix()
    >>> for rows in torch.arange(100).split(30):
    ...     acc.update([x[rows]], [y[rows], 2 * x[rows]])
    >>> out = acc.compute()
    >>> [round(v, 6) for v in out["cka"][0].tolist()]
    [0.040745, 1.0]
    """

    def __init__(self, *, shift: Literal["first", "none"] = "first") -> None:
        super().__init__()
        if shift not in ("first", "none"):
            raise MeasureError(f"shift must be 'first' or 'none', got {shift!r}.")
        self.shift_mode = shift
        # one state: the moments with the shifts and layer widths they refer to (None before any update)
        self.add_state("stats", None, merge=_merge_stats)

    @property
    def device(self) -> torch.device | None:
        return None if self.stats is None else self.stats["shift_x"].device

    def _update(self, xs: Sequence[Any], ys: Sequence[Any]) -> None:
        device = self.device
        xs = [_as_block(x, f"xs[{i}]", device) for i, x in enumerate(xs)]
        ys = [_as_block(y, f"ys[{j}]", device) for j, y in enumerate(ys)]
        if not xs or not ys:
            raise MeasureError("update needs at least one layer on each side: update([x1, ...], [y1, ...]).")
        for block in xs[1:] + ys:
            check_same_samples(xs[0], block, ("xs[0]", "every other block"))
        sizes_x, sizes_y = tuple(x.shape[1] for x in xs), tuple(y.shape[1] for y in ys)
        if self.stats is None:
            first = self.shift_mode == "first"
            self.stats = {
                "sizes_x": sizes_x, "sizes_y": sizes_y, "moments": None,
                "shift_x": torch.cat([x.mean(dim=0) if first else torch.zeros_like(x[0]) for x in xs]),
                "shift_y": torch.cat([y.mean(dim=0) if first else torch.zeros_like(y[0]) for y in ys]),
            }
        elif (sizes_x, sizes_y) != (self.stats["sizes_x"], self.stats["sizes_y"]):
            raise MeasureError(f"Layer widths changed between updates: {self.stats['sizes_x']} × "
                               f"{self.stats['sizes_y']} before, {sizes_x} × {sizes_y} now; feed the same "
                               "layers in the same order.")
        zs = [x - c for x, c in zip(xs, self.stats["shift_x"].split(list(sizes_x)), strict=True)]
        ws = [y - d for y, d in zip(ys, self.stats["shift_y"].split(list(sizes_y)), strict=True)]
        chunk = _cka_moments_update(zs, ws)
        old = self.stats["moments"]
        self.stats["moments"] = chunk if old is None else {k: old[k] + chunk[k] for k in old}

    def _compute(self) -> dict[str, Any]:
        if self.stats is None:
            raise MeasureError("Nothing accumulated yet: call update() with data first.")
        return cka_from_moments(self.stats["moments"], self.stats["sizes_x"], self.stats["sizes_y"])

def _merge_stats(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Add the moments of ``b`` to those of ``a``, moving ``b``'s to ``a``'s shift when they differ."""
    if a is None or b is None:
        return a if b is None else {**b, "moments": dict(b["moments"])}
    if (a["sizes_x"], a["sizes_y"]) != (b["sizes_x"], b["sizes_y"]):
        raise MeasureError(f"Cannot merge accumulators of different layer widths: {a['sizes_x']} × {a['sizes_y']} "
                           f"vs {b['sizes_x']} × {b['sizes_y']}; both must see the same layers.")
    moments = b["moments"]
    if not (torch.equal(a["shift_x"], b["shift_x"]) and torch.equal(a["shift_y"], b["shift_y"])):
        moments = _cka_moments_reshift(moments, b["shift_x"] - a["shift_x"], b["shift_y"] - a["shift_y"],
                                       a["sizes_x"], a["sizes_y"])
    return {**a, "moments": {k: a["moments"][k] + moments[k] for k in a["moments"]}}


class LinearCKA(LinearCKAMatrix):
    """Linear CKA between two representations, accumulated chunk by chunk (exact over all samples).

    Parameters
    ----------
    debiased : bool, default=False
        Use Song et al.'s unbiased HSIC (needs at least 4 samples in total).
    shift : {"first", "none"}, default="first"

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    >>> acc = LinearCKA()
    >>> acc.update(x[:25], 3 * x[:25]); acc.update(x[25:], 3 * x[25:])
    >>> round(acc.compute(), 12)
    1.0
    """

    def __init__(self, *, debiased: bool = False, shift: Literal["first", "none"] = "first") -> None:
        super().__init__(shift=shift)
        self.debiased = debiased

    def _update(self, x: Any, y: Any) -> None:
        x, y = as_samples_matrix(x, "x"), as_samples_matrix(y, "y")
        check_same_samples(x, y)
        super()._update([x], [y])

    def _compute(self) -> float:
        out = super()._compute()
        key = "cka_debiased" if self.debiased else "cka"
        if self.debiased:
            check_min_samples(out["n_samples"], 4, "cka_debiased", "unbiased HSIC")
        return float(out[key][0, 0])
