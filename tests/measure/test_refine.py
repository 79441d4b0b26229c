"""Refinement of sketched results: the selection (most, least similar, the band around a threshold) and the
exact recomputation, which replaces exactly the selected entries and records them."""

from __future__ import annotations

import numpy as np
import pytest

from measure import MeasureError
from measure.engine import Engine
from measure.refine import Cell, default_margin, refine, select_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SKETCH = ("cka_sketch", {"sketch_size": 64, "seed": 0})  # small: far from exact, so replacements show


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from _stores import write_store

    root = tmp_path_factory.mktemp("refine")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((48, 4))
    stores = []
    for m in range(4):
        layers = {f"l{k}": z @ rng.standard_normal((4, 12)) * (k + 1) + (m + k) * rng.standard_normal((48, 12))
                  for k in range(3)}
        stores.append(write_store(root / f"m{m}.zarr", f"m{m}", layers))
    engine = Engine(stores, device="cpu")
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]
    sketched = engine.run([SKETCH], pairs, release=False)
    exact = {(r.store_a, r.store_b): r for r in engine.run([("cka", {"route": "gram"})], pairs, release=False)}
    return engine, sketched, exact


def _value(results, c: Cell) -> float:
    for r in results:
        if (r.store_a, r.store_b) == (c.store_a, c.store_b) and c.row in r.rows and c.col in r.cols:
            return float(r.matrix[r.rows.index(c.row), r.cols.index(c.col)])
        if (r.store_a, r.store_b) == (c.store_b, c.store_a) and c.col in r.rows and c.row in r.cols:
            return float(r.matrix[r.rows.index(c.col), r.cols.index(c.row)])
    raise KeyError(c)


def test_selects_the_k_most_and_least_similar_distinct_pairs(zoo):
    _, sketched, _ = zoo
    cells = select_cells(sketched, 3)
    assert len(cells) == 6 and len(set(cells)) == 6
    values = sorted({(_value(sketched, c), c) for r in sketched for i, row in enumerate(r.rows)
                     for j, col in enumerate(r.cols)
                     if not (r.store_a == r.store_b and row == col)
                     for c in [Cell(r.store_a, row, r.store_b, col)]
                     if (r.store_a, row) < (r.store_b, col) or r.store_a != r.store_b})
    chosen = sorted(_value(sketched, c) for c in cells)
    assert chosen[:3] == pytest.approx([v for v, _ in values[:3]])
    assert chosen[3:] == pytest.approx([v for v, _ in values[-3:]])
    assert all(not (c.store_a == c.store_b and c.row == c.col) for c in cells)  # never a layer with itself


def test_threshold_band_uses_the_stated_error_by_default(zoo):
    _, sketched, _ = zoo
    margin = default_margin(sketched)
    assert margin == pytest.approx(3 * 64**-0.5)
    threshold = float(np.median([v for r in sketched for v in r.matrix.ravel()]))
    cells = select_cells(sketched, 0, threshold=threshold)
    assert cells and all(abs(_value(sketched, c) - threshold) <= margin for c in cells)
    distances = [abs(_value(sketched, c) - threshold) for c in cells]
    assert distances == sorted(distances)  # nearest first
    narrow = select_cells(sketched, 0, threshold=threshold, margin=1e-9)
    assert len(narrow) < len(cells)


def test_refinement_replaces_exactly_the_selected_pairs(zoo):
    engine, sketched, exact = zoo
    cells = select_cells(sketched, 2, threshold=0.5, margin=0.05)
    refined = refine(engine, sketched, cells)
    selected = set()
    for c in cells:
        selected |= {(c.store_a, c.row, c.store_b, c.col), (c.store_b, c.col, c.store_a, c.row)}
    changed = 0
    for before, after in zip(sketched, refined, strict=True):
        truth = exact[(before.store_a, before.store_b)]
        for i, row in enumerate(before.rows):
            for j, col in enumerate(before.cols):
                if (before.store_a, row, before.store_b, col) in selected:
                    assert after.matrix[i, j] == pytest.approx(truth.matrix[i, j], abs=1e-12)
                    changed += 1
                else:
                    assert after.matrix[i, j] == before.matrix[i, j]
        listed = {(e["row"], e["col"]) for e in after.extras.get("refined", [])}
        assert listed == {(row, col) for i, row in enumerate(before.rows) for j, col in enumerate(before.cols)
                          if (before.store_a, row, before.store_b, col) in selected}
        assert after.extras["approximate"] == before.extras["approximate"]  # the others stay sketched
    assert changed >= len(cells)
    assert sketched[0].extras.get("refined") is None  # the input is not modified


def test_refusals(zoo):
    engine, sketched, _ = zoo
    with pytest.raises(MeasureError, match="non-negative integer"):
        select_cells(sketched, -1)
    with pytest.raises(MeasureError, match="no store named"):
        refine(engine, sketched, [Cell("elsewhere", "l0", "m0", "l0")])
    exact_results = engine.run([("cka", {"route": "gram"})], [(0, 1)], release=False)
    with pytest.raises(MeasureError, match="pass margin"):
        select_cells(exact_results, 1, threshold=0.5)
