"""Compression report: one dict (:func:`build_report`) rendered as JSON, Markdown and HTML.

All three files come from the same dict so they cannot disagree, and their bytes are a
pure function of the metadata (no timestamps, PNG metadata stripped) so a rerun diffs
clean. Every key of the metadata except the plan is optional: a missing figure is shown
as "n/a" rather than failing a report of an otherwise finished compression.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import costs
from ..fileio import atomic_write_text
from ..models.info import ModelInfo

SCHEMA_VERSION = 1
NA = "n/a"
COST_KEYS = ("muls", "adds", "params", "bytes", "energy_pj", "energy_with_weight_reads_pj")
ERROR_DEFINITIONS = {
    "predicted_err": "planner's estimate: share of the layer's output energy (Σ metric) "
                     "lost by its tolerant filters, from the sensitivity curves",
    "bank_loss": "relative loss of the tolerant bank against the original rows in the Σ "
                 "metric of the original layer input, before and after fine-tuning",
    "output_rel_err": "‖y_hybrid − y_original‖² / ‖y_original‖² at the layer output, end to "
                      "end on held-apart images (errors of earlier layers included)",
}


# ------------------------------------------------------------------------ formatting
def fmt_count(n: float | None) -> str:
    """Operation/parameter counts with k/M/G suffixes (tables stay narrow)."""
    if n is None:
        return NA
    a = abs(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.0f}"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return NA
    for div, suf in ((2**20, "MiB"), (2**10, "KiB")):
        if abs(b) >= div:
            return f"{b / div:.3g} {suf}"
    return f"{b:.0f} B"


def fmt_energy(pj: float | None) -> str:
    """Picojoules scaled to pJ/nJ/µJ/mJ."""
    if pj is None:
        return NA
    for div, suf in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if abs(pj) >= div:
            return f"{pj / div:.3g} {suf}"
    return f"{pj:.3g} pJ"


def fmt_change(rel: float | None) -> str:
    """Relative change (after/before − 1) as a signed percentage."""
    if rel is None:
        return NA
    return f"{rel * 100:+.1f}%"


def fmt_num(x: float | None, spec: str = ".3g") -> str:
    return NA if x is None else format(x, spec)


def fmt_pair(before: str, after: str) -> str:
    return f"{before} → {after}"


WEIGHT_STORAGE = {32: "float32", 16: "float16",
                  8: "int8 (per output channel, one fp32 scale each)"}
FORMATTERS = {"muls": fmt_count, "adds": fmt_count, "params": fmt_count, "bytes": fmt_bytes,
              "energy_pj": fmt_energy, "energy_with_weight_reads_pj": fmt_energy}
COST_LABELS = {"muls": "MULs", "adds": "ADDs", "params": "parameters", "bytes": "weight bytes",
               "energy_pj": "energy (arithmetic)",
               "energy_with_weight_reads_pj": "energy (+ weight reads)"}


# ------------------------------------------------------------------------ build
def _finite(x: Any) -> float | None:
    """A float, or None for missing/NaN/inf (JSON has no NaN; tables show n/a)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    """Recursively replace non-finite floats by None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _rel(after: float | None, before: float | None) -> float | None:
    if after is None or not before:
        return None
    return after / before - 1


def _energy(muls: float, adds: float, fp_bits: int, consts: dict) -> float:
    """Arithmetic energy of one layer, as ``LayerCost.energy_pj`` computes it."""
    p = "fp32" if fp_bits == 32 else "fp16"
    return muls * consts[f"{p}_mul"] + adds * consts[f"{p}_add"]


def _cost_cell(c: dict | None, fp_bits: int, consts: dict) -> dict | None:
    if not c:
        return None
    return {"muls": c.get("muls"), "adds": c.get("adds"), "params": c.get("params"),
            "bytes": c.get("bytes"),
            "energy_pj": _energy(c.get("muls", 0), c.get("adds", 0), fp_bits, consts)}


def _median_curve(per_filter: Sequence[Sequence[float]] | None) -> list[float] | None:
    """Median L_j(r) over filters for each budget (what the sensitivity plot shows)."""
    if not per_filter:
        return None
    import numpy as np

    return [float(v) for v in np.median(np.asarray(per_filter, dtype=float), axis=0)]


def _pointwise_layers(meta: dict) -> list[dict]:
    """Layer list from meta["layers"], falling back to the plan when it is absent."""
    if meta.get("layers"):
        return list(meta["layers"])
    return [{"name": lp["name"], "kind": None, "c_in": lp.get("c_in"), "c_out": lp.get("c_out"),
             "height": None, "width": None} for lp in (meta.get("plan") or {}).get("layers", [])]


def _split_counts(ly: dict, after: dict | None, lp: dict | None) -> dict:
    """Critical/tolerant/r from the built layer (truth), else from the plan."""
    ex = (after or {}).get("extra") or {}
    if (after or {}).get("kind") == "hybrid" and ex:
        return {"critical": ex.get("critical"), "tolerant": ex.get("tolerant"), "r": ex.get("r"),
                "nnz_wb": ex.get("nnz_wb"), "nnz_wc": ex.get("nnz_wc")}
    if lp:
        c_out = lp.get("c_out") or ly.get("c_out") or 0
        return {"critical": lp.get("n_critical"), "tolerant": c_out - lp.get("n_critical", 0),
                "r": lp.get("r"), "nnz_wb": None, "nnz_wc": None}
    return {"critical": ly.get("c_out"), "tolerant": 0, "r": 0, "nnz_wb": None, "nnz_wc": None}


def _layer_row(ly: dict, meta: dict, before: dict | None, after: dict | None,
               lp: dict | None, fp_bits: int, consts: dict) -> dict:
    name = ly["name"]
    errs = (meta.get("layer_errors") or {}).get(name) or {}
    recon = (meta.get("reconstruction") or {}).get(name) or {}
    row = {"name": name, "kind": ly.get("kind"), "c_in": ly.get("c_in"), "c_out": ly.get("c_out"),
           "height": ly.get("height"), "width": ly.get("width")}
    row.update(_split_counts(ly, after, lp))
    row["before"] = _cost_cell(before, fp_bits, consts)
    row["after"] = _cost_cell(after, fp_bits, consts)
    row["predicted_err"] = _finite((lp or {}).get("predicted_err"))
    row["fragility"] = _finite((meta.get("fragility") or {}).get(name))
    recon = recon if isinstance(recon, dict) else {}
    row["reconstruction_rel_err"] = _finite(recon.get("rel_err"))
    row["reconstruction_tolerant_rel_err"] = _finite(recon.get("tolerant_rel_err"))
    row["bank_loss_before_ft"] = _finite(errs.get("bank_loss_before_ft"))
    row["bank_loss_after_ft"] = _finite(errs.get("bank_loss_after_ft"))
    row["output_rel_err"] = _finite(errs.get("output_rel_err"))
    row["median_loss"] = _median_curve((meta.get("sensitivity") or {}).get(name))
    row["weight_bits"] = ((after or {}).get("extra") or {}).get("weight_bits")
    return row


def _other_layers(names: set[str], before: list[dict], after: list[dict], fp_bits: int,
                  consts: dict) -> dict:
    """Stem, depthwise etc.: not converted, summed so per-layer rows add up to totals."""
    def total(rows: list[dict]) -> dict:
        keep = [r for r in rows if r.get("name") not in names]
        s = {k: sum(r.get(k, 0) for r in keep) for k in ("muls", "adds", "params", "bytes")}
        s["energy_pj"] = _energy(s["muls"], s["adds"], fp_bits, consts)
        return s

    rest = [r for r in before if r.get("name") not in names]
    return {"count": len(rest), "kinds": sorted({r.get("kind", "?") for r in rest}),
            "before": total(before), "after": total(after)}


def model_totals(meta: dict) -> dict:
    """Original vs compressed whole-model totals, relative change, baselines, budget use."""
    orig = (meta.get("original_cost") or {}).get("totals") or {}
    comp = (meta.get("cost") or {}).get("totals") or {}
    out: dict[str, Any] = {
        "original": {k: orig.get(k) for k in COST_KEYS},
        "compressed": {k: comp.get(k) for k in COST_KEYS},
        "change": {k: _rel(comp.get(k), orig.get(k)) for k in COST_KEYS},
        "baselines": {},
    }
    for name, tot in sorted((meta.get("baselines") or {}).items()):
        tot = tot.get("totals", tot) if isinstance(tot, dict) else {}
        out["baselines"][name] = {k: tot.get(k) for k in COST_KEYS}
    plan = meta.get("plan") or {}
    cfg = meta.get("config") or {}
    out["budget"] = {
        "mul_budget": plan.get("budget"),
        "mul_fraction_used": None if comp.get("muls") is None or not orig.get("muls")
        else comp["muls"] / orig["muls"],
        "max_add_increase": cfg.get("max_add_increase"),
        "add_increase": _rel(comp.get("adds"), orig.get("adds")),
        "size_budget": cfg.get("size_budget"),
        "size_fraction_used": _frac(comp.get("bytes"), orig.get("bytes")),
        "energy_budget": cfg.get("energy_budget"),
        "energy_fraction_used": _frac(comp.get("energy_pj"), _same_bits_energy(orig, comp)),
    }
    return out


def _frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _same_bits_energy(orig: dict, comp: dict) -> float | None:
    """The original's arithmetic energy at the compressed model's activation bits (what
    ``--energy-budget`` is a fraction of), priced by the cost model itself."""
    if comp.get("activation_bits") != 8:
        return orig.get("energy_pj")
    if orig.get("muls") is None or orig.get("adds") is None:
        return None
    return costs.LayerCost("original", "dense", orig["muls"], orig["adds"], 0, 0.0
                           ).energy_pj(act_bits=8)


def _conventions(meta: dict) -> dict:
    """Counting rules quoted from the cost model itself, so the report cannot drift."""
    tot = (meta.get("cost") or {}).get("totals") or (meta.get("original_cost") or {}).get(
        "totals") or {}
    return {
        "counting": _doc_bullets(costs.__doc__ or ""),
        "fp_bits": tot.get("fp_bits", 32),
        "weight_bits": tot.get("weight_bits", meta.get("weight_bits", tot.get("fp_bits", 32))),
        "energy_constants_pj": dict(tot.get("energy_constants") or costs.ENERGY_PJ),
        "energy_source": tot.get("energy_source") or costs.ENERGY_SOURCE,
        "per_layer_energy": "MULs·E_mul + ADDs·E_add at fp_bits (arithmetic only); the total "
                            "'with weight reads' adds one DRAM read per 32-bit word of weights",
        "errors": dict(ERROR_DEFINITIONS),
    }


def _doc_bullets(doc: str) -> list[str]:
    """The '- ' bullet points of a docstring, continuation lines joined."""
    out: list[str] = []
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith("- "):
            out.append(s[2:])
        elif s and out and line.startswith("  "):
            out[-1] += " " + s
        elif not s and out:
            break
    return [re.sub(r"``([^`]*)``", r"\1", b) for b in out]


def _model(meta: dict, info: ModelInfo | None) -> dict:
    return {"source": meta.get("source_model") or getattr(info, "source", None),
            "arch": getattr(info, "arch", None), "resolution": getattr(info, "resolution", None),
            "num_classes": getattr(info, "num_classes", None)}


def _finetune(meta: dict) -> dict | None:
    log = meta.get("finetune_log") or {}
    if not log.get("steps"):
        return None
    return {"steps": list(log["steps"]), "loss": list(log.get("loss") or []),
            "agreement": list(log.get("agreement") or [])}


def _export(export: dict | None) -> dict | None:
    if not export:
        return None
    ex = export.get("export") or {}
    ver = export.get("verify") or {}
    return {"output": export.get("output"), "bytes": ex.get("bytes"),
            "sha256": ex.get("sha256"), "packed_bytes": ex.get("packed_bytes"),
            "opset": ex.get("opset"),
            "custom_ops": ex.get("custom_ops"), "weight_bits": ex.get("weight_bits"),
            "verify": None if not ver else {
                "passed": ver.get("passed"), "max_rel_diff": _finite(ver.get("max_rel_diff")),
                "agreement": _finite(ver.get("agreement"))}}


def build_report(meta: dict, info: ModelInfo | None, export: dict | None = None,
                 hardware: dict | None = None) -> dict:
    """Per-layer rows, totals and conventions of one compression, as plain JSON data;
    ``hardware``: an ``hfbconvert hw`` JSON report to include (``report --hw``)."""
    conv = _conventions(meta)
    fp_bits, consts = conv["fp_bits"], conv["energy_constants_pj"]
    before = (meta.get("original_cost") or {}).get("layers") or []
    after = (meta.get("cost") or {}).get("layers") or []
    b_by, a_by = {c["name"]: c for c in before}, {c["name"]: c for c in after}
    plan = meta.get("plan") or {}
    p_by = {lp["name"]: lp for lp in plan.get("layers", [])}
    layers = _pointwise_layers(meta)
    rows = [_layer_row(ly, meta, b_by.get(ly["name"]), a_by.get(ly["name"]),
                       p_by.get(ly["name"]), fp_bits, consts) for ly in layers]
    names = {ly["name"] for ly in layers}
    calib = meta.get("calibration")
    extra = {"hardware": hardware} if hardware is not None else {}
    return _clean({
        **extra,
        "schema_version": SCHEMA_VERSION,
        "kind": "hfb_report",
        "model": _model(meta, info),
        "method": plan.get("method") or (meta.get("config") or {}).get("method"),
        "calibration": dict(calib) if calib else None,
        "budgets": list(meta.get("budgets") or []),
        "layers": rows,
        "other_layers": _other_layers(names, before, after, fp_bits, consts),
        "totals": model_totals(meta),
        "stages": [dict(s) for s in meta.get("stages") or []],
        "final_agreement": _finite(meta.get("final_agreement")),
        "finetune": _finetune(meta),
        "export": _export(export),
        "plan_notes": list(plan.get("notes") or []),
        "conventions": conv,
        "config": meta.get("config"),
        "versions": meta.get("versions"),
    })


# ------------------------------------------------------------------------ table content
def layer_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the per-layer table (shared by Markdown, HTML, terminal)."""
    head = ["layer", "c_in→c_out", "crit / tol", "r", "MULs", "ADDs", "bytes", "FP weight bits",
            "energy", "pred. err", "bank loss pre → post FT", "output err"]
    rows = []
    for r in rep.get("layers", []):
        b, a = r.get("before") or {}, r.get("after") or {}

        def pair(key: str, fmt, b=b, a=a) -> str:
            return fmt_pair(fmt(b.get(key)), fmt(a.get(key)))

        rows.append([
            r["name"], f"{r.get('c_in', '?')}→{r.get('c_out', '?')}",
            f"{fmt_num(r.get('critical'), 'd')} / {fmt_num(r.get('tolerant'), 'd')}",
            fmt_num(r.get("r"), "d"), pair("muls", fmt_count), pair("adds", fmt_count),
            pair("bytes", fmt_bytes), fmt_num(r.get("weight_bits"), "d"),
            pair("energy_pj", fmt_energy), fmt_num(r.get("predicted_err")),
            fmt_pair(fmt_num(r.get("bank_loss_before_ft")), fmt_num(r.get("bank_loss_after_ft"))),
            fmt_num(r.get("output_rel_err")),
        ])
    other = rep.get("other_layers") or {}
    if other.get("count"):
        b, a = other["before"], other["after"]
        kinds = ", ".join(other.get("kinds") or [])
        rows.append([f"other ({other['count']} layers: {kinds})", "", "", "",
                     fmt_pair(fmt_count(b["muls"]), fmt_count(a["muls"])),
                     fmt_pair(fmt_count(b["adds"]), fmt_count(a["adds"])),
                     fmt_pair(fmt_bytes(b["bytes"]), fmt_bytes(a["bytes"])),
                     fmt_num((rep.get("conventions") or {}).get("weight_bits"), "d"),
                     fmt_pair(fmt_energy(b["energy_pj"]), fmt_energy(a["energy_pj"])),
                     "", "", ""])
    return head, rows


