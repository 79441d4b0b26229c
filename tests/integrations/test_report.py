"""The HTML run report: content checks, and rendering in a real browser (headless Chromium).

The browser test loads a copy of the page with a probe injected at the top of
<head> that records script errors, failed resource loads and console.error
calls, and on load writes what it saw (every <img> decoded with a natural
width, every figure laid out with a non-zero size) into the DOM, which
``--dump-dom`` prints. A control page with a broken image and a script error
shows that the probe does catch both.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from extract import extract
from extract.demo import DEMO_LAYERS, cnn, digits

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)

PROBE = """<script>
window.__probe = {errors: []};
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__probe.errors.push(t && t !== window && t.tagName ? 'failed to load ' + t.tagName : String(e.message));
}, true);
var _consoleError = console.error;
console.error = function () { window.__probe.errors.push('console.error: ' + [].join.call(arguments, ' '));
  _consoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.images), svgs = [].slice.call(document.querySelectorAll('svg'));
  var shown = function (el) { var r = el.getBoundingClientRect(); return r.width > 20 && r.height > 20; };
  var decoded = function (i) { return i.complete && i.naturalWidth > 0; };
  var out = {images: imgs.length, decoded: imgs.filter(decoded).length,
             imagesShown: imgs.filter(shown).length, svgs: svgs.length, svgsShown: svgs.filter(shown).length,
             tables: document.querySelectorAll('table').length, errors: window.__probe.errors, title: document.title};
  var pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=15000"]


def _browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{page.stem}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)


