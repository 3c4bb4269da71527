"""Compression report: one dict (:func:`build_report`) rendered as JSON, Markdown and HTML.

All three files come from the same dict so they cannot disagree, and their bytes are a
pure function of the metadata (no timestamps, PNG metadata stripped) so a rerun diffs
clean. Every key of the metadata except the plan is optional: a missing figure is shown
as "n/a" rather than failing a report of an otherwise finished compression.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_write_text
from ..models.info import ModelInfo
from .formatting import (
    COST_KEYS,
    COST_LABELS,
    FORMATTERS,
    NA,
    WEIGHT_STORAGE,
    fmt_bytes,
    fmt_change,
    fmt_count,
    fmt_energy,
    fmt_num,
    fmt_pair,
)
from .html import render_html
from .markdown import render_markdown
from .model import ERROR_DEFINITIONS, SCHEMA_VERSION, build_report, model_totals
from .plots import plot_finetune, plot_layer_costs, plot_sensitivity, plot_stages
from .tables import convention_lines, layer_table, stage_table, summary_lines, totals_table

__all__ = [
    "COST_KEYS", "COST_LABELS", "ERROR_DEFINITIONS", "FORMATTERS", "NA", "SCHEMA_VERSION",
    "WEIGHT_STORAGE", "build_report", "convention_lines", "export_report_stem", "fmt_bytes",
    "fmt_change", "fmt_count", "fmt_energy", "fmt_num", "fmt_pair", "layer_table",
    "model_totals", "report_paths",
    "plot_finetune", "plot_layer_costs", "plot_sensitivity", "plot_stages", "render_html",
    "render_markdown", "stage_table", "summary_lines", "totals_table", "write_reports",
]


REPORT_EXTS = ("json", "md", "html")


def report_paths(out_dir: Path, stem: str = "report") -> list[Path]:
    """The files :func:`write_reports` writes: STEM.json, STEM.md and STEM.html."""
    return [Path(out_dir) / f"{stem}.{ext}" for ext in REPORT_EXTS]


def export_report_stem(onnx_path: Path) -> str:
    """Reports next to an exported ONNX file are named after it (``m.onnx`` ->
    ``m.report.json``): two models exported into one folder keep one report each."""
    return f"{Path(onnx_path).stem}.report"


def write_reports(meta: dict, info: ModelInfo | None, out_dir: Path,
                  export: dict | None = None, overwrite: bool = True,
                  hardware: dict | None = None, stem: str = "report") -> list[Path]:
    """Write STEM.json, STEM.md and STEM.html into ``out_dir`` (each atomically;
    ``overwrite`` False refuses a file that exists at the rename)."""
    rep = build_report(meta, info, export, hardware)
    text = json.dumps(rep, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    j, md, html = report_paths(out_dir, stem)
    return [atomic_write_text(j, text, overwrite),
            atomic_write_text(md, render_markdown(rep), overwrite),
            atomic_write_text(html, render_html(rep), overwrite)]
