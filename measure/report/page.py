"""One self-contained HTML page per ``measure`` run: ``report.html`` beside the manifest.

The page needs nothing but itself (no scripts, no network): heatmaps are
embedded as base64 PNG (the PNGs ``write_results`` wrote, or rendered here when
plots were skipped) and the diagonal plots are inline SVG. It shows

- for three or more stores (a zoo), first an overview: a table of contents
  and, per measure, one model × model matrix of the mean of each pair's
  layer × layer matrix (NaN ignored), drawn as a coloured table with the
  values printed, each cell a link to that pair's heatmap below;
- the run: date, device, simtorch version, the measures with their options
  and the command-line options (layers, reductions...);
- the stores: path, samples, fingerprint, weights digest, layers and the
  reduction of each layer;
- per measure: every heatmap with layer names on both axes;
- per measure, when two models share an architecture (the same layer names in
  the same order): the diagonal S[l, l] of corresponding layers as a line
  plot, one line per model pair;
- per measure and pair of different stores: the best-matching layer table —
  for each layer of A the most similar layer of B (the smallest value for
  distances) — and, for a shared architecture, how often it is the
  corresponding layer (Kornblith et al. 2019, Table 2's accuracy).
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write_bytes
from .heatmaps import heatmap_png

if TYPE_CHECKING:
    from ..engine.results import PairResult

__all__ = ["REPORT_NAME", "diagonal_svg", "render_report", "write_report"]

REPORT_NAME = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1200px;
color:#1d1d1f;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;border:1px solid #e3e3e3;padding:.4rem;background:#fff}
figure img{display:block;max-width:560px;height:auto}figcaption{font-size:.8rem;color:#555;margin-top:.2rem}
.ok{color:#11772d}.miss{color:#b3261e}code{background:#f4f4f6;padding:0 .2rem;border-radius:3px}
.muted{color:#666;font-size:.85rem}nav a{margin-right:.8rem}
.scroll{overflow-x:auto;max-width:100%}td code{word-break:break-all}
figure.diagonal svg{max-width:100%;height:auto}
nav.toc ul{margin:.2rem 0;padding-left:1.2rem}nav.toc li{margin:.1rem 0}nav.toc a{margin-right:0}
table.zoo td.cell{text-align:center;padding:0;min-width:3.6rem}
table.zoo td.cell a{display:block;padding:.35rem .4rem;text-decoration:none;font-variant-numeric:tabular-nums}
table.zoo td.cell a:hover{outline:2px solid #1d1d1f;outline-offset:-2px}
table.zoo th.model{max-width:12rem;overflow-wrap:anywhere;vertical-align:middle}
"""

