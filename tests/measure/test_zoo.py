"""The zoo views (``measure.report.zoo``): the best-match statistic against a plain-loop reference, its
NaN rule, orientation for asymmetric measures, layer views, natural order, deterministic clustering,
the numbers the page embeds, and the pandas lines of docs/zoo.md."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from measure import MEASURES
from measure.engine.results import PairResult
from measure.report.overview import measure_overview, overview_svg, page_data
from measure.report.zoo import (
    BEST_MATCH,
    best_match,
    cluster_order,
    dissimilarity,
    layer_view,
    natural_order,
    overview,
    shared_layers,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "zoo.md"


def _result(measure, a, b, matrix, rows=None, cols=None):
    matrix = np.asarray(matrix, dtype=float)
    rows = rows or [f"l{i}" for i in range(matrix.shape[0])]
    cols = cols or [f"l{j}" for j in range(matrix.shape[1])]
    return PairResult(measure, {}, a, b, list(rows), list(cols), matrix, MEASURES[measure])


def _reference_best_match(matrix, kind):
    """The statistic by plain loops: per row (column) the best finite value; the mean over rows (columns) with one."""
    better = (lambda u, v: u > v) if kind == "similarity" else (lambda u, v: u < v)

    def side(lines):
        bests = []
        for line in lines:
            best = None
            for v in line:
                if math.isfinite(v) and (best is None or better(v, best)):
                    best = v
            if best is not None:
                bests.append(best)
        return sum(bests) / len(bests) if bests else None

    r, c = side(matrix.tolist()), side(matrix.T.tolist())
    return float("nan") if r is None else 0.5 * (r + c)


@pytest.mark.parametrize("kind", ["similarity", "distance"])
def test_best_match_equals_a_plain_loop_reference(kind):
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 3), (4, 7), (6, 2)]:
        for nan_fraction in (0.0, 0.2, 0.6):
            m = rng.uniform(-1, 1, shape)
            m[rng.random(shape) < nan_fraction] = np.nan
            assert best_match(m, kind) == pytest.approx(_reference_best_match(m, kind), nan_ok=True, abs=1e-12)


def test_best_match_known_values():
    m = np.array([[0.9, 0.2, 0.1],
                  [0.3, 0.5, 0.4]])
    # rows: max 0.9, 0.5 -> mean 0.7; columns: max 0.9, 0.5, 0.4 -> mean 0.6
    assert best_match(m) == pytest.approx(0.65)
    # distance: rows: min 0.1, 0.3 -> 0.2; columns: min 0.3, 0.2, 0.1 -> 0.2
    assert best_match(m, "distance") == pytest.approx(0.2)


def test_a_model_against_itself_scores_the_self_value():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.1, 0.95, (6, 6))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    assert best_match(s) == 1.0
    d = rng.uniform(0.1, 1.4, (6, 6))
    np.fill_diagonal(d, 0.0)
    assert best_match(d, "distance") == 0.0
    # unlike the mean over all layer pairs, which is below 1 for a model against itself
    assert np.mean(s) < 0.8


def test_nan_rule_one_undefined_pair_does_not_make_the_cell_nan():
    m = np.array([[1.0, np.nan, 0.2],
                  [0.4, 0.8, 0.3],
                  [0.1, 0.5, 0.9]])
    # rows: 1.0, 0.8, 0.9; columns: 1.0, 0.8, 0.9
    assert best_match(m) == pytest.approx(0.9)
    # a layer undefined against every layer (a constant layer) is left out of its side's mean
    m[1] = np.nan
    # rows: 1.0, 0.9 -> 0.95; columns: 1.0, 0.5, 0.9 -> 0.8
    assert best_match(m) == pytest.approx(0.875)
    assert math.isnan(best_match(np.full((2, 3), np.nan)))


def test_overview_and_layer_views_keep_orientation_for_asymmetric_measures():
    """linreg: rows are store_a; (A, B) and (B, A) are separate results, neither mirrored nor transposed."""
    ab = np.array([[0.9, 0.1], [0.2, 0.3]])
    ba = np.array([[0.4, 0.6], [0.5, 0.7]])
    results = [_result("linreg", "A", "B", ab, ["x", "y"], ["x", "y"]),
               _result("linreg", "B", "A", ba, ["x", "y"], ["x", "y"]),
               _result("linreg", "A", "A", np.eye(2), ["x", "y"], ["x", "y"])]
    view = overview(results, ["A", "B"])
    assert view.values[0, 1] == pytest.approx(best_match(ab)) and view.values[1, 0] == pytest.approx(best_match(ba))
    assert best_match(ab) != pytest.approx(best_match(ba))
    assert view.values[0, 0] == 1.0 and not view.known[1, 1] and np.isnan(view.values[1, 1])
    assert layer_view(results, ["A", "B"], "y").values[0, 1] == 0.3  # S_AB[y, y]
    assert layer_view(results, ["A", "B"], "x").values[1, 0] == 0.4  # S_BA[x, x]
    # a transposed input passes no test: the page shows the same orientation
    o = measure_overview(results, ["A", "B"])
    data = json.loads(page_data([o]))["measures"][0]
    assert data["views"][0]["values"][1] == pytest.approx(best_match(ab), abs=5e-4)
    assert data["views"][0]["values"][2] == pytest.approx(best_match(ba), abs=5e-4)


def test_symmetric_measures_fill_both_cells_from_one_result_whatever_the_layer_order():
    """S(B, A) = S(A, B)ᵀ: the mirrored cell of a layer view reads S(A, B)[l of A, l of B]."""
    s = np.array([[0.1, 0.2, 0.3],
                  [0.4, 0.5, 0.6]])
    r = _result("cka", "A", "B", s, ["conv", "fc"], ["fc", "extra", "conv"])
    view = overview([r], ["A", "B"])
    assert view.values[0, 1] == view.values[1, 0] == pytest.approx(best_match(s))
    fc, conv = layer_view([r], ["A", "B"], "fc"), layer_view([r], ["A", "B"], "conv")
    assert fc.values[0, 1] == fc.values[1, 0] == 0.4  # row fc of A, column fc of B
    assert conv.values[0, 1] == conv.values[1, 0] == 0.3
    assert shared_layers([r], ["A", "B"]) == ["conv", "fc"]  # 'extra' is held by B only


def test_natural_order():
    names = [f"m{k}" for k in range(16)]
    assert natural_order(sorted(names)) == names
    assert natural_order(["b2", "a10", "a2", "a", "b10", "a2"]) == ["a", "a2", "a10", "b2", "b10"]
    assert natural_order(["x1y10", "x1y2", "x01y3"]) == ["x1y2", "x01y3", "x1y10"]


def _zoo(families=(0, 0, 1, 1, 2, 2, 2), measure="cka", seed=0):
    rng = np.random.default_rng(seed)
    names = [f"m{k}" for k in range(len(families))]
    results = []
    for a in range(len(names)):
        for b in range(a, len(names)):
            level = 1.0 if a == b else 0.85 if families[a] == families[b] else 0.5
            s = level * np.exp(-np.abs(np.subtract.outer(range(3), range(3))))
            if a != b:
                s = s + 0.01 * rng.random((3, 3))
            results.append(_result(measure, names[a], names[b], s))
    return names, results


def test_clustering_groups_families_deterministically_and_ignores_input_order():
    names, results = _zoo()
    view = overview(results, natural_order(names))
    order, z = cluster_order(view, "similarity", (0.0, 1.0))
    families = [(0, 0, 1, 1, 2, 2, 2)[k] for k in order]
    runs = [f for k, f in enumerate(families) if k == 0 or f != families[k - 1]]
    assert runs == sorted(set(families), key=families.index)  # each family in one run of leaves
    assert z.shape == (len(names) - 1, 4)
    rng = np.random.default_rng(3)
    for _ in range(3):
        shuffled = [results[k] for k in rng.permutation(len(results))]
        o = measure_overview(shuffled, natural_order(n for r in shuffled for n in (r.store_a, r.store_b)))
        assert [o.names[k] for k in o.order] == [names[k] for k in order]


def test_clustering_breaks_ties_the_same_way_every_time():
    """Identical models: every distance ties; the order is still fixed (natural order in, scipy deterministic)."""
    names = ["m10", "m2", "m1", "m0"]
    results = [_result("cka", a, b, np.eye(2)) for i, a in enumerate(names) for b in names[i:]]
    orders = {tuple(measure_overview(results[::step], natural_order(names)).order) for step in (1, -1)}
    assert len(orders) == 1


def test_dissimilarity_of_a_distance_and_missing_cells():
    names, results = _zoo(measure="procrustes_euclidean")
    results = [r for r in results if (r.store_a, r.store_b) != ("m0", "m6")]  # one pair missing
    view = overview(results, names)
    d = dissimilarity(view, "distance", MEASURES["procrustes_euclidean"].value_range)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    off = ~np.eye(len(names), dtype=bool) & view.known
    assert np.allclose(d[off], view.values[off])  # d = s - lo = s for a distance
    assert d[0, 6] == d[6, 0] == d[off].max()  # missing: the largest defined dissimilarity


def test_page_data_round_trips_views_and_pairs():
    names, results = _zoo()
    results[3].matrix[1, 2] = np.nan
    o = measure_overview(results, names)
    data = json.loads(page_data([o]))
    assert data["stores"] == names and len(data["palette"]) == 256
    m = data["measures"][0]
    assert m["order"] == o.order and m["kind"] == "similarity" and m["symmetric"] is True
    assert [v["name"] for v in m["views"]] == [BEST_MATCH, "layer l0", "layer l1", "layer l2"]
    for view, ours in zip(m["views"], o.views, strict=True):
        for value, known, expected in zip(view["values"], ours.known.ravel(), ours.values.ravel(), strict=True):
            if not known:
                assert value is None
            elif np.isnan(expected):
                assert value == "NaN"
            else:
                assert value == pytest.approx(expected, rel=5e-4)
    for pair, r in zip(m["pairs"], results, strict=True):
        assert names[pair[0]] == r.store_a and names[pair[1]] == r.store_b
        assert data["layers"][pair[2]] == r.rows and data["layers"][pair[3]] == r.cols
        values = np.array([np.nan if v == "NaN" else v for v in pair[4]], dtype=float)
        np.testing.assert_allclose(values, r.matrix.ravel(), rtol=5e-4)
    assert m["pairs"][3][4][1 * 3 + 2] == "NaN"
    # page_data is safe inside <script>: no '<' at all
    r = _result("cka", "</script><b>", "</script><b>", np.eye(2))
    assert "<" not in page_data([measure_overview([r], ["</script><b>"])])


def test_overview_svg_lays_out_the_clustering_order():
    names, results = _zoo()
    o = measure_overview(results, names)
    g = overview_svg(o)
    assert [name for _, name in g["rows"]] == [names[k] for k in o.order]
    assert len(g["cells"]) == len(names) ** 2 and len(g["dendrogram"]) == len(names) - 1
    first, second = o.order[0], o.order[1]
    assert g["cells"][1][3] == f"{o.views[0].values[first, second]:.3f}"


def _docs_code(heading: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python(?:-norun)?\n(.*?)```", section, re.S).group(1)  # norun: test_docs has no run


def test_docs_pandas_lines_derive_every_view_from_the_tidy_table(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    names, results = _zoo()
    results += [_result("procrustes_euclidean", r.store_a, r.store_b, np.sqrt(2 - 2 * r.matrix)) for r in results]
    results += [_result("linreg", "m0", "m1", [[0.9, 0.1, 0.2], [0.3, 0.5, 0.1], [0.2, 0.3, 0.4]]),
                _result("linreg", "m1", "m0", [[0.4, 0.6, 0.1], [0.5, 0.7, 0.2], [0.3, 0.3, 0.8]])]
    results[4].matrix[0, 1] = np.nan
    rows = [(r.measure, r.store_a, la, r.store_b, lb, r.matrix[i, j], False)
            for r in results for i, la in enumerate(r.rows) for j, lb in enumerate(r.cols)]
    rows += [(r.measure, r.store_b, lb, r.store_a, la, r.matrix[i, j], True)  # a symmetric measure's other order
             for r in results if r.spec.symmetric and r.store_a != r.store_b
             for i, la in enumerate(r.rows) for j, lb in enumerate(r.cols)]
    t = pd.DataFrame(rows, columns=["measure", "store_a", "layer_a", "store_b", "layer_b", "value", "mirrored"])
    t.to_csv(tmp_path / "results.csv.gz", index=False)  # the table as the run writes it
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(_docs_code("## The views from the tidy table"), scope)
    for measure in ("cka", "procrustes_euclidean", "linreg"):
        own = [r for r in results if r.measure == measure]
        view = overview(own, names)
        got = scope["best"].xs(measure, level="measure")
        for (a, b), value in got.items():
            assert value == pytest.approx(view.values[names.index(a), names.index(b)]), (measure, a, b)
        assert view.known.sum() == len(got)
        layer = scope["layer"].xs(measure, level="measure")
        for lname in shared_layers(own, names):
            lv = layer_view(own, names, lname)
            got = layer.xs(lname, level="layer")
            for (a, b), value in got.items():
                assert value == pytest.approx(lv.values[names.index(a), names.index(b)], nan_ok=True)
            assert lv.known.sum() == len(got)


def _svg_cells(page: str, measure_index: int = 0) -> dict[tuple[str, str], str]:
    """(row store, column store) -> the value printed in that cell of the page's overview SVG."""
    svg = re.findall(r'<svg class="matrix".*?</svg>', page, re.S)[measure_index]
    names = re.findall(r"<text x=\"[-0-9.]+\" y=\"[-0-9.]+\">([^<]*)</text>", svg.split('<g class="cells">')[0])
    texts = re.findall(r"<text [^>]*>([^<]*)</text>", svg.split('<g class="vals"')[1].split("</g>")[0])
    n = len(names)
    assert len(texts) == n * n
    return {(names[i], names[j]): texts[i * n + j] for i in range(n) for j in range(n)}


