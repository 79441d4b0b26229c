// The zoo overview's behaviour: values on hover, a view per shared layer, and a click on a cell
// opens that pair's layer × layer matrix, drawn here from the numbers in #zoo-data
// (measure/report/overview.py page_data describes them).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("zoo-data").textContent);
  var tip = document.getElementById("tip");

  function esc(s) {
    return String(s).replace(/[&<>"]/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;"}[c];
    });
  }
  function fmt(v) {
    return typeof v === "number" ? v.toPrecision(4) : v === "NaN" ? "NaN (undefined)" : "no result";
  }
  function colour(v, range) {  // the same rule as overview.colour
    if (typeof v !== "number") return v === "NaN" ? "#d9d9d9" : "#ffffff";
    var lo = range[0], hi = range[1];
    var t = hi > lo ? Math.min(1, Math.max(0, (v - lo) / (hi - lo))) : 0.5;
    return data.palette[Math.floor(255 * t + 0.5)];
  }
  function ink(fill) {  // the same rule as overview.ink
    var n = parseInt(fill.slice(1), 16);
    var lum = (0.2126 * (n >> 16) + 0.7152 * ((n >> 8) & 255) + 0.0722 * (n & 255)) / 255;
    return lum > 0.45 ? "#1d1d1f" : "#ffffff";
  }
  function showTip(e, html) {
    tip.innerHTML = html;
    tip.hidden = false;
    var x = e.clientX + 14, y = e.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth - 4) x = e.clientX - tip.offsetWidth - 14;
    if (y + tip.offsetHeight > window.innerHeight - 4) y = e.clientY - tip.offsetHeight - 14;
    tip.style.left = Math.max(2, x) + "px";
    tip.style.top = Math.max(2, y) + "px";
  }
  function hideTip() { tip.hidden = true; }
  // (row, column) under the pointer in a matrix SVG that carries data-x0/y0/cell/rows/cols.
  function cellAt(svg, e) {
    var m = svg.getScreenCTM();
    if (!m) return null;
    var p = svg.createSVGPoint();
    p.x = e.clientX; p.y = e.clientY;
    p = p.matrixTransform(m.inverse());
    var d = svg.dataset, c = +d.cell;
    var i = Math.floor((p.y - d.y0) / c), j = Math.floor((p.x - d.x0) / c);
    return i >= 0 && j >= 0 && i < +d.rows && j < +d.cols ? [i, j] : null;
  }
  function hover(svg, describe) {
    svg.addEventListener("mousemove", function (e) {
      var c = cellAt(svg, e);
      if (c) showTip(e, describe(c[0], c[1])); else hideTip();
    });
    svg.addEventListener("mouseleave", hideTip);
  }

  // One pair's layer × layer matrix as SVG: layer names on both axes, values printed when they fit.
  // refined(i, j): whether that entry was recomputed exactly (outlined).
  function matrixSvg(rows, cols, at, range, refined) {
    var longest = function (names) { return names.reduce(function (k, s) { return Math.max(k, s.length); }, 1); };
    var cell = Math.max(14, Math.min(44, Math.floor(520 / Math.max(rows.length, cols.length))));
    var font = Math.min(11, 0.9 * cell);
    var x0 = Math.min(200, Math.ceil(0.6 * font * longest(rows)) + 8);
    var y0 = Math.min(200, Math.ceil(0.43 * font * longest(cols)) + 12);
    var w = x0 + cols.length * cell, h = y0 + rows.length * cell, digits = cell >= 40 ? 3 : 2;
    var out = ["<svg class=\"pairmatrix\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" + (w + 8) + "\" height=\"" +
      (h + 8) + "\" viewBox=\"0 0 " + (w + 8) + " " + (h + 8) + "\" data-x0=\"" + x0 + "\" data-y0=\"" + y0 +
      "\" data-cell=\"" + cell + "\" data-rows=\"" + rows.length + "\" data-cols=\"" + cols.length + "\">"];
    out.push("<g font-size=\"" + font + "\" text-anchor=\"end\" dominant-baseline=\"central\">");
    rows.forEach(function (r, i) {
      out.push("<text x=\"" + (x0 - 4) + "\" y=\"" + (y0 + (i + 0.5) * cell) + "\">" + esc(r) + "</text>");
    });
    out.push("</g><g font-size=\"" + font + "\">");
    cols.forEach(function (c, j) {
      out.push("<text transform=\"translate(" + (x0 + (j + 0.5) * cell) + "," + (y0 - 5) + ") rotate(-45)\">" +
        esc(c) + "</text>");
    });
    out.push("</g><g class=\"cells\">");
    var text = [];
    rows.forEach(function (r, i) {
      cols.forEach(function (c, j) {
        var v = at(i, j), fill = colour(v, range), x = x0 + j * cell, y = y0 + i * cell;
        out.push("<rect" + (refined(i, j) ? " class=\"refined\"" : "") + " x=\"" + x + "\" y=\"" + y +
          "\" width=\"" + (cell - 1) + "\" height=\"" + (cell - 1) + "\" fill=\"" + fill + "\"/>");
        if (cell >= 28) {
          text.push("<text x=\"" + (x + cell / 2) + "\" y=\"" + (y + cell / 2) + "\" fill=\"" + ink(fill) + "\">" +
            (typeof v === "number" ? v.toFixed(digits) : "NaN") + "</text>");
        }
      });
    });
    out.push("</g><g font-size=\"10\" text-anchor=\"middle\" dominant-baseline=\"central\" pointer-events=\"none\">" +
      text.join("") + "</g></svg>");
    return out.join("");
  }

  // For each row layer, the best column layer (largest similarity, smallest distance) over defined values.
  function bestTable(rows, cols, at, m, a, b) {
    var shared = rows.length === cols.length && rows.every(function (r, i) { return r === cols[i]; });
    var hits = 0, body = rows.map(function (r, i) {
      var best = -1, value = null;
      cols.forEach(function (c, j) {
        var v = at(i, j);
        if (typeof v === "number" && (best < 0 || (m.kind === "distance" ? v < value : v > value))) {
          best = j; value = v;
        }
      });
      var ok = shared && best === i;
      hits += ok ? 1 : 0;
      return "<tr><td>" + esc(r) + "</td><td>" + (best < 0 ? "—" : esc(cols[best])) + "</td><td class=\"num\">" +
        fmt(best < 0 ? "NaN" : value) + "</td>" + (shared ? "<td class=\"" + (ok ? "ok\">yes" : "miss\">no") +
        "</td>" : "") + "</tr>";
    });
    return "<div><table class=\"best\"><tr><th>layer of " + esc(data.stores[a]) + "</th><th>best match in " +
      esc(data.stores[b]) + "</th><th>" + (m.kind === "distance" ? "lowest distance" : "highest similarity") +
      "</th>" + (shared ? "<th>corresponding?</th>" : "") + "</tr>" + body.join("") + "</table>" +
      (shared ? "<p class=\"muted\">best match is the corresponding layer for " + hits + " of " + rows.length +
        " layers.</p>" : "") + "</div>";
  }

  function setUp(m, k) {
    var section = document.querySelector("section.overview[data-measure=\"" + k + "\"]");
    var svg = section.querySelector("svg.matrix"), panel = section.querySelector(".pair");
    var select = section.querySelector("select"), mark = svg.querySelector(".sel");
    var n = m.order.length, view = 0, byCell = {};
    m.pairs.forEach(function (p) { byCell[p[0] + "," + p[1]] = [p, false]; });
    if (m.symmetric) {
      m.pairs.forEach(function (p) { var key = p[1] + "," + p[0]; if (!byCell[key]) byCell[key] = [p, true]; });
    }
    function value(a, b) { return m.views[view].values[a * n + b]; }
    hover(svg, function (i, j) {
      var a = m.order[i], b = m.order[j];
      return "<b>" + esc(data.stores[a]) + "</b> (row) vs <b>" + esc(data.stores[b]) + "</b><br>" + esc(m.name) +
        ", " + esc(m.views[view].name) + ": " + fmt(value(a, b));
    });
    svg.addEventListener("click", function (e) {
      var c = cellAt(svg, e);
      if (!c) return;
      var d = svg.dataset;
      mark.setAttribute("x", +d.x0 + c[1] * d.cell); mark.setAttribute("y", +d.y0 + c[0] * d.cell);
      mark.setAttribute("visibility", "visible");
      open(m.order[c[0]], m.order[c[1]]);
    });
    function open(a, b) {
      var hit = byCell[a + "," + b], head = esc(m.name) + ": " + esc(data.stores[a]) + " (rows) vs " +
        esc(data.stores[b]) + " (columns)";
      panel.hidden = false;
      if (!hit) {
        panel.innerHTML = "<h4>" + head + "</h4><p class=\"muted\">No result for this pair.</p>";
        return;
      }
      var p = hit[0], t = hit[1], width = data.layers[p[3]].length;
      var rows = data.layers[t ? p[3] : p[2]], cols = data.layers[t ? p[2] : p[3]];
      var at = t ? function (i, j) { return p[4][j * width + i]; } : function (i, j) { return p[4][i * width + j]; };
      var exact = {};
      (p[5] || []).forEach(function (k) { exact[k] = true; });
      var refined = function (i, j) { return !!exact[t ? j * width + i : i * width + j]; };
      panel.innerHTML = "<h4><span>" + head + "</span><button type=\"button\">close</button></h4>" +
        "<div class=\"body\">" + matrixSvg(rows, cols, at, m.range, refined) + bestTable(rows, cols, at, m, a, b) + "</div>";
      panel.querySelector("button").addEventListener("click", function () {
        panel.hidden = true; mark.setAttribute("visibility", "hidden");
      });
      hover(panel.querySelector("svg"), function (i, j) {
        return "<b>" + esc(rows[i]) + "</b> of " + esc(data.stores[a]) + " vs <b>" + esc(cols[j]) + "</b> of " +
          esc(data.stores[b]) + "<br>" + esc(m.name) + ": " + fmt(at(i, j)) +
          (refined(i, j) ? " (refined: recomputed exactly)" : "");
      });
      panel.scrollIntoView({block: "nearest"});
    }
    if (select) {
      select.parentNode.parentNode.hidden = false;
      select.addEventListener("change", function () {
        view = +select.value;
        var rects = svg.querySelector("g.cells").children, texts = svg.querySelector("g.vals");
        var digits = +svg.dataset.cell >= 40 ? 3 : 2;
        for (var i = 0; i < n; i++) {
          for (var j = 0; j < n; j++) {
            var v = value(m.order[i], m.order[j]), fill = colour(v, m.range);
            rects[i * n + j].setAttribute("fill", fill);
            if (texts) {
              var label = texts.children[i * n + j];
              label.textContent = typeof v === "number" ? v.toFixed(digits) : v === "NaN" ? "NaN" : "";
              label.setAttribute("fill", ink(fill));
            }
          }
        }
        section.querySelector(".viewname").textContent = m.views[view].name;
      });
    }
  }
  data.measures.forEach(setUp);
})();
