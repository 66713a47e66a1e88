"""Pictures of jet lenses: an HTML table and an SVG like the paper's Figure 3, and SVG line charts.

Rows are layers or blocks, columns positions; each cell shows the top token of that row's lens
logits, coloured on a diverging blue-white-red scale by its logit (centred at zero, symmetric
around the largest magnitude shown), with the jet weight in brackets when weights are not all
one. A final row gives the model's top token, the lens's top token and their cosine similarity.
Nothing here needs matplotlib: the SVG is written by hand.
"""

from __future__ import annotations

import html as _html

CELL_W, CELL_H, LABEL_W, HEAD_H = 92, 26, 110, 30


def diverging_color(value: float, scale: float) -> str:
    """Blue (negative) – white (0) – red (positive), as #rrggbb; |value| ≥ scale is saturated."""
    t = 0.0 if scale <= 0 else max(-1.0, min(1.0, value / scale))
    if t >= 0:  # white → red (#b2182b)
        r, g, b = 255 + (178 - 255) * t, 255 + (24 - 255) * t, 255 + (43 - 255) * t
    else:  # white → blue (#2166ac)
        t = -t
        r, g, b = 255 + (33 - 255) * t, 255 + (102 - 255) * t, 255 + (172 - 255) * t
    return f"#{int(round(r)):02x}{int(round(g)):02x}{int(round(b)):02x}"


def _text_color(value: float, scale: float) -> str:
    return "#ffffff" if scale > 0 and abs(value) / scale > 0.6 else "#111111"


