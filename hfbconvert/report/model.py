"""The report's data model: one plain-JSON dict built from a compression's metadata
(:func:`build_report`); every rendering reads only this dict."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from .. import costs
from ..models.info import ModelInfo
from .formatting import COST_KEYS

SCHEMA_VERSION = 1
ERROR_DEFINITIONS = {
    "predicted_err": "planner's estimate: share of the layer's output energy (Σ metric) "
                     "lost by its tolerant filters, from the sensitivity curves",
    "bank_loss": "relative loss of the tolerant bank against the original rows in the Σ "
                 "metric of the original layer input, before and after fine-tuning",
    "output_rel_err": "‖y_hybrid − y_original‖² / ‖y_original‖² at the layer output, end to "
                      "end on held-apart images (errors of earlier layers included)",
}


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


def _energy(c: dict, fp_bits: int, act_bits: int) -> float:
    """Arithmetic energy of one layer (or a sum of layers): ``LayerCost.energy_pj`` itself,
    at the precision its side was costed at (int8: MACs, int32 scale MULs, int32 ADDs)."""
    return costs.LayerCost("", "", c.get("muls", 0), c.get("adds", 0), 0, 0.0,
                           scale_muls=c.get("scale_muls", 0)).energy_pj(fp_bits, act_bits)


def _cost_cell(c: dict | None, bits: tuple[int, int]) -> dict | None:
    if not c:
        return None
    return {"muls": c.get("muls"), "adds": c.get("adds"), "params": c.get("params"),
            "bytes": c.get("bytes"), "energy_pj": _energy(c, *bits)}


def _bits(cost: dict | None) -> tuple[int, int]:
    """(fp_bits, activation bits) a cost table was computed at."""
    tot = (cost or {}).get("totals") or {}
    return int(tot.get("fp_bits", 32)), int(tot.get("activation_bits", 32))


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
               lp: dict | None) -> dict:
    name = ly["name"]
    errs = (meta.get("layer_errors") or {}).get(name) or {}
    recon = (meta.get("reconstruction") or {}).get(name) or {}
    row = {"name": name, "kind": ly.get("kind"), "c_in": ly.get("c_in"), "c_out": ly.get("c_out"),
           "height": ly.get("height"), "width": ly.get("width")}
    row.update(_split_counts(ly, after, lp))
    row["before"] = _cost_cell(before, _bits(meta.get("original_cost")))
    row["after"] = _cost_cell(after, _bits(meta.get("cost")))
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


def _other_layers(names: set[str], meta: dict) -> dict:
    """Stem, depthwise etc.: not converted, summed so per-layer rows add up to totals."""
    def total(side: str) -> dict:
        keep = [r for r in (meta.get(side) or {}).get("layers") or []
                if r.get("name") not in names]
        s = {k: sum(r.get(k, 0) for r in keep) for k in ("muls", "adds", "params", "bytes")}
        s["energy_pj"] = _energy({**s, "scale_muls": sum(r.get("scale_muls", 0) for r in keep)},
                                 *_bits(meta.get(side)))
        return s

    before = (meta.get("original_cost") or {}).get("layers") or []
    rest = [r for r in before if r.get("name") not in names]
    return {"count": len(rest), "kinds": sorted({r.get("kind", "?") for r in rest}),
            "before": total("original_cost"), "after": total("cost")}


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
        **_energy_use(meta, orig, comp),
    }
    return out


def _energy_use(meta: dict, orig: dict, comp: dict) -> dict:
    """How much of ``--energy-budget`` the model uses: :func:`hfbconvert.costs.energy_use`,
    the function compress's energy check calls too (``orig``/``comp``: the totals)."""
    return costs.energy_use({**(meta.get("cost") or {}), "totals": comp},
                            {**(meta.get("original_cost") or {}), "totals": orig},
                            (meta.get("plan") or {}).get("energy_pricing"),
                            (meta.get("config") or {}).get("energy_model"))


def _frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


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
        "per_layer_energy": "MULs·E_mul + ADDs·E_add at fp_bits, or with int8 activations "
                            "int8 MACs, int32 scale MULs and int32 ADDs, as each model's "
                            "totals are priced (arithmetic only); the total "
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



def _held_curve(meta: dict) -> dict | None:
    """Held-apart curve: ``hfbconvert finetune``'s (with top-1 where labels exist), else
    compress's early-stopping checks."""
    c = meta.get("finetune_curve")
    if c and c.get("steps"):
        return {"source": "finetune", "steps": list(c["steps"]),
                "held_kl": list(c.get("held_kl") or []),
                "held_agreement": list(c.get("held_agreement") or []),
                "held_top1": list(c.get("held_top1") or [None] * len(c["steps"])),
                "best_step": c.get("best_step"), "stopped_early_at": c.get("stopped_early_at"),
                "lr_cuts": list(c.get("lr_cuts") or [])}
    log = meta.get("finetune_log") or {}
    if not log.get("eval_steps"):
        return None
    return {"source": "compress", "steps": list(log["eval_steps"]),
            "held_kl": list(log.get("held_kl") or []),
            "held_agreement": list(log.get("held_agreement") or []),
            "held_top1": list(log.get("held_top1") or [None] * len(log["eval_steps"])),
            "best_step": log.get("best_step"), "stopped_early_at": log.get("stopped_early_at"),
            "lr_cuts": list(log.get("lr_cuts") or [])}

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
    before = (meta.get("original_cost") or {}).get("layers") or []
    after = (meta.get("cost") or {}).get("layers") or []
    b_by, a_by = {c["name"]: c for c in before}, {c["name"]: c for c in after}
    plan = meta.get("plan") or {}
    p_by = {lp["name"]: lp for lp in plan.get("layers", [])}
    layers = _pointwise_layers(meta)
    rows = [_layer_row(ly, meta, b_by.get(ly["name"]), a_by.get(ly["name"]),
                       p_by.get(ly["name"])) for ly in layers]
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
        "other_layers": _other_layers(names, meta),
        "totals": model_totals(meta),
        "stages": [dict(s) for s in meta.get("stages") or []],
        "final_agreement": _finite(meta.get("final_agreement")),
        "finetune": _finetune(meta),
        "held_curve": _held_curve(meta),
        "export": _export(export),
        "plan_notes": list(plan.get("notes") or []),
        "conventions": conv,
        "config": meta.get("config"),
        "versions": meta.get("versions"),
    })