def test_the_page_shows_rows_as_the_first_model_and_one_nan_keeps_its_cell():
    """linreg, rows = store_a: a transposed overview (S(B, A) in row A) fails here, in the printed cells and in
    the numbers the page's script reads; one undefined layer pair leaves its cell defined."""
    from measure.report import render_report

    ab = np.array([[0.9, 0.1], [0.2, 0.3]])
    ba = np.array([[0.4, 0.6], [0.5, 0.7]])
    ab_nan = ab.copy()
    ab_nan[0, 1] = np.nan
    pairs = {("A", "B"): ab_nan, ("B", "A"): ba, ("A", "C"): 0.5 * ab, ("C", "A"): 0.5 * ba, ("B", "C"): 0.8 * ab,
             ("C", "B"): 0.8 * ba, **{(s, s): np.eye(2) for s in "ABC"}}
    results = [_result("linreg", a, b, m, ["x", "y"], ["x", "y"]) for (a, b), m in pairs.items()]
    page = render_report(results, stores={s: {"layers": ["x", "y"]} for s in "ABC"})
    cells = _svg_cells(page)
    for (a, b), m in pairs.items():
        assert cells[a, b] == f"{best_match(m):.3f}", (a, b)
    assert cells["A", "B"] == f"{best_match(ab_nan):.3f}" != "NaN"  # rows 0.9, 0.3; columns 0.9, 0.3
    assert best_match(ab_nan) == pytest.approx(0.6) and best_match(ab) == pytest.approx(0.6)
    assert cells["B", "A"] == "0.625" != cells["A", "B"]  # rows 0.6, 0.7; columns 0.5, 0.7: not the transpose's
    data = json.loads(re.search(r'<script type="application/json" id="zoo-data">(.*?)</script>', page, re.S).group(1))
    m = data["measures"][0]
    names = data["stores"]
    for (a, b), matrix in pairs.items():
        assert m["views"][0]["values"][names.index(a) * 3 + names.index(b)] == pytest.approx(best_match(matrix),
                                                                                              rel=5e-4)
        pair = next(p for p in m["pairs"] if (names[p[0]], names[p[1]]) == (a, b))  # the page's matrix, row by row
        assert pair[4] == [("NaN" if np.isnan(v) else pytest.approx(v, rel=5e-4)) for v in matrix.ravel()]
    layer_y = next(v for v in m["views"] if v["name"] == "layer y")["values"]
    assert layer_y[names.index("B") * 3 + names.index("A")] == 0.7 and layer_y[names.index("A") * 3 + 1] == 0.3


