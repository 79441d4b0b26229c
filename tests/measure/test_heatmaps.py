"""Heatmap PNGs: ``Heatmaps`` draws on reused figures and gives, byte for byte, the PNG of a figure drawn afresh."""

from __future__ import annotations

import io

import numpy as np

from measure import MEASURES
from measure.engine.results import PairResult
from measure.report.heatmaps import Heatmaps, heatmap_png, plot_matrix


def _fresh_png(r: PairResult) -> bytes:
    """The PNG of a new figure for ``r`` (constrained layout computed for it alone), closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = r.spec.value_range
    ax = plot_matrix(r.matrix, r.rows, r.cols, title=f"{r.measure}: {r.store_a} vs {r.store_b}",
                     xlabel=r.store_b, ylabel=r.store_a,
                     value_range=(lo, hi) if np.isfinite([lo, hi]).all() else None)
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png")
    plt.close(ax.figure)
    return buf.getvalue()


def _results():
    rng = np.random.default_rng(0)
    layers = ["conv1", "conv2", "fc"]
    out = []
    pairs = [("m0", "m1"), ("m2", "a much longer model name"), ("m2", "m3"), ("seed_10", "gy"), ("m0", "m0")]
    for k, (a, b) in enumerate(pairs):
        for measure in ("cka", "procrustes_euclidean"):
            m = rng.uniform(0, 1, (3, 3))
            if k == 1:
                m[1, 2] = np.nan  # a hidden value, then shown again on the next result
            out.append(PairResult(measure, {}, a, b, layers, layers, m, MEASURES[measure]))
    out.append(PairResult("cka", {}, "m0", "wide", layers, ["a", "b", "c", "d"], rng.uniform(0, 1, (3, 4)),
                          MEASURES["cka"]))
    big = rng.uniform(0, 1, (9, 9))  # more than 64 cells: no printed values
    out.append(PairResult("cka", {}, "m0", "m1", [f"l{i}" for i in range(9)], [f"l{i}" for i in range(9)], big,
                          MEASURES["cka"]))
    return out


def test_reused_figures_give_the_bytes_of_fresh_ones(monkeypatch):
    import measure.report.heatmaps as module

    results, drawn = _results(), []
    monkeypatch.setattr(module, "plot_matrix", lambda *a, **k: drawn.append(1) or plot_matrix(*a, **k))
    with Heatmaps(keep=4) as heatmaps:  # keep=4: figures are closed and drawn again along the way
        pngs = [heatmaps.png(r) for r in results]
    assert 4 <= len(drawn) <= len(results) - 4  # figures were reused, and new ones drawn where the layout differs
    monkeypatch.undo()
    for r, png in zip(results, pngs, strict=True):
        assert png == _fresh_png(r), (r.measure, r.store_a, r.store_b)
    assert heatmap_png(results[0]) == pngs[0]
    assert png.startswith(b"\x89PNG") and len({*pngs}) == len(pngs)


def test_heatmaps_close_their_figures():
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    with Heatmaps(keep=3) as heatmaps:
        for r in _results():
            heatmaps.png(r)
            assert len(plt.get_fignums()) - before <= 3
    assert len(plt.get_fignums()) == before