OVERVIEW_MIN_STORES = 3


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def diagonal_svg(layers: Sequence[str], lines: Mapping[str, Sequence[float]], *, title: str = "",
                 ylabel: str = "", value_range: tuple[float, float] | None = None) -> str:
    """Inline SVG line plot of S[l, l] over corresponding ``layers``, one line per pair label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(layers) + 2.5) + 2.5, 3.6), dpi=100, layout="constrained")
    x = np.arange(len(layers))
    for label, values in lines.items():
        ax.plot(x, np.asarray(values, dtype=float), marker="o", label=label)
    ax.set_xticks(x, labels=list(layers), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if value_range is not None and np.isfinite(value_range).all():
        ax.set_ylim(*value_range)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)  # beside, not over
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML


def _pair_label(r: PairResult) -> str:
    return f"{r.store_a} vs {r.store_b}"


def _best_match_table(r: PairResult) -> str:
    shared = r.rows == r.cols
    head = "<tr><th>layer of " + _e(r.store_a) + "</th><th>best match in " + _e(r.store_b) + "</th><th>" + \
        ("lowest distance" if r.spec.kind == "distance" else "highest similarity") + "</th>" + \
        ("<th>corresponding?</th>" if shared else "") + "</tr>"
    rows, hits = [], 0
    for layer, best, value in r.best_matches():
        cell = ""
        if shared:
            ok = best == layer
            hits += ok
            cell = f'<td class="{"ok" if ok else "miss"}">{"yes" if ok else "no"}</td>'
        rows.append(f"<tr><td>{_e(layer)}</td><td>{_e(best or '—')}</td><td class=\"num\">{value:.4f}</td>{cell}</tr>")
    summary = (f'<p class="muted">best match is the corresponding layer for {hits} of {len(r.rows)} layers '
               f"({100.0 * hits / max(1, len(r.rows)):.0f} %).</p>") if shared else ""
    return f"<table>{head}{''.join(rows)}</table>{summary}"


def _stores_table(stores: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, meta in stores.items():
        reductions = meta.get("reductions") or {}
        by_reduction: dict[str, list[str]] = {}
        for layer in meta.get("layers") or []:
            by_reduction.setdefault(reductions.get(layer, "flatten"), []).append(layer)
        layer_cells = "<br>".join(f"<b>{_e(r)}</b>: {_e(', '.join(names))}" for r, names in by_reduction.items())
        rows.append(
            f"<tr><td>{_e(name)}</td><td><code>{_e(meta.get('path', ''))}</code></td>"
            f"<td class=\"num\">{_e(meta.get('n_samples', ''))}</td>"
            f"<td><code>{_e(str(meta.get('fingerprint', ''))[:30])}…</code></td>"
            f"<td><code>{_e(str(meta.get('weights_digest', ''))[:16])}</code></td><td>{layer_cells}</td></tr>")
    return ("<table><tr><th>store</th><th>path</th><th>samples</th><th>fingerprint</th><th>weights</th>"
            "<th>layers by reduction</th></tr>" + "".join(rows) + "</table>")


def render_report(results: Sequence[PairResult], *, stores: Mapping[str, Mapping[str, Any]], device: str = "",
                  options: Mapping[str, Any] | None = None, pngs: Mapping[int, bytes] | None = None,
                  title: str = "simtorch similarity report") -> str:
    """The report page as a string.

    Parameters
    ----------
    results : list of PairResult
    stores : dict
        Per store name: ``path``, ``n_samples``, ``fingerprint``,
        ``weights_digest``, ``layers`` and optionally ``reductions``.
    device : str
    options : dict, optional
        Run options to list (layers, reduce...).
    pngs : dict of int to bytes, optional
        Already rendered heatmap PNGs by result index (rendered here otherwise).
    """
    pngs = dict(pngs or {})
    measures: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        measures.setdefault(r.measure, []).append(i)
    names = list(dict.fromkeys([*stores, *(n for r in results for n in (r.store_a, r.store_b))]))
    zoo = len(names) >= OVERVIEW_MIN_STORES
    parts = _head(title, device, len(results), len(stores), measures, toc=zoo)
    if zoo:
        parts += _overview(results, measures, names)
    parts += _run_tables(results, measures, options)
    parts += ['<h2 id="stores">Stores</h2>', '<div class="scroll">' + _stores_table(stores) + "</div>"]
    for m, idx in measures.items():
        parts += _measure_section(m, [results[i] for i in idx], [pngs.get(i) for i in idx], idx)
    parts.append("</body></html>")
    return "\n".join(parts)


def _head(title: str, device: str, n_results: int, n_stores: int, measures: Mapping[str, list[int]], *,
          toc: bool = False) -> list[str]:
    """The document head, the title, the run line and the navigation (a table of contents for a zoo)."""
    from extract import __version__

    return [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">simtorch {_e(__version__)} · {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} · device '
        f"{_e(device or '?')} · {n_results} result(s) · {n_stores} store(s)</p>",
        _toc(measures) if toc else
        "<nav>" + "".join(f'<a href="#m-{_e(m)}">{_e(m)}</a>' for m in measures) + "</nav>",
    ]


def _toc(measures: Mapping[str, list[int]]) -> str:
    """The table of contents of a zoo's report: the overview (one matrix per measure), run, stores, measures."""
    overview = "".join(f'<li><a href="#o-{_e(m)}">{_e(m)}</a></li>' for m in measures)
    sections = "".join(f'<li><a href="#m-{_e(m)}">{_e(m)}</a></li>' for m in measures)
    return ('<nav class="toc" id="contents"><b>Contents</b><ul>'
            f'<li><a href="#overview">Overview: model × model</a><ul>{overview}</ul></li>'
            '<li><a href="#run">Run</a></li><li><a href="#stores">Stores</a></li>'
            f"<li>Layer × layer, per measure<ul>{sections}</ul></li></ul></nav>")


