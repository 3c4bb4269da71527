"""Rich tables on stdout for ``analyze``, ``compress`` (and ``--dry-run``) and ``report``.

Progress and warnings go to stderr (progress.py); these summaries go to stdout so they can
be piped, and they reuse the report's formatters so the terminal and the files agree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..plan import LayerPlan
from . import (
    NA,
    fmt_bytes,
    fmt_change,
    fmt_count,
    fmt_energy,
    fmt_num,
    fmt_pair,
    model_totals,
    stage_table,
    summary_lines,
    totals_table,
)

_PLAN_FIELDS = {f.name for f in dataclasses.fields(LayerPlan)}


def _console(console: Console | None) -> Console:
    """Stdout console; when stdout is a file or pipe (no terminal width to follow), tables
    get 160 columns instead of rich's 80 so they stay readable in logs."""
    if console is not None:
        return console
    c = Console(highlight=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(highlight=False, width=160)
    return c


def _table(title: str | None, head: Sequence[str], rows: Sequence[Sequence[str]],
           name_width: int | None = None) -> Table:
    """First column left-aligned and never wrapped (layer names must stay greppable)."""
    t = Table(title=Text(title) if title else None, title_justify="left", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for i, h in enumerate(head):
        if i == 0:
            t.add_column(Text(h), justify="left", no_wrap=True, min_width=name_width)
        else:
            t.add_column(Text(h), justify="right", overflow="fold")  # never hide digits
    for r in rows:
        t.add_row(*(Text(c) for c in r))  # Text: names/paths with [..] are not markup
    return t


def _say(con: Console, line: str) -> None:
    con.print(line, markup=False)


def _name_width(names: Sequence[str]) -> int:
    return min(max((len(n) for n in names), default=8), 40)


def _spatial(ly: dict) -> str:
    h, w = ly.get("height"), ly.get("width")
    return NA if h is None or w is None else f"{h}×{w}"


# ------------------------------------------------------------------------ analyze
def print_analysis(res: dict, console: Console | None = None) -> None:
    """Per-layer sensitivity summary of ``analyze`` output, then model totals."""
    con = _console(console)
    budgets = res.get("budgets") or []
    thr = res.get("threshold") or {}
    head = ["layer", "c_in→c_out", "H×W", "MUL share",
            *[f"r={b} median / p90" for b in budgets],
            f"critical (L>{fmt_num(thr.get('loss'), 'g')} at r={thr.get('budget', NA)})"]
    rows, n_crit, n_all = [], 0, 0
    for ly in res.get("layers") or []:
        med, p90 = ly.get("median_loss") or [], ly.get("p90_loss") or []
        cells = [f"{fmt_num(m)} / {fmt_num(p)}" for m, p in zip(med, p90)]
        cells += [NA] * (len(budgets) - len(cells))
        rows.append([ly["name"], f"{ly.get('c_in')}→{ly.get('c_out')}", _spatial(ly),
                     fmt_num(ly.get("mul_share"), ".1%"), *cells,
                     f"{ly.get('critical_at_threshold', NA)} / {ly.get('c_out')}"])
        n_crit += ly.get("critical_at_threshold") or 0
        n_all += ly.get("c_out") or 0
    model = res.get("model") or {}
    title = f"sensitivity of {model.get('source', 'model')} ({model.get('arch', NA)}, " \
            f"{model.get('resolution', NA)} px)"
    con.print(_table(title, head, rows, _name_width([r[0] for r in rows])))
    tot = res.get("totals") or {}
    _say(con, f"model: {fmt_count(tot.get('muls'))} MULs, {fmt_count(tot.get('adds'))} ADDs, "
          f"{fmt_count(tot.get('params'))} parameters, {fmt_energy(tot.get('energy_pj'))}")
    _say(con, f"pointwise layers hold {fmt_num(res.get('pointwise_mul_share'), '.1%')} of the "
          f"MULs; {n_crit} of {n_all} filters critical at the threshold")
    if not res.get("activation_aware", True):
        _say(con, "note: no calibration data, losses are weight-space (Σ = I)")


# ------------------------------------------------------------------------ plan
def _layer_plan(d: dict) -> LayerPlan:
    return LayerPlan(**{k: v for k, v in d.items() if k in _PLAN_FIELDS})


def print_plan(plan: dict, console: Console | None = None) -> None:
    """Per-layer split and predicted costs of a plan, totals vs the original and budget."""
    con = _console(console)
    lps = [_layer_plan(d) for d in plan.get("layers") or []]
    head = ["layer", "c_in→c_out", "critical", "tolerant", "r", "MULs dense → planned",
            "ADDs dense → planned", "pred. err"]
    rows = []
    for lp in lps:
        dense_m, dense_a = lp.pixels * lp.c_in * lp.c_out, lp.pixels * lp.c_out * (lp.c_in - 1)
        rows.append([lp.name, f"{lp.c_in}→{lp.c_out}", str(lp.n_critical), str(lp.n_tolerant),
                     str(lp.r), fmt_pair(fmt_count(dense_m), fmt_count(lp.predicted_muls())),
                     fmt_pair(fmt_count(dense_a), fmt_count(lp.predicted_adds())),
                     fmt_num(lp.predicted_err)])
    title = f"plan ({plan.get('method', NA)})"
    con.print(_table(title, head, rows, _name_width([lp.name for lp in lps])))
    for line in plan_totals_lines(plan, lps):
        _say(con, line)


def _densities(lps: list[LayerPlan]) -> str:
    """The W_b densities the planner priced the banks' ADDs with (each layer its own)."""
    d = [lp.density for lp in lps if lp.n_tolerant and lp.r]
    if not d:
        return "no ternary bank"
    if max(d) - min(d) < 5e-4:
        return f"W_b density {d[0]:.3f}"
    return (f"per-layer W_b densities (mean {sum(d) / len(d):.3f}, "
            f"{min(d):.3f}–{max(d):.3f})")


def plan_totals_lines(plan: dict, lps: list[LayerPlan]) -> list[str]:
    """Whole-model MULs/ADDs the plan predicts, against the original and the budget."""
    o_m, o_a = plan.get("original_muls") or 0, plan.get("original_adds") or 0
    muls = plan.get("fixed_muls", 0) + sum(lp.predicted_muls() for lp in lps)
    dense_pw_adds = sum(lp.pixels * lp.c_out * (lp.c_in - 1) for lp in lps)
    adds = o_a - dense_pw_adds + sum(lp.predicted_adds() for lp in lps)
    out = [f"MULs: {fmt_count(o_m)} → {fmt_count(muls)} "
           f"({fmt_change(muls / o_m - 1) if o_m else NA})"
           + (f", budget {plan['budget']:.1%} = {fmt_count(plan['budget'] * o_m)}"
              if plan.get("budget") is not None and o_m else ""),
           f"ADDs: {fmt_count(o_a)} → {fmt_count(adds)} "
           f"({fmt_change(adds / o_a - 1) if o_a else NA}; predicted with "
           f"{_densities(lps)}, real counts come from the fitted non-zeros)"]
    out += [f"note: {n}" for n in plan.get("notes") or []]
    return out


# ------------------------------------------------------------------------ compress
def print_compress(meta: dict, timings: dict, out_path: str,
                   console: Console | None = None) -> None:
    """Agreement after each stage, totals before → after, and where the model went."""
    con = _console(console)
    rep = {"stages": meta.get("stages") or [], "totals": model_totals(meta)}
    if rep["stages"]:
        con.print(_table("agreement (held-apart images)",
                         *stage_table(rep)))
    con.print(_table("totals (one inference)", *totals_table(rep)))
    secs = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in (timings or {}).items()
                     if isinstance(v, (int, float)))
    if secs:
        _say(con, f"time: {secs}")
    _say(con, f"final agreement {fmt_num(meta.get('final_agreement'), '.4f')}; "
              f"wrote {out_path}")


# ------------------------------------------------------------------------ report
def print_report(rep: dict, console: Console | None = None) -> None:
    """The per-layer rows and totals of :func:`hfbconvert.report.build_report`."""
    con = _console(console)
    for line in summary_lines(rep):
        _say(con, line)
    head, rows = report_rows(rep, "→" if con.width >= 120 else " → ")
    con.print(_table("per layer (before→after)", head, rows,
                     _name_width([r["name"] for r in rep.get("layers") or []])))
    con.print(_table("totals (one inference)", *totals_table(rep)))
    if rep.get("stages"):
        con.print(_table("agreement per stage", *stage_table(rep)))


def _short_bytes(b: float | None) -> str:
    return fmt_bytes(b).replace(" ", "")


def report_rows(rep: dict, sep: str = "→") -> tuple[list[str], list[list[str]]]:
    """A narrower per-layer table than the files' (no energy: it is in the totals).

    ``sep`` " → " lets a narrow terminal wrap a before/after pair at the arrow."""

    def _arrow(fmt, b: dict, a: dict, key: str) -> str:
        return f"{fmt(b.get(key))}{sep}{fmt(a.get(key))}"

    head = ["layer", "c_in→c_out", "crit/tol/r", "MULs", "ADDs", "bytes", "loss pre→post FT",
            "output err"]
    rows = []
    for r in rep.get("layers") or []:
        b, a = r.get("before") or {}, r.get("after") or {}
        rows.append([r["name"], f"{r.get('c_in')}→{r.get('c_out')}",
                     "/".join(fmt_num(r.get(k), "d") for k in ("critical", "tolerant", "r")),
                     _arrow(fmt_count, b, a, "muls"), _arrow(fmt_count, b, a, "adds"),
                     _arrow(_short_bytes, b, a, "bytes"),
                     f"{fmt_num(r.get('bank_loss_before_ft'))}{sep}"
                     f"{fmt_num(r.get('bank_loss_after_ft'))}",
                     fmt_num(r.get("output_rel_err"))])
    other = rep.get("other_layers") or {}
    if other.get("count"):
        b, a = other["before"], other["after"]
        rows.append([f"other ({other['count']})", "", "", _arrow(fmt_count, b, a, "muls"),
                     _arrow(fmt_count, b, a, "adds"), _arrow(_short_bytes, b, a, "bytes"), "", ""])
    return head, rows