def _probe(report: Path, tmp_path: Path) -> dict:
    """Load ``report`` with the probe injected; the probe's findings."""
    text = report.read_text(encoding="utf-8")
    probed = tmp_path / f"probed-{report.name}"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    done = _browse(probed, tmp_path, "--dump-dom")
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading in chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(match.group(1)))


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            v = a.get(key)
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three stores (two of one architecture, one wider) measured with two measures by the CLI."""
    root = tmp_path_factory.mktemp("report")
    x = digits("test")[0][:48]
    for name, width, seed in (("seedA", 16, 0), ("seedB", 16, 1), ("wide", 24, 2)):
        torch.manual_seed(seed)
        model = cnn(width)
        layers = DEMO_LAYERS if width == 16 else ["block1", "block2", "fc1"]
        extract(model, x, root / "stores" / f"{name}.zarr", name=name, layers=layers, batch_size=16, progress=False)
    out = root / "results"
    code = pipeline.main(["measure", str(root / "stores"), "--measures", "cka", "cka_debiased", "--out", str(out),
                          "--quiet", "--reduce", "block1=gap"])
    assert code == 0
    return out


def test_report_content(run):
    report = run / "report.html"
    manifest = json.loads((run / "manifest.json").read_text())
    page = report.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    assert parser.external == []  # self-contained: no file or network references
    results = manifest["results"]
    assert len(parser.imgs) == len(results) == 2 * 6  # 3 stores: 6 unordered pairs per symmetric measure
    assert all(img["src"].startswith("data:image/png;base64,") for img in parser.imgs)
    for entry in results:  # every heatmap is the PNG written beside the CSV, labelled with its pair
        assert f"{entry['measure']} heatmap: {entry['store_a']} vs {entry['store_b']}" in page
    # one overview per measure (three stores), then one diagonal plot per measure: seedA and seedB share an
    # architecture, the wide model does not
    assert page.count('<svg class="matrix"') == 2 and page.count('<figure class="diagonal"><svg') == 2
    assert page.index('id="overview"') < page.index('id="run"') < page.index('<figure class="diagonal">')
    text = " ".join(parser.text)
    assert "Best-matching layers" in text and "seedA vs seedB" in text and "seedA vs wide" in text
    for layer in DEMO_LAYERS:
        assert layer in text
    assert "block1=gap" in text and "gap" in text  # options and reductions
    for name in ("seedA", "seedB", "wide"):
        assert manifest["stores"][name]["path"] in page
    # the best-match table equals the matrix on disk
    from measure.report import read_matrix_csv

    entry = next(e for e in results if e["measure"] == "cka" and {e["store_a"], e["store_b"]} == {"seedA", "seedB"})
    rows, cols, matrix = read_matrix_csv(run / entry["csv"])
    best = cols[int(np.argmax(matrix[0]))]
    assert re.search(rf"<tr><td>{rows[0]}</td><td>{best}</td><td class=\"num\">{matrix[0].max():.4f}</td>", page)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash .ci/setup test installs it)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    manifest = json.loads((run / "manifest.json").read_text())
    seen = _probe(run / "report.html", tmp_path)
    assert seen["errors"] == []
    assert seen["images"] == len(manifest["results"])
    assert seen["decoded"] == seen["images"] and seen["imagesShown"] == seen["images"]
    assert seen["svgs"] >= 2 and seen["svgsShown"] == seen["svgs"]
    assert seen["title"] == "simtorch similarity report"
    # a screenshot of the page: drawn, not blank
    shot = tmp_path / "report.png"
    _browse(run / "report.html", tmp_path, "--window-size=1280,2000", f"--screenshot={shot}")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


ZOO_PROBE = """<script>
window.addEventListener('load', function () {
  // Click overview cells (window.__clicks: [measure, row, column] in display order), read the pair panel that
  // opens and the tooltips; then switch each overview with a view menu to its next view.
  var sections = [].slice.call(document.querySelectorAll('section.overview'));
  var centre = function (el) {
    var r = el.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];
  };
  var fire = function (el, type) {
    var c = centre(el);
    el.dispatchEvent(new MouseEvent(type, {clientX: c[0], clientY: c[1], bubbles: true}));
  };
  var overview = document.getElementById('overview'), run = document.getElementById('run');
  var svgs = [].slice.call(document.querySelectorAll('svg.matrix'));
  var out = {overviewTop: overview ? overview.getBoundingClientRect().top : null,  // before any click scrolls
             firstMatrixTop: svgs.length ? svgs[0].getBoundingClientRect().top : null, viewport: innerHeight,
             overviewBeforeRun: !!(overview && run &&
                                   overview.getBoundingClientRect().top < run.getBoundingClientRect().top)};
  var tip = document.getElementById('tip'), opened = [], slowest = 0;
  (window.__clicks || []).forEach(function (c) {
    var section = sections[c[0]], svg = section.querySelector('svg.matrix'), n = +svg.dataset.rows;
    var rect = svg.querySelectorAll('g.cells rect')[c[1] * n + c[2]];
    fire(rect, 'mousemove');
    var cellTip = tip.hidden ? null : tip.textContent;
    var t0 = performance.now();
    fire(rect, 'click');
    slowest = Math.max(slowest, performance.now() - t0);
    var panel = section.querySelector('.pair'), matrix = panel.querySelector('svg.pairmatrix'), values = [];
    if (matrix) {
      var cells = [].slice.call(matrix.querySelectorAll('g.cells rect'));
      cells.forEach(function (r) { fire(r, 'mousemove'); values.push(tip.hidden ? null : tip.textContent); });
    }
    var box = panel.getBoundingClientRect();
    opened.push({click: c, cellTip: cellTip, shown: !panel.hidden && box.width > 50 && box.height > 50,
                 head: panel.querySelector('h4') ? panel.querySelector('h4 span').textContent : null,
                 rows: matrix ? +matrix.dataset.rows : 0, cols: matrix ? +matrix.dataset.cols : 0,
                 cellTips: values, table: panel.querySelectorAll('table.best tr').length});
  });
  var switched = sections.map(function (section) {
    var select = section.querySelector('select');
    if (!select || select.options.length < 2) return null;
    var rects = section.querySelectorAll('svg.matrix g.cells rect');
    var before = [].map.call(rects, function (r) { return r.getAttribute('fill'); }).join();
    select.value = '1'; select.dispatchEvent(new Event('change'));
    var after = [].map.call(rects, function (r) { return r.getAttribute('fill'); }).join();
    return {changed: before !== after, name: section.querySelector('.viewname').textContent,
            visible: !select.closest('.controls').hidden};
  });
  Object.assign(out, {overviews: svgs.length, overviewsShown: svgs.filter(function (s) {
               var b = s.getBoundingClientRect(); return b.width > 100 && b.height > 100; }).length,
             dendrograms: svgs.map(function (s) { return s.querySelectorAll('g.dendrogram path').length; }),
             rowNames: svgs.map(function (s) {  // the row labels, top to bottom
               var labels = s.querySelectorAll('g[text-anchor="end"] text');
               return [].map.call(labels, function (t) { return t.textContent; });
             }),
             scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth,
             opened: opened, slowestClickMs: slowest, switched: switched,
             errors: (window.__probe || {errors: []}).errors});
  var pre = document.createElement('pre'); pre.id = 'zoo-result'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _zoo_probe(report: Path, tmp_path: Path, clicks: list[tuple[int, int, int]], *, size: str = "1280,900") -> dict:
    """Load ``report`` with the error probe and ``ZOO_PROBE`` injected, clicking ``clicks``; what the probe saw."""
    import html

    page = report.read_text(encoding="utf-8")
    setup = f"<script>window.__clicks = {json.dumps([list(c) for c in clicks])};</script>"
    probed = tmp_path / f"zoo-{report.parent.name}.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE + setup + ZOO_PROBE, 1), encoding="utf-8")
    done = _browse(probed, tmp_path, f"--window-size={size}", "--dump-dom")
    match = re.search(r'<pre id="zoo-result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading in chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash .ci/setup test installs it)")
def test_zoo_overview_opens_each_pairs_matrix_on_click_at_1280px(run, tmp_path):
    """Three stores: the report opens with one model × model best-match overview per measure on the first screen;
    hovering a cell shows the best match of the pair's matrix on disk, a click on it draws that pair's
    layer × layer matrix in the page, rows the row model's layers, each value on hover equal to the CSV's; nothing
    is wider than 1280 px."""
    from measure import MEASURES
    from measure.report import read_matrix_csv
    from measure.report.zoo import best_match

    manifest = json.loads((run / "manifest.json").read_text())
    measures = list(dict.fromkeys(e["measure"] for e in manifest["results"]))
    clicks = [(m, i, j) for m in range(len(measures)) for i in range(3) for j in range(3)]
    seen = _zoo_probe(run / "report.html", tmp_path, clicks)
    assert seen["errors"] == [], seen["errors"]
    assert seen["innerWidth"] == 1280 and seen["scrollWidth"] <= 1280, seen  # no horizontal overflow
    assert seen["overviews"] == seen["overviewsShown"] == 2 and seen["dendrograms"] == [2, 2]
    assert seen["overviewBeforeRun"] and 0 <= seen["firstMatrixTop"] < seen["viewport"], seen  # the first screen
    csv = {(e["measure"], e["store_a"], e["store_b"]): read_matrix_csv(run / e["csv"]) for e in manifest["results"]}
    for o in seen["opened"]:
        m = measures[o["click"][0]]
        a, b = re.fullmatch(rf"{m}: (\S+) \(rows\) vs (\S+) \(columns\)", o["head"]).groups()
        assert [a, b] == [seen["rowNames"][o["click"][0]][k] for k in o["click"][1:]]  # the clicked row and column
        rows, cols, matrix = csv.get((m, a, b)) or (lambda r, c, x: (c, r, x.T))(*csv[(m, b, a)])  # symmetric
        assert o["shown"] and (o["rows"], o["cols"]) == matrix.shape and o["table"] == len(rows) + 1, o
        s = best_match(matrix, MEASURES[m].kind)
        assert o["cellTip"].startswith(f"{a} (row) vs {b}"), o
        assert float(o["cellTip"].rsplit(": ", 1)[1]) == pytest.approx(s, rel=1e-3), o
        for k, tip in enumerate(o["cellTips"]):
            i, j = divmod(k, len(cols))
            assert tip.startswith(f"{rows[i]} of {a} vs {cols[j]} of {b}"), tip
            assert float(tip.rsplit(": ", 1)[1]) == pytest.approx(matrix[i, j], rel=1e-3), tip


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash .ci/setup test installs it)")
def test_the_browser_probe_catches_broken_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body>"
                   '<img src="data:image/png;base64,AAAA" alt="broken"><img src="missing.png" alt="missing">'
                   "<script>undefinedFunction();</script></body></html>")
    seen = _probe(bad, tmp_path)
    assert seen["images"] == 2 and seen["decoded"] == 0
    assert any("undefinedFunction" in e for e in seen["errors"])
    assert sum("failed to load IMG" in e for e in seen["errors"]) == 2