def totals_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    """Whole-model totals: original, compressed, change, then any baselines."""
    t = rep.get("totals") or {}
    base = t.get("baselines") or {}
    head = ["", "original", "hybrid (this model)", "change", *base]
    rows = []
    for k in COST_KEYS:
        f = FORMATTERS[k]
        rows.append([COST_LABELS[k], f((t.get("original") or {}).get(k)),
                     f((t.get("compressed") or {}).get(k)), fmt_change((t.get("change") or {})
                                                                     .get(k)),
                     *[f(v.get(k)) for v in base.values()]])
    return head, rows


def stage_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[str(s.get("stage")), fmt_num(_finite(s.get("agreement")), ".4f"),
             fmt_num(_finite(s.get("seconds")), ".1f")] for s in rep.get("stages") or []]
    return ["stage", "top-1 agreement", "seconds"], rows


def summary_lines(rep: dict) -> list[str]:
    """One-line facts above the tables (model, method, budget, calibration, export)."""
    m, t = rep.get("model") or {}, rep.get("totals") or {}
    bud = t.get("budget") or {}
    out = [f"model: {m.get('source') or NA} ({m.get('arch') or NA}, "
           f"{m.get('resolution') or NA} px, {m.get('num_classes') or NA} classes)",
           f"method: {rep.get('method') or NA}"]
    used, mb = bud.get("mul_fraction_used"), bud.get("mul_budget")
    if mb is not None:
        over = used is not None and used > mb + 1e-9
        out.append(f"MUL budget {mb:.1%} of the original, used {fmt_num(used, '.1%')}"
                   + (" (OVER BUDGET)" if over else ""))
    inc, lim = bud.get("add_increase"), bud.get("max_add_increase")
    if inc is not None:
        over = lim is not None and inc > lim + 1e-9
        out.append(f"ADDs {fmt_change(inc)} vs the original"
                   + (f" (allowed {fmt_change(lim)}{', OVER THE LIMIT' if over else ''})"
                      if lim is not None else ""))
    for key, what in (("size", "stored bytes, of the float32 weights"),
                      ("energy", "arithmetic energy, of the original's at the same bits")):
        cap, used = bud.get(f"{key}_budget"), bud.get(f"{key}_fraction_used")
        if cap is not None:
            over = used is not None and used > cap + 1e-9
            out.append(f"{key} budget {cap:.1%} ({what}), used {fmt_num(used, '.1%')}"
                       + (" (OVER BUDGET)" if over else ""))
    cal = rep.get("calibration")
    out.append("calibration: " + (f"{cal.get('n_images', NA)} images from "
                                  f"{cal.get('source', NA)}, {cal.get('held_images', NA)} held "
                                  "apart for agreement" if cal else "none (weight-space fit)"))
    out.append(f"final top-1 agreement with the original: "
               f"{fmt_num(rep.get('final_agreement'), '.4f')}")
    wb = (rep.get("conventions") or {}).get("weight_bits")
    if wb is not None:
        out.append(f"full-precision weights stored at {WEIGHT_STORAGE.get(wb, f'{wb} bits')}; "
                   "ternary banks at 2 bits; biases, BatchNorm and scales a at fp32")
    ex = rep.get("export")
    if ex:
        v = ex.get("verify") or {}
        out.append(f"export: {ex.get('output') or NA} ({fmt_bytes(ex.get('bytes'))})"
                   + (f", verify {'PASS' if v.get('passed') else 'FAIL'}, max rel diff "
                      f"{fmt_num(v.get('max_rel_diff'), '.2e')}, agreement "
                      f"{fmt_num(v.get('agreement'), '.4f')}" if v else ""))
    return out


