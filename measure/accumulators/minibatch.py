"""Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021), accumulated batch by batch.

``MinibatchCKAMatrix`` regroups the rows it is fed into consecutive batches of ``batch_size``
samples (a last partial batch is left out, as in the store engine) and, for each batch t and
each layer, forms the batch's linear Gram Kₜ (``linear_gram``), its centred Gram and Song et
al.'s unbiased-HSIC vectors vₜ, wₜ (``unbiased_hsic_vectors``: ⟨vₜ(K), wₜ(L)⟩ = HSIC₁(Kₜ, Lₜ)).
It keeps only their sums over batches,

    C[a, b] = Σₜ HSIC₁(Kₜᵃ, Lₜᵇ),   S_X[a] = Σₜ HSIC₁(Kₜᵃ, Kₜᵃ),   S_Y[b] = Σₜ HSIC₁(Lₜᵇ, Lₜᵇ),

so memory is one batch's activations and vectors, whatever the number of batches, and

    CKA_mb[a, b] = C[a, b] / √(S_X[a] · S_Y[b]).

These are the kernels the engine's ``cka_minibatch`` uses (``_cka_minibatch_prepare``), on the
same Grams; the engine takes each layer's dot products over the concatenated per-batch vectors
where this takes one product per batch and adds them, so the two agree to float64 round-off of
the sums (about 1e-15 relative), not bit for bit. A layer is undefined where S_X[a] is not
clearly positive, by the engine's threshold and message (``normalized``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import MeasureError
from ..functional._bilinear import UNDEFINED_RTOL
from ..functional.cka import _SINGLE_SAMPLE, _debiased_scale
from ..functional.gram import PRECISIONS, center_gram, linear_gram, unbiased_hsic_vectors
from .base import Accumulator

__all__ = ["MinibatchCKAMatrix"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _batch_hsic_vectors(blocks: Sequence[torch.Tensor], precision: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(V, W, scales) of one batch: each layer's unbiased-HSIC vectors stacked as rows, (L, b² + b + 1) each,
    and each layer's round-off magnitude of HSIC₁(K, K) (``_debiased_scale``)."""
    vs, ws, scales = [], [], []
    for block in blocks:
        gram = linear_gram(block, precision)
        centered = center_gram(gram)
        scales.append(_debiased_scale(gram, centered))
        v, w = unbiased_hsic_vectors(centered, inplace=True)  # new vectors; the centred Gram is ours
        vs.append(v)
        ws.append(w)
        del gram, centered
    return torch.stack(vs), torch.stack(ws), torch.stack(scales)


def _undefined_reasons(self_hsic: torch.Tensor, scale: torch.Tensor) -> list[tuple[int, str]]:
    """(layer index, reason) for each layer whose summed self-HSIC is not clearly positive (``normalized``)."""
    reasons = []
    for k, (value, magnitude) in enumerate(zip(self_hsic.tolist(), scale.tolist(), strict=True)):
        tolerance = UNDEFINED_RTOL * magnitude
        if not value > tolerance:
            what = "summed unbiased HSIC(K, K)"
            reasons.append((k, f"{what} is zero: {_SINGLE_SAMPLE}" if abs(value) <= tolerance
                            else f"{what} is negative ({value:.3g})"))
    return reasons


def _merge_pending(a: Any, b: Any) -> Any:
    if a and b:
        raise MeasureError("Cannot merge minibatch accumulators that both hold rows of an unfinished batch: the "
                           "batches would differ from one accumulator's. Feed each a multiple of batch_size rows.")
    return a or b