def _show(token: str) -> str:
    """A token as readable text: spaces shown as '␣', newlines as '⏎'."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _table(lens, batch: int):
    """(positions, rows, cells[r][t] = (token, logit, weight), final rows) for a picture."""
    # reduced on the lens's device; only what is drawn (R × T values) is moved, in one transfer each
    vals, ids = lens.row_logits[:, batch].max(dim=-1)  # (R, T)
    R, T = vals.shape
    vals, ids, weights = vals.float().cpu(), ids.tolist(), lens.weights[:, batch].float().tolist()
    cells = []
    for r in range(R):
        texts = lens.token_text(ids[r])
        cells.append([(texts[t], float(vals[r, t]), weights[r][t]) for t in range(T)])
    model_top = lens.token_text(lens.model_logits[batch].argmax(-1))
    if lens.kind == "joint":
        lens_top = lens.token_text(lens.logits[batch].argmax(-1))
        cos = lens.cosine[batch].tolist()
    else:  # the iterative lens's faithfulness: per position, averaged over rows
        lens_top = lens.token_text(lens.logits[-1, batch].argmax(-1))
        cos = lens.cosine[:, batch].mean(0).tolist()
    scale = float(vals.abs().max()) if vals.numel() else 1.0
    show_weights = lens.kind == "joint"
    return lens.positions(batch), list(lens.rows), cells, model_top, lens_top, cos, scale, show_weights


def _title(lens, title):
    if title:
        return title
    what = "joint jet lens" if lens.kind == "joint" else ("logit lens" if lens.k == 0 else "iterative jet lens")
    extra = f", {lens.weighting} weights" if lens.kind == "joint" else ""
    model = f" — {lens.model_name}" if lens.model_name else ""
    return f"{what}, k={lens.k}{extra} (by {lens.granularity}){model}"


def lens_html(lens, batch: int = 0, title: str | None = None) -> str:
    """A standalone HTML page: the lens table, one `<td class="cell">` per row and position."""
    positions, rows, cells, model_top, lens_top, cos, scale, show_weights = _table(lens, batch)
    e = _html.escape
    out = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{e(_title(lens, title))}</title>",
        "<style>",
        "body{font-family:system-ui,sans-serif;margin:16px;color:#111}",
        "table{border-collapse:collapse;font-size:12px}",
        "td,th{border:1px solid #ddd;padding:3px 6px;text-align:center;white-space:nowrap}",
        "th.row{text-align:right;font-weight:600;background:#f7f7f7}",
        "td.cell .w{color:inherit;opacity:.75;font-size:10px}",
        "tr.final td{border-top:2px solid #444;background:#fafafa}",
        ".legend span{display:inline-block;width:18px;height:12px}",
        "</style></head><body>",
        f"<h2>{e(_title(lens, title))}</h2>",
        f"<p>mean cosine similarity to the model's logits: {lens.mean_cosine:.4f}; "
        f"mean top-1 agreement: {lens.mean_agreement:.3f}"
        + (f"; weight loss uniform {lens.uniform_loss:.4g} → optimized {lens.optimized_loss:.4g}"
           if lens.optimized_loss is not None and lens.weighting == "optimized" else "") + "</p>",
        "<table class=\"lens\">",
        "<thead><tr><th class=\"row\">row \\ position</th>"
        + "".join(f"<th class=\"pos\">{e(_show(p))}</th>" for p in positions) + "</tr></thead><tbody>",
    ]
    for r in reversed(range(len(rows))):  # last layer on top, as in the paper
        tds = []
        for token, logit, weight in cells[r]:
            w = f" <span class=\"w\">[{weight:.2f}]</span>" if show_weights else ""
            tds.append(f"<td class=\"cell\" style=\"background:{diverging_color(logit, scale)};"
                       f"color:{_text_color(logit, scale)}\" title=\"logit {logit:.3f}\">{e(_show(token))}{w}</td>")
        out.append(f"<tr><th class=\"row\">{e(rows[r])}</th>{''.join(tds)}</tr>")
    out.append("<tr class=\"final\"><th class=\"row\">model / lens (cos)</th>" + "".join(
        f"<td class=\"final\">{e(_show(m))} / {e(_show(x))} ({c:.2f})</td>" for m, x, c in zip(model_top, lens_top, cos))
        + "</tr>")
    out.append("</tbody></table>")
    legend = "".join(f"<span style=\"background:{diverging_color(v, 1.0)}\"></span>" for v in
                     [x / 5 for x in range(-5, 6)])
    out.append(f"<p class=\"legend\">logit −{scale:.2f} {legend} +{scale:.2f}</p>")
    if lens.loss_curve and lens.weighting == "optimized":
        out.append(line_chart_svg(list(range(len(lens.loss_curve))), {"relative loss": lens.loss_curve},
                                  title="weight optimization (mean relative loss per step)", y_label="loss",
                                  width=480, height=220, x_label="step"))
    out.append("</body></html>")
    return "\n".join(out)


def lens_svg(lens, batch: int = 0, title: str | None = None) -> str:
    """The same table as an SVG picture."""
    positions, rows, cells, model_top, lens_top, cos, scale, show_weights = _table(lens, batch)
    e = _html.escape
    R, T = len(rows), len(positions)
    width = LABEL_W + T * CELL_W + 10
    height = 28 + HEAD_H + (R + 1) * CELL_H + 10
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
           f"viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">",
           f"<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>",
           f"<text x=\"6\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{e(_title(lens, title))}</text>"]
    y0 = 28
    for t, p in enumerate(positions):
        x = LABEL_W + t * CELL_W + CELL_W / 2
        out.append(f"<text x=\"{x:.1f}\" y=\"{y0 + 19}\" text-anchor=\"middle\" font-weight=\"bold\">{e(_show(p))}</text>")
    for i, r in enumerate(reversed(range(R))):
        y = y0 + HEAD_H + i * CELL_H
        out.append(f"<text x=\"{LABEL_W - 6}\" y=\"{y + 17}\" text-anchor=\"end\">{e(rows[r])}</text>")
        for t, (token, logit, weight) in enumerate(cells[r]):
            x = LABEL_W + t * CELL_W
            label = _show(token) + (f" [{weight:.2f}]" if show_weights else "")
            out.append(f"<rect class=\"cell\" x=\"{x}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" "
                       f"fill=\"{diverging_color(logit, scale)}\" stroke=\"#dddddd\"><title>logit {logit:.3f}</title></rect>")
            out.append(f"<text x=\"{x + CELL_W / 2:.1f}\" y=\"{y + 17}\" text-anchor=\"middle\" "
                       f"fill=\"{_text_color(logit, scale)}\">{e(label[:16])}</text>")
    y = y0 + HEAD_H + R * CELL_H
    out.append(f"<text x=\"{LABEL_W - 6}\" y=\"{y + 17}\" text-anchor=\"end\" font-weight=\"bold\">model/lens (cos)</text>")
    for t, (m, x_, c) in enumerate(zip(model_top, lens_top, cos)):
        x = LABEL_W + t * CELL_W
        out.append(f"<rect x=\"{x}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"#f4f4f4\" stroke=\"#444\"/>")
        out.append(f"<text x=\"{x + CELL_W / 2:.1f}\" y=\"{y + 17}\" text-anchor=\"middle\" font-size=\"10\">"
                   f"{e((_show(m)[:7] + '/' + _show(x_)[:7]))} {c:.2f}</text>")
    out.append("</svg>")
    return "\n".join(out)


PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def line_chart_svg(x_labels, series: dict, *, title: str = "", y_label: str = "", x_label: str = "layer",
                   width: int = 720, height: int = 360) -> str:
    """A simple SVG line chart: one polyline per series over the shared x positions."""
    e = _html.escape
    left, right, top, bottom = 60, 110, 34, 46
    pw, ph = width - left - right, height - top - bottom
    values = [v for s in series.values() for v in s if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max(len(x_labels), 2)

    def px(i):
        return left + pw * i / (n - 1)

    def py(v):
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
           f"viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">",
           f"<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>",
           f"<text x=\"{width / 2}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">{e(title)}</text>",
           f"<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>"]
    for j in range(5):
        v = lo + (hi - lo) * j / 4
        out.append(f"<line x1=\"{left}\" x2=\"{left + pw}\" y1=\"{py(v):.1f}\" y2=\"{py(v):.1f}\" stroke=\"#eee\"/>")
        out.append(f"<text x=\"{left - 4}\" y=\"{py(v) + 4:.1f}\" text-anchor=\"end\">{v:.3g}</text>")
    step = max(1, len(x_labels) // 12)
    for i in range(0, len(x_labels), step):
        out.append(f"<text x=\"{px(i):.1f}\" y=\"{top + ph + 14}\" text-anchor=\"middle\">{e(str(i))}</text>")
    out.append(f"<text x=\"{left + pw / 2}\" y=\"{height - 10}\" text-anchor=\"middle\">{e(x_label)}</text>")
    out.append(f"<text x=\"14\" y=\"{top + ph / 2}\" text-anchor=\"middle\" "
               f"transform=\"rotate(-90 14 {top + ph / 2})\">{e(y_label)}</text>")
    for s, (name, vals) in enumerate(series.items()):
        color = PALETTE[s % len(PALETTE)]
        pts = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(vals))
        out.append(f"<polyline class=\"series\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>")
        ly = top + 14 + 16 * s
        out.append(f"<line x1=\"{left + pw + 10}\" x2=\"{left + pw + 30}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>")
        out.append(f"<text x=\"{left + pw + 34}\" y=\"{ly + 4}\">{e(name)}</text>")
    out.append("</svg>")
    return "\n".join(out)


__all__ = ["diverging_color", "lens_html", "lens_svg", "line_chart_svg"]