def convention_lines(rep: dict) -> list[str]:
    c = rep.get("conventions") or {}
    consts = ", ".join(f"{k} {v:g} pJ" for k, v in (c.get("energy_constants_pj") or {}).items())
    return [*c.get("counting", []),
            f"Per-layer energy: {c.get('per_layer_energy', NA)}; fp_bits = {c.get('fp_bits')}.",
            f"Energy constants ({c.get('energy_source', NA)}): {consts}."]


# ------------------------------------------------------------------------ markdown
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


# ------------------------------------------------------------------------ plots
BEFORE_COLOR, AFTER_COLOR = "#a0a0a0", "#2a6fb0"


def _png(fig) -> bytes:
    """PNG bytes with no Software/date chunks, so equal figures give equal files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(w: float, h: float, rows: int = 1):
    from matplotlib.figure import Figure  # lazy: the CLI's other commands stay fast

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


def plot_sensitivity(rep: dict) -> bytes | None:
    """Median L_j(r) vs r per layer (log y): how fast each layer's filters become cheap."""
    bud = rep.get("budgets") or []
    rows = [r for r in rep.get("layers", []) if r.get("median_loss")]
    if not bud or not rows:
        return None
    from matplotlib import cm, colormaps, colors

    fig, (ax,) = _figure(8, 4.2)
    cmap = colormaps["viridis"]
    norm = colors.Normalize(0, max(len(rows) - 1, 1))
    for i, r in enumerate(rows):
        pts = [(b, v) for b, v in zip(bud, r["median_loss"]) if v is not None and v > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=cmap(norm(i)), label=r["name"])
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bud, [str(b) for b in bud])
    ax.set_xlabel("hidden units per tolerant filter r")
    ax.set_ylabel("median filter loss L(r)")
    ax.grid(True, which="both", alpha=0.3)
    if len(rows) <= 10:
        ax.legend(fontsize=7, ncols=2)
    else:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, label="layer index (input → output)")
    return _png(fig)