def test_no_report_flag(run, tmp_path):
    stores = run.parent / "stores"
    out = tmp_path / "res"
    assert pipeline.main(["measure", str(stores / "seedA.zarr"), "--measures", "cka", "--out", str(out),
                          "--quiet", "--no-report"]) == 0
    assert (out / "manifest.json").exists() and not (out / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash .ci/setup test installs it)")
def test_a_64_model_zoo_report_opens_and_responds_in_chromium(tmp_path):
    """64 models × 4 layers × 4 measures (synthetic results): the page, at most 10 MB, loads without errors with its
    four overviews, a click opens the pair's matrix at once, oriented as computed (linreg: rows are the row
    model's layers, S(A, B) and not S(B, A)ᵀ), and the view menu redraws the overview."""
    from _zoo_results import ZOO_MEASURES, zoo_results

    from measure import MEASURES
    from measure.report import write_report
    from measure.report.zoo import best_match

    names, results, stores = zoo_results(64)
    out = tmp_path / "zoo64"
    out.mkdir()
    report = write_report(results, out, stores=stores, device="cpu")
    assert report.stat().st_size <= 10 * 2**20
    linreg = ZOO_MEASURES.index("linreg")
    clicks = [(linreg, i, j) for i, j in [(0, 1), (1, 0), (5, 60), (60, 5), (33, 33)]] + [(0, 63, 0), (1, 7, 8)]
    seen = _zoo_probe(report, tmp_path, clicks)
    assert seen["errors"] == [], seen["errors"]
    assert seen["overviews"] == seen["overviewsShown"] == 4 and seen["dendrograms"] == [63] * 4
    assert seen["overviewBeforeRun"] and 0 <= seen["firstMatrixTop"] < seen["viewport"], seen
    assert all(sorted(rows, key=lambda s: int(s[1:])) == names for rows in seen["rowNames"])
    assert seen["slowestClickMs"] < 500, seen["slowestClickMs"]
    assert [s["changed"] and s["visible"] and s["name"] == "layer layer0" for s in seen["switched"]] == [True] * 4
    by_pair = {(r.measure, r.store_a, r.store_b): r for r in results}
    for o in seen["opened"]:
        k, i, j = o["click"]
        a, b = seen["rowNames"][k][i], seen["rowNames"][k][j]
        assert o["shown"] and o["head"] == f"{ZOO_MEASURES[k]}: {a} (rows) vs {b} (columns)", o
        r = by_pair.get((ZOO_MEASURES[k], a, b))
        matrix = r.matrix if r else by_pair[ZOO_MEASURES[k], b, a].matrix.T  # a symmetric measure's other order
        s = best_match(matrix, MEASURES[ZOO_MEASURES[k]].kind)
        assert float(o["cellTip"].rsplit(": ", 1)[1]) == pytest.approx(s, rel=1e-3), o
        values = [float(t.rsplit(": ", 1)[1]) for t in o["cellTips"]]
        np.testing.assert_allclose(values, matrix.ravel(), rtol=1e-3)
