"""The report as one self-contained HTML page (inline CSS, base64 PNG plots, no scripts)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from .plots import plot_finetune, plot_layer_costs, plot_sensitivity, plot_stages
from .tables import convention_lines, layer_table, stage_table, summary_lines, totals_table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;white-space:nowrap}
th{background:#f4f6f8;text-align:right;white-space:normal;vertical-align:bottom}th:first-child,td:first-child{text-align:left}
td{text-align:right;font-variant-numeric:tabular-nums}
tr.other td{font-style:italic;color:#666}
.scroll{overflow-x:auto}img{max-width:100%;height:auto}
ul.facts{padding-left:1.2em}small{color:#666}
"""


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], tid: str,
                last_row_class: str | None = None) -> str:
    e = html.escape
    out = [f'<div class="scroll"><table id="{tid}"><thead><tr>'
           + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{last_row_class}"' if last_row_class and i == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p><small>{html.escape(alt)}: no data in this model's metadata.</small></p>"
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(rep: dict) -> str:
    """One self-contained page: inline CSS, tables, plots as base64 PNG, no scripts."""
    e = html.escape
    lh, lr = layer_table(rep)
    has_other = bool((rep.get("other_layers") or {}).get("count"))
    conv = rep.get("conventions") or {}
    body = [
        "<h1>hfbconvert compression report</h1>",
        '<ul class="facts">' + "".join(f"<li>{e(s)}</li>" for s in summary_lines(rep)) + "</ul>",
        "<h2>Totals (one inference)</h2>", _html_table(*totals_table(rep), "totals"),
        "<h2>Per layer (before → after)</h2>",
        _html_table(lh, lr, "layers", "other" if has_other else None),
        "<h2>Cost per layer</h2>", _img(plot_layer_costs(rep), "MULs, ADDs, bytes per layer"),
        "<h2>Sensitivity</h2>", _img(plot_sensitivity(rep), "median loss vs hidden units"),
        "<h2>Agreement per stage (held-apart images)</h2>",
    ]
    if rep.get("stages"):
        body.append(_html_table(*stage_table(rep), "stages"))
    body.append(_img(plot_stages(rep), "agreement per stage"))
    ft = plot_finetune(rep)
    if ft is not None:
        body += ["<h2>Fine-tuning</h2>", _img(ft, "fine-tuning loss and agreement")]
    if rep.get("hardware"):
        from ..hw.report import html_section

        body.append(html_section(rep["hardware"]))
    body += ["<h2>Conventions</h2>",
             "<ul>" + "".join(f"<li>{e(s)}</li>" for s in convention_lines(rep)) + "</ul>",
             "<ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>"
                              for k, v in conv.get("errors", {}).items()) + "</ul>"]
    if rep.get("plan_notes"):
        body += ["<h2>Planner notes</h2>",
                 "<ul>" + "".join(f"<li>{e(n)}</li>" for n in rep["plan_notes"]) + "</ul>"]
    if rep.get("versions"):
        body.append("<p><small>" + e(", ".join(f"{k} {v}" for k, v in rep["versions"].items()))
                    + "</small></p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>hfbconvert report</title><style>" + CSS + "</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