def plot_layer_costs(rep: dict) -> bytes | None:
    """MULs, ADDs and bytes per layer, original vs hybrid (grouped bars)."""
    rows = [r for r in rep.get("layers", []) if r.get("before") and r.get("after")]
    if not rows:
        return None
    import numpy as np
    from matplotlib.ticker import EngFormatter

    fig, axes = _figure(min(14, max(8, 0.22 * len(rows) + 2)), 8.5, rows=3)
    x = np.arange(len(rows))
    labels = ("MULs", "ADDs", "weight bytes (log)")
    for ax, key, label in zip(axes, ("muls", "adds", "bytes"), labels):
        ax.bar(x - 0.2, [r["before"][key] for r in rows], 0.4, color=BEFORE_COLOR,
               label="original")
        ax.bar(x + 0.2, [r["after"][key] for r in rows], 0.4, color=AFTER_COLOR, label="hybrid")
        ax.set_ylabel(label)
        if key == "bytes":  # spans ~3 decades across a MobileNet: linear hides early layers
            ax.set_yscale("log")
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xticks(x, [] if ax is not axes[-1] else [r["name"] for r in rows],
                      rotation=90, fontsize=7 if len(rows) <= 30 else 6)
        ax.set_xlim(-0.7, len(rows) - 0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_stages(rep: dict) -> bytes | None:
    """Top-1 agreement with the original after each pipeline stage."""
    st = [(str(s.get("stage")), _finite(s.get("agreement"))) for s in rep.get("stages") or []]
    st = [(n, a) for n, a in st if a is not None]
    if not st:
        return None
    fig, (ax,) = _figure(max(4.5, 1.3 * len(st) + 1.5), 3.2)
    names, vals = zip(*st)
    bars = ax.bar(range(len(st)), vals, 0.6, color=AFTER_COLOR)
    ax.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(range(len(st)), names)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("top-1 agreement")
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def plot_finetune(rep: dict) -> bytes | None:
    """Distillation loss and running agreement during fine-tuning."""
    ft = rep.get("finetune")
    if not ft or not ft.get("loss"):
        return None
    fig, (ax,) = _figure(8, 3.0)
    steps = ft["steps"][: len(ft["loss"])]
    ax.plot(steps, ft["loss"], color=AFTER_COLOR, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss", color=AFTER_COLOR)
    ax.grid(True, alpha=0.3)
    ag = [a for a in ft.get("agreement") or [] if a is not None]
    if len(ag) == len(steps):
        ax2 = ax.twinx()
        ax2.plot(steps, ag, color="#c0504d", lw=1.0)
        ax2.set_ylabel("batch agreement", color="#c0504d")
    return _png(fig)


# ------------------------------------------------------------------------ html
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


# ------------------------------------------------------------------------ files
def write_reports(meta: dict, info: ModelInfo | None, out_dir: Path,
                  export: dict | None = None, overwrite: bool = True,
                  hardware: dict | None = None) -> list[Path]:
    """Write report.json, report.md and report.html into ``out_dir`` (each atomically;
    ``overwrite`` False refuses a file that exists at the rename)."""
    out_dir = Path(out_dir)
    rep = build_report(meta, info, export, hardware)
    text = json.dumps(rep, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    return [atomic_write_text(out_dir / "report.json", text, overwrite),
            atomic_write_text(out_dir / "report.md", render_markdown(rep), overwrite),
            atomic_write_text(out_dir / "report.html", render_html(rep), overwrite)]
