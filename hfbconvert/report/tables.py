"""Text content of the report's tables and summary lines (shared by Markdown, HTML and
the terminal), from the :mod:`.model` dict."""

from __future__ import annotations

from .. import costs
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
from .model import _finite


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



def held_curve_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    c = rep.get("held_curve") or {}
    cuts = {x.get("step"): x for x in c.get("lr_cuts") or []}

    def label(st: int) -> str:
        cut = cuts.get(st)
        return str(st) + (" (shipped)" if st == c.get("best_step") else "") + (
            f" (lr cut to x{cut.get('lr_scale'):g})" if cut else "")

    rows = [[label(st),
             fmt_num(_finite(kl), ".4f"), fmt_num(_finite(ag), ".4f"), fmt_num(_finite(t1), ".4f")]
            for st, kl, ag, t1 in zip(c.get("steps") or [], c.get("held_kl") or [],
                                      c.get("held_agreement") or [], c.get("held_top1") or [],
                                      strict=False)]
    return ["step", "held KL", "agreement", "top-1"], rows

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
        adds = (t.get("compressed") or {}).get("adds")
        o_adds = (t.get("original") or {}).get("adds")
        # the rule compress's ADD check applies, on the same counted ADDs (shifts included)
        over = lim is not None and (not costs.add_cap_use(adds, o_adds, lim)["met"]
                                    if adds is not None and o_adds else inc > lim + 1e-9)
        out.append(f"ADDs {fmt_change(inc)} vs the original"
                   + (f" (allowed {fmt_change(lim)}{', OVER THE LIMIT' if over else ''})"
                      if lim is not None else ""))
    em = bud.get("energy_model") or "constants"
    energy_what = ("arithmetic energy by the constants table, of the original's at the same "
                   "bits" if em == "constants" else
                   f"energy on the {em} accelerator model (ZigZag-priced per operation, "
                   "memory included, the final ternary non-zeros), of the original's on the "
                   "equal-area MAC-only baseline")
    for key, what in (("size", "stored bytes, of the float32 weights"),
                      ("energy", energy_what)):
        cap, used = bud.get(f"{key}_budget"), bud.get(f"{key}_fraction_used")
        if cap is not None:
            over = costs.over_cap(used, cap)
            out.append(f"{key} budget {cap:.1%} ({what}), used {fmt_num(used, '.1%')}"
                       + (" (OVER BUDGET)" if over else "")
                       + ("" if key != "energy" or em == "constants" else
                          "; arithmetic energy by the constants table: "
                          f"{fmt_num(bud.get('energy_fraction_used_constants'), '.1%')} of "
                          "the original's"))
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