def _pair_id(index: int) -> str:
    """The element id of result ``index``'s heatmap (ids from indices: any store name is safe)."""
    return f"r{index}"


def _cell_colours(value: float, lo: float, hi: float) -> tuple[str, str]:
    """(background, text) colours of an overview cell: viridis over [lo, hi], dark text on light cells."""
    from matplotlib import colormaps

    if not np.isfinite(value):
        return "#eeeeee", "#1d1d1f"
    t = 0.5 if hi <= lo else float(np.clip((value - lo) / (hi - lo), 0.0, 1.0))
    r, g, b, _ = colormaps["viridis"](t)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}", "#1d1d1f" if luminance > 0.45 else "#ffffff"


def _overview(results: Sequence[PairResult], measures: Mapping[str, list[int]], names: Sequence[str]) -> list[str]:
    """Per measure, the model × model matrix of the mean of each pair's layer × layer matrix (NaN ignored).

    Each cell links to its pair's heatmap; a symmetric measure's pair (a, b) fills both (a, b) and (b, a).
    Colours span the measure's value range when finite, else the values shown.
    """
    parts = ['<h2 id="overview">Overview: model × model</h2>',
             '<p class="muted">Each cell: the mean over all layer pairs of that pair\'s layer × layer matrix '
             "(rows: the first model). Click a cell for its layer-by-layer heatmap below.</p>"]
    position = {name: k for k, name in enumerate(names)}
    for m, idx in measures.items():
        values = np.full((len(names), len(names)), np.nan)
        target: dict[tuple[int, int], int] = {}
        for i in idx:
            r = results[i]
            a, b = position[r.store_a], position[r.store_b]
            with np.errstate(all="ignore"):
                finite = np.isfinite(r.matrix)
                mean = float(r.matrix[finite].mean()) if finite.any() else np.nan
            values[a, b] = mean
            target[a, b] = i
            if r.spec.symmetric and (b, a) not in target:
                values[b, a] = mean
                target[b, a] = i
        spec = results[idx[0]].spec
        lo, hi = spec.value_range
        if not (np.isfinite(lo) and np.isfinite(hi)):
            shown = values[np.isfinite(values)]
            lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
        head = "".join(f'<th class="model">{_e(n)}</th>' for n in names)
        rows = []
        for a, name in enumerate(names):
            cells = []
            for b in range(len(names)):
                if (a, b) not in target:
                    cells.append('<td class="cell">—</td>')
                    continue
                background, colour = _cell_colours(values[a, b], lo, hi)
                text = f"{values[a, b]:.3f}" if np.isfinite(values[a, b]) else "NaN"
                cells.append(f'<td class="cell" style="background:{background}"><a href="#{_pair_id(target[a, b])}" '
                             f'style="color:{colour}" title="{_e(m)}: {_e(name)} vs {_e(names[b])}">{text}</a></td>')
            rows.append(f'<tr><th class="model">{_e(name)}</th>{"".join(cells)}</tr>')
        parts.append(f'<h3 id="o-{_e(m)}">{_e(m)} <span class="muted">({_e(spec.kind)}, mean of the layer × layer '
                     f"matrix; colour from {lo:g}, dark, to {hi:g}, light)</span></h3>"
                     f'<div class="scroll"><table class="zoo"><tr><th></th>{head}</tr>'
                     f'{"".join(rows)}</table></div>')
    return parts


