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
    # one diagonal plot per measure: seedA and seedB share an architecture, the wide model does not
    assert page.count("<svg") == 2
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


NAV_PROBE = """<script>
window.addEventListener('load', async function () {
  var tick = function () { return new Promise(function (done) { setTimeout(done, 0); }); };
  var links = [].slice.call(document.querySelectorAll('a[href^="#"]'));
  var unresolved = links.map(function (a) { return a.getAttribute('href'); })
                        .filter(function (h) { return !document.getElementById(h.slice(1)); });
  var overview = document.getElementById('overview'), run = document.getElementById('run');
  var box = overview ? overview.getBoundingClientRect() : null;
  var tables = [].slice.call(document.querySelectorAll('table.zoo'));
  var cells = [].slice.call(document.querySelectorAll('table.zoo a[href^="#"]'));
  var scrolled = [], missed = [];
  var last = document.documentElement.scrollHeight - window.innerHeight;
  for (var k = 0; k < cells.length; k++) {
    window.scrollTo(0, 0); await tick();
    cells[k].click(); await tick();
    var target = document.getElementById(cells[k].getAttribute('href').slice(1));
    var r = target.getBoundingClientRect();
    var atTop = Math.abs(r.top) < 2, atEnd = window.scrollY >= last - 2 && r.top >= 0 && r.bottom <= innerHeight + 2;
    (window.scrollY > 0 && (atTop || atEnd) && location.hash === cells[k].getAttribute('href') ? scrolled : missed)
      .push(cells[k].getAttribute('href'));
  }
  window.scrollTo(0, 0);
  var out = {links: links.length, unresolved: unresolved, scrollWidth: document.documentElement.scrollWidth,
             innerWidth: window.innerWidth, overviewTop: box ? box.top : null, viewport: window.innerHeight,
             overviewBeforeRun: !!(overview && run && box.top < run.getBoundingClientRect().top),
             zooTables: tables.length, zooTablesShown: tables.filter(function (t) {
               var b = t.getBoundingClientRect(); return b.width > 50 && b.height > 50; }).length,
             cells: cells.length, scrolled: scrolled.length, missed: missed};
  var pre = document.createElement('pre'); pre.id = 'nav-result'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash .ci/setup test installs it)")
def test_zoo_overview_links_scroll_to_their_pairs_at_1280px(run, tmp_path):
    """Three stores: the report opens with a table of contents and one model × model matrix per measure, every
    in-page link resolves, each matrix cell scrolls its pair's heatmap into view, and nothing is wider than 1280 px."""
    import html

    page = (run / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "nav-report.html"
    probed.write_text(page.replace("<head>", "<head>" + NAV_PROBE, 1), encoding="utf-8")
    done = _browse(probed, tmp_path, "--window-size=1280,900", "--dump-dom")
    match = re.search(r'<pre id="nav-result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading in chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    seen = json.loads(html.unescape(match.group(1)))
    assert seen["innerWidth"] == 1280 and seen["scrollWidth"] <= 1280, seen  # no horizontal overflow
    assert seen["unresolved"] == [] and seen["links"] > 3 * 3 * 2, seen
    assert seen["zooTables"] == seen["zooTablesShown"] == 2  # one matrix per measure, laid out
    assert seen["overviewBeforeRun"] and 0 <= seen["overviewTop"] < seen["viewport"], seen  # on the first screen
    assert seen["cells"] == 2 * 3 * 3 and seen["scrolled"] == seen["cells"] and seen["missed"] == [], seen
    # each cell's value is the mean of its pair's matrix on disk, and links to that pair's heatmap
    from measure.report import read_matrix_csv

    manifest = json.loads((run / "manifest.json").read_text())
    for index, entry in enumerate(manifest["results"]):
        mean = np.nanmean(read_matrix_csv(run / entry["csv"])[2])
        cell = re.search(rf'<a href="#r{index}" style="color:#[0-9a-f]{{6}}" title="{entry["measure"]}: '
                         rf'{entry["store_a"]} vs {entry["store_b"]}">([-0-9.]+)</a>', page)
        assert cell and float(cell.group(1)) == pytest.approx(mean, abs=5e-4), entry
        figure = re.search(rf'<figure id="r{index}"><img src="[^"]+" alt="([^"]+)"', page)
        assert figure and figure.group(1) == f"{entry['measure']} heatmap: {entry['store_a']} vs {entry['store_b']}"
    shot = tmp_path / "overview.png"
    _browse(run / "report.html", tmp_path, "--window-size=1280,900", f"--screenshot={shot}")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    first = re.search(r'<td class="cell" style="background:#([0-9a-f]{6})">', page).group(1)
    colour = np.array([int(first[k:k + 2], 16) for k in (0, 2, 4)])
    assert (np.abs(pixels.astype(int) - colour).max(axis=1) <= 2).sum() > 500  # the overview is on the first screen


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