def test_a_64_model_report_stays_small_draws_no_png_and_keeps_every_view():
    """64 models × 4 layers × 4 measures: at most 10 MB, no embedded image, stores in natural order, and every
    embedded layer view equals S[l, l] of its pair's matrix."""
    import time

    from _zoo_results import zoo_results

    from measure.report import write_report

    names, results, stores = zoo_results(64)
    out = Path(__import__("tempfile").mkdtemp())
    t0 = time.perf_counter()
    path = write_report(results, out, stores=stores, device="cpu")
    seconds = time.perf_counter() - t0
    page = path.read_text(encoding="utf-8")
    assert len(page.encode()) <= 10 * 2**20, len(page.encode())
    assert "<img" not in page and page.count('<svg class="matrix"') == 4
    assert seconds < 60  # about 2 s on a quiet 2-core machine; drawing 10,336 PNGs would take an hour
    stores_table = page[page.index('id="stores"'):]
    assert re.findall(r"<tr><td>(m\d+)</td>", stores_table) == names  # natural order: m0, m1, m2, ..., m10
    data = json.loads(re.search(r'id="zoo-data">(.*?)</script>', page, re.S).group(1))
    assert data["stores"] == names
    by_pair = {(r.measure, r.store_a, r.store_b): r for r in results}
    for m in data["measures"]:
        assert sorted(m["order"]) == list(range(64))
        for view in m["views"][1:]:
            layer = view["name"].removeprefix("layer ")
            k = int(layer.removeprefix("layer"))
            for a, b in [(0, 1), (1, 0), (5, 63), (63, 5), (10, 10), (2, 40)]:
                r = by_pair.get((m["name"], names[a], names[b]))
                expected = r.matrix[k, k] if r else by_pair[m["name"], names[b], names[a]].matrix[k, k]
                assert view["values"][a * 64 + b] == pytest.approx(expected, rel=5e-4), (m["name"], layer, a, b)
    shutil.rmtree(out)
