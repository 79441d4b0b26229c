"""One self-contained HTML page per ``measure`` run: ``report.html`` beside the manifest.

The page (``templates/report.html.j2``, rendered with Jinja2) fetches nothing. It shows

- for three or more stores (a zoo), first an overview: per measure, the model × model matrix of
  the best match s(A, B) (``zoo``), ordered by hierarchical clustering with the dendrogram beside
  it, drawn as inline SVG (readable without scripts); a small script then shows each cell's value
  on hover, a menu switches to S[l, l] for each layer name the stores share, and a click on a cell
  draws that pair's layer × layer matrix (layer names on both axes, values on hover) and its
  best-matching layers from numbers embedded in the page (``overview.page_data``);
- the run: date, device, simtorch version, the measures with their options and the command-line
  options (layers, reductions...);
- the stores, in natural order: path, samples, fingerprint, weights digest, layers and the
  reduction of each layer;
- with at most ``DETAIL_MAX_STORES`` stores, per measure: every heatmap with layer names on both
  axes (the PNGs ``write_results`` wrote, or rendered here), the diagonal S[l, l] of model pairs
  that share an architecture as a line plot (inline SVG), and for each pair of different stores
  the best-matching layer table — for each layer of A the most similar layer of B (the smallest
  value for distances) — with, for a shared architecture, how often it is the corresponding
  layer (Kornblith et al. 2019, Table 2's accuracy).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write_bytes
from .heatmaps import Heatmaps
from .overview import measure_overview, overview_svg, page_data
from .zoo import natural_order

if TYPE_CHECKING:
    import jinja2

    from ..engine.results import PairResult

__all__ = ["DETAIL_MAX_STORES", "OVERVIEW_MIN_STORES", "REPORT_NAME", "diagonal_svg", "render_report",
           "write_report"]

REPORT_NAME = "report.html"
OVERVIEW_MIN_STORES = 3
DETAIL_MAX_STORES = 6
TEMPLATES = Path(__file__).with_name("templates")


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _asset(name: str):
    """A file of ``templates/`` as markup (the page's CSS and script, inserted verbatim)."""
    from markupsafe import Markup

    return Markup((TEMPLATES / name).read_text(encoding="utf-8"))


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
        Already rendered heatmap PNGs by result index (rendered here otherwise; used only with at
        most ``DETAIL_MAX_STORES`` stores).
    title : str
    """
    from markupsafe import Markup

    from extract import __version__

    measures: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        measures.setdefault(r.measure, []).append(i)
    names = natural_order([*stores, *(n for r in results for n in (r.store_a, r.store_b))])
    zoo = []
    if len(names) >= OVERVIEW_MIN_STORES:
        for idx in measures.values():
            o = measure_overview([results[i] for i in idx], names)
            zoo.append({"measure": o.measure, "kind": o.kind, "value_range": o.value_range,
                        "views": o.views, "svg": overview_svg(o), "overview": o})
    details = []
    if len(names) <= DETAIL_MAX_STORES:
        with Heatmaps() as heatmaps:  # the PNGs not given, drawn on reused figures
            details = [_measure_details(m, results, idx, dict(pngs or {}), heatmaps) for m, idx in measures.items()]
    context = {
        "title": title, "version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device, "n_results": len(results), "n_stores": len(stores), "css": _asset("report.css"),
        "measures": [_measure_row(results[idx[0]]) for idx in measures.values()],
        "options": dict(options or {}), "stores": _store_rows(stores), "zoo": zoo, "details": details,
        "layer_views": any(len(z["views"]) > 1 for z in zoo), "detail_max": DETAIL_MAX_STORES,
        "approximate": _approximate_rows(results),
        "data": Markup(page_data([z["overview"] for z in zoo])) if zoo else "",
        "script": _asset("report.js") if zoo else "",
    }
    return _environment().get_template("report.html.j2").render(context)


def _approximate_rows(results: Sequence[PairResult]) -> list[dict[str, Any]]:
    """The banner's lines: per approximate measure (and options), its method, stated standard deviation and
    95 % bound, and how many entries were recomputed exactly (``--refine``)."""
    from .files import approximate_measures

    rows = []
    for entry in approximate_measures(results):
        a = entry["approximation"]
        rows.append({"name": entry["measure"], "method": a.get("method", ""), "std": a.get("std"),
                     "bound": a.get("bound_95"), "refined": entry["refined"],
                     "settings": ", ".join(f"{k}={v}" for k, v in a.items()
                                           if k not in ("method", "std", "bound_95"))})
    return rows


def _measure_row(r: PairResult) -> dict[str, Any]:
    return {"name": r.measure, "options": ", ".join(f"{k}={v}" for k, v in r.options.items()) or "—",
            "kind": r.spec.kind, "symmetric": r.spec.symmetric, "reference": r.spec.reference}


def _store_rows(stores: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The stores table, in natural order of their names; layers grouped by reduction."""
    rows = []
    for name in natural_order(stores):
        meta = stores[name]
        reductions = meta.get("reductions") or {}
        by_reduction: dict[str, list[str]] = {}
        for layer in meta.get("layers") or []:
            by_reduction.setdefault(reductions.get(layer, "flatten"), []).append(layer)
        rows.append({"name": name, "path": meta.get("path", ""), "n_samples": meta.get("n_samples", ""),
                     "fingerprint": str(meta.get("fingerprint", ""))[:30],
                     "weights": str(meta.get("weights_digest", ""))[:16], "layers": list(by_reduction.items())})
    return rows


def _measure_details(m: str, results: Sequence[PairResult], indices: Sequence[int],
                     pngs: Mapping[int, bytes], heatmaps: Heatmaps) -> dict[str, Any]:
    """One measure's layer × layer section: heatmaps (ids ``r<result index>``), corresponding layers, best matches."""
    from markupsafe import Markup

    own = [results[i] for i in indices]
    first = own[0]
    heatmaps = [{"id": f"r{i}", "a": results[i].store_a, "b": results[i].store_b,
                 "src": "data:image/png;base64," + base64.b64encode(pngs.get(i) or heatmaps.png(results[i])).decode()}
                for i in indices]
    cross = [r for r in own if r.store_a != r.store_b]
    shared = [r for r in cross if r.rows == r.cols]
    diagonal = ""
    if shared:
        lines = {f"{r.store_a} vs {r.store_b}": np.diag(r.matrix) for r in shared}
        diagonal = Markup(diagonal_svg(shared[0].rows, lines, title=f"{m}: corresponding layers S[l, l]", ylabel=m,
                                       value_range=first.spec.value_range))
    return {"measure": m, "kind": first.spec.kind, "value_range": first.spec.value_range, "heatmaps": heatmaps,
            "diagonal": diagonal, "best": [_best_table(r) for r in cross]}


def _best_table(r: PairResult) -> dict[str, Any]:
    shared = r.rows == r.cols
    rows = [(layer, best, value, shared and best == layer) for layer, best, value in r.best_matches()]
    hits = sum(ok for *_, ok in rows)
    return {"a": r.store_a, "b": r.store_b, "shared": shared, "rows": rows, "hits": hits,
            "percent": 100.0 * hits / max(1, len(rows))}


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
    n_stores = len({*stores, *(n for r in results for n in (r.store_a, r.store_b))})
    if len(entries) == len(results) and n_stores <= DETAIL_MAX_STORES:  # larger zoos embed no heatmaps
        for i, entry in enumerate(entries):
            png = entry.get("png")
            if png and (out / png).is_file():
                pngs[i] = (out / png).read_bytes()
    page = render_report(results, stores=stores, device=device, options=options, pngs=pngs)
    path = out / REPORT_NAME
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
