"""The report as GitHub-flavoured Markdown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .tables import (
    convention_lines,
    held_curve_table,
    layer_table,
    stage_table,
    summary_lines,
    totals_table,
)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(rep: dict) -> str:
    """GitHub-flavoured Markdown: summary, totals, per-layer table, stages, conventions."""
    parts = ["# hfbconvert compression report", "",
             *[f"- {s}" for s in summary_lines(rep)], "",
             "## Totals (one inference)", "", _md_table(*totals_table(rep)), "",
             "## Per layer (before → after)", "", _md_table(*layer_table(rep)), ""]
    if rep.get("stages"):
        parts += ["## Agreement per stage (held-apart images)", "",
                  _md_table(*stage_table(rep)), ""]
    if rep.get("held_curve"):
        parts += [f"## Fine-tune curve (held-apart images, {rep['held_curve']['source']})", "",
                  _md_table(*held_curve_table(rep)), ""]
    parts += ["## Conventions", "", *[f"- {s}" for s in convention_lines(rep)], "",
              "Error columns:", "",
              *[f"- **{k}**: {v}" for k, v in (rep.get("conventions") or {})
                .get("errors", {}).items()], ""]
    if rep.get("plan_notes"):
        parts += ["## Planner notes", "", *[f"- {n}" for n in rep["plan_notes"]], ""]
    if rep.get("hardware"):
        from ..hw.report import markdown as hw_markdown

        parts += ["## Hardware (accelerator model)", "", hw_markdown(rep["hardware"]), ""]
    if rep.get("versions"):
        parts += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in rep["versions"].items()),
                  ""]
    return "\n".join(parts)