def _run_tables(results: Sequence[PairResult], measures: Mapping[str, list[int]],
                options: Mapping[str, Any] | None) -> list[str]:
    """The "Run" section: each measure with its options and properties, then the run options."""
    parts = ['<h2 id="run">Run</h2><table><tr><th>measure</th><th>options</th><th>kind</th><th>symmetric</th>'
             "<th>reference</th></tr>"]
    for m, idx in measures.items():
        r = results[idx[0]]
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items()) or "—"
        parts.append(f"<tr><td>{_e(m)}</td><td><code>{_e(opts)}</code></td><td>{_e(r.spec.kind)}</td>"
                     f"<td>{'yes' if r.spec.symmetric else 'no'}</td><td>{_e(r.spec.reference)}</td></tr>")
    parts.append("</table>")
    if options:
        parts.append("<table><tr><th>option</th><th>value</th></tr>" + "".join(
            f"<tr><td>{_e(k)}</td><td><code>{_e(v)}</code></td></tr>" for k, v in options.items()) + "</table>")
    return parts


def _measure_section(m: str, results: Sequence[PairResult], pngs: Sequence[bytes | None],
                     indices: Sequence[int]) -> list[str]:
    """One measure's section: its heatmaps (ids from the results' ``indices``), the corresponding-layer plot
    and the best-match tables."""
    first = results[0]
    parts = [f'<h2 id="m-{_e(m)}">{_e(m)}</h2>',
             f'<p class="muted">{_e(first.spec.kind)} in [{first.spec.value_range[0]:g}, '
             f"{first.spec.value_range[1]:g}]; rows are the first store's layers.</p>"]
    parts += _heatmaps(m, results, pngs, indices)
    cross = [r for r in results if r.store_a != r.store_b]
    shared = [r for r in cross if r.rows == r.cols]
    if shared:
        parts.append(_diagonal_figure(m, shared, first.spec.value_range))
    if cross:
        parts.append("<h3>Best-matching layers</h3>")
        for r in cross:
            parts.append(f"<p><b>{_e(_pair_label(r))}</b></p>{_best_match_table(r)}")
    return parts


def _heatmaps(m: str, results: Sequence[PairResult], pngs: Sequence[bytes | None],
              indices: Sequence[int]) -> list[str]:
    """Every heatmap of one measure, embedded (the given PNG, or one rendered now), each with its pair's id."""
    parts = ["<h3>Heatmaps</h3><div class=\"grid\">"]
    for r, png, index in zip(results, pngs, indices, strict=True):
        png = png or heatmap_png(r)
        parts.append(f'<figure id="{_pair_id(index)}">'
                     f'<img src="{_png_data_uri(png)}" alt="{_e(m)} heatmap: {_e(_pair_label(r))}">'
                     f"<figcaption>{_e(m)}: {_e(r.store_a)} (rows) vs {_e(r.store_b)} (columns)"
                     "</figcaption></figure>")
    parts.append("</div>")
    return parts


def _diagonal_figure(m: str, shared: Sequence[PairResult], value_range: tuple[float, float]) -> str:
    """S[l, l] of model pairs of the same architecture, as an inline SVG figure."""
    lo, hi = value_range
    svg = diagonal_svg(shared[0].rows, {_pair_label(r): np.diag(r.matrix) for r in shared},
                       title=f"{m}: corresponding layers S[l, l]", ylabel=m, value_range=(lo, hi))
    return ("<h3>Corresponding layers</h3>"
            f'<figure class="diagonal">{svg}<figcaption>{_e(m)} of layer l in one model with layer l '
            "in the other, for model pairs of the same architecture</figcaption></figure>")


def write_report(results: Sequence[PairResult], out: str | Path, *, stores: Mapping[str, Mapping[str, Any]],
                 device: str = "", options: Mapping[str, Any] | None = None,
                 manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/report.html`` (atomically) and return its path.

    With ``manifest`` (what ``write_results`` wrote), heatmap PNGs already on
    disk are embedded instead of being rendered again.
    """
    out = Path(out)
    pngs: dict[int, bytes] = {}
    entries = list((manifest or {}).get("results", []))
    if len(entries) == len(results):
        for i, entry in enumerate(entries):
            png = entry.get("png")
            if png and (out / png).is_file():
                pngs[i] = (out / png).read_bytes()
    page = render_report(results, stores=stores, device=device, options=options, pngs=pngs)
    path = out / REPORT_NAME
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