class MinibatchCKAMatrix(Accumulator):
    """Minibatch linear CKA between every layer of X and every layer of Y, streamed batch by batch.

    Parameters
    ----------
    batch_size : int
        Samples per batch (at least 4: unbiased HSIC needs 4 samples). Rows are regrouped into
        batches of this size whatever the sizes of the blocks fed to ``update``.
    precision : {"float64", "float32"} or (str, str), default="float64"
        How each batch's Grams are formed (``measure.functional.gram.linear_gram``), for both sides
        or as (X's, Y's).

    Examples
    --------
    >>> import torch; g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    >>> acc = MinibatchCKAMatrix(batch_size=20)
    >>> for rows in torch.arange(100).split(30):
    ...     acc.update([x[rows]], [2 * x[rows], torch.randn(len(rows), 3, generator=g, dtype=torch.float64)])
    >>> out = acc.compute()
    >>> out["n_batches"], round(out["cka_minibatch"][0, 0].item(), 12)
    (5, 1.0)
    """

    def __init__(self, *, batch_size: int, precision: str | tuple[str, str] = "float64") -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
            raise MeasureError(f"batch_size must be an integer ≥ 4 (unbiased HSIC needs 4 samples), got "
                               f"{batch_size!r}.")
        precisions = (precision, precision) if isinstance(precision, str) else tuple(precision)
        if len(precisions) != 2 or any(p not in PRECISIONS for p in precisions):
            raise MeasureError(f"precision must be one of {PRECISIONS} or a pair of them, got {precision!r}.")
        self.batch_size = batch_size
        self.precisions = precisions
        self.add_state("cross", None)  # Σₜ HSIC₁(Kₜᵃ, Lₜᵇ), (L_X, L_Y)
        self.add_state("self_x", None)  # Σₜ HSIC₁(Kₜᵃ, Kₜᵃ), and the round-off magnitudes of these sums
        self.add_state("self_y", None)
        self.add_state("scale_x", None)
        self.add_state("scale_y", None)
        self.add_state("n_batches", 0)
        self.add_state("n_samples", 0)  # every row fed, those of an unfinished batch included
        self.add_state("pending", [], merge=_merge_pending)  # rows of the unfinished batch: [(xs, ys), ...]

    def _update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        if not xs or not ys:
            raise MeasureError("update needs at least one layer on each side: update([x1, ...], [y1, ...]).")
        rows = len(xs[0])
        if any(len(t) != rows for t in (*xs, *ys)):
            raise MeasureError(f"Every block of one update must hold the same samples; got "
                               f"{[len(t) for t in (*xs, *ys)]} rows.")
        self.n_samples += rows
        self.pending.append(([x.reshape(rows, -1) for x in xs], [y.reshape(rows, -1) for y in ys]))
        held = sum(len(part[0][0]) for part in self.pending)
        if held < self.batch_size:
            return
        xs = [torch.cat([part[0][k] for part in self.pending]) for k in range(len(xs))]
        ys = [torch.cat([part[1][k] for part in self.pending]) for k in range(len(ys))]
        self.pending = []
        full = held // self.batch_size * self.batch_size
        for start in range(0, full, self.batch_size):
            self._add_batch([x[start:start + self.batch_size] for x in xs],
                            [y[start:start + self.batch_size] for y in ys])
        if full < held:  # a copy: a view would keep the whole concatenation alive
            self.pending.append(([x[full:].clone() for x in xs], [y[full:].clone() for y in ys]))

    def _add_batch(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        (vx, wx, sx), (vy, wy, sy) = (
            _batch_hsic_vectors([b.to(_DTYPES[p]) for b in blocks], p)
            for blocks, p in ((xs, self.precisions[0]), (ys, self.precisions[1])))
        if self.cross is not None and self.cross.shape != (len(vx), len(vy)):
            raise MeasureError(f"Layer counts changed between updates: {tuple(self.cross.shape)} before, "
                               f"{(len(vx), len(vy))} now; feed the same layers in the same order.")
        terms = {"cross": vx @ wy.T, "self_x": (vx * wx).sum(dim=1), "self_y": (vy * wy).sum(dim=1),
                 "scale_x": sx, "scale_y": sy}
        for name, value in terms.items():
            old = getattr(self, name)
            setattr(self, name, value if old is None else old + value)
        self.n_batches += 1

    def _compute(self) -> dict[str, Any]:
        """``cka_minibatch`` (L_X, L_Y) float64 with NaN where undefined; ``undefined``: ([(row, reason)],
        [(column, reason)]); ``n_batches`` and ``n_samples`` (rows fed, a left-out partial batch included)."""
        if self.n_batches == 0:
            raise MeasureError(f"batch_size must be an integer between 4 and {self.n_samples} (the number of "
                               f"samples), got {self.batch_size!r}.")
        rows = _undefined_reasons(self.self_x, self.scale_x)
        cols = _undefined_reasons(self.self_y, self.scale_y)
        norm = torch.sqrt(self.self_x.clamp(min=0))[:, None] * torch.sqrt(self.self_y.clamp(min=0))[None, :]
        matrix = self.cross / norm
        if rows:
            matrix[[k for k, _ in rows], :] = float("nan")
        if cols:
            matrix[:, [k for k, _ in cols]] = float("nan")
        return {"cka_minibatch": matrix, "undefined": (rows, cols), "n_batches": self.n_batches,
                "n_samples": self.n_samples}
