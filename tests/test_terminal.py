"""Terminal tables: each print_* runs on a sample dict and names every layer."""

from __future__ import annotations

import io

from rich.console import Console

from hfbconvert.report import build_report
from hfbconvert.report.terminal import print_analysis, print_compress, print_plan, print_report

NAMES = ["blocks.0.conv_pw", "blocks.1.conv_pw[x]", "classifier"]  # [x]: not rich markup
SHAPES = [(8, 16, 16, 16), (16, 32, 8, 8), (32, 10, 1, 1)]  # c_in, c_out, H, W


def _layer_plans() -> list[dict]:
    out = []
    for n, (ci, co, h, w) in zip(NAMES, SHAPES):
        n_c = co // 4
        out.append({"name": n, "n_critical": n_c, "r": co - n_c, "critical_idx": list(range(n_c)),
                    "c_in": ci, "c_out": co, "pixels": h * w, "predicted_err": 0.02,
                    "extra": {}})
    return out


def _plan() -> dict:
    return {"method": "hybrid", "budget": 0.5, "fixed_muls": 1000, "original_muls": 50_000,
            "original_adds": 48_000, "predicted_muls": 0, "notes": ["a note"],
            "layers": _layer_plans()}


def _cost(hybrid: bool) -> dict:
    rows = [{"name": "stem", "kind": "conv", "muls": 1000, "adds": 900, "params": 27,
             "bytes": 108.0, "pixels": 256, "extra": {}}]
    for lp in _layer_plans():
        px, ci, co = lp["pixels"], lp["c_in"], lp["c_out"]
        if hybrid:
            extra = {"critical": lp["n_critical"], "tolerant": co - lp["n_critical"],
                     "r": lp["r"], "c_in": ci, "c_out": co, "nnz_wb": 5, "nnz_wc": 5,
                     "adds_wb": 1, "adds_wc": 1}
            rows.append({"name": lp["name"], "kind": "hybrid", "muls": px * ci * co // 3,
                         "adds": px * ci * co, "params": ci * co, "bytes": ci * co * 1.5,
                         "pixels": px, "extra": extra})
        else:
            rows.append({"name": lp["name"], "kind": "pointwise", "muls": px * ci * co,
                         "adds": px * co * (ci - 1), "params": ci * co, "bytes": ci * co * 4.0,
                         "pixels": px, "extra": {}})
    tot = {k: sum(r[k] for r in rows) for k in ("muls", "adds", "params", "bytes")}
    tot |= {"energy_pj": tot["muls"] * 3.7 + tot["adds"] * 0.9, "fp_bits": 32,
            "energy_with_weight_reads_pj": 0.0}
    return {"totals": tot, "layers": rows}


def _meta() -> dict:
    return {"plan": _plan(), "cost": _cost(True), "original_cost": _cost(False),
            "stages": [{"stage": "fit", "agreement": 0.5, "seconds": 1.0},
                       {"stage": "finetune_10", "agreement": None, "seconds": 2.0}],
            "final_agreement": 0.5,
            "layers": [{"name": n, "kind": "conv", "c_in": ci, "c_out": co, "height": h,
                        "width": w} for n, (ci, co, h, w) in zip(NAMES, SHAPES)]}


def _capture(fn, *args) -> str:
    buf = io.StringIO()
    fn(*args, console=Console(file=buf, width=100, highlight=False))
    return buf.getvalue()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _has_names(text: str) -> None:
    for n in NAMES:
        assert n in text, n


def test_print_analysis():
    layers = [{"name": n, "c_in": ci, "c_out": co, "height": h, "width": w, "mul_share": 0.3,
               "median_loss": [0.3, 0.1], "p90_loss": [0.6, 0.2], "critical_at_threshold": 2}
              for n, (ci, co, h, w) in zip(NAMES, SHAPES)]
    res = {"budgets": [1, 2], "threshold": {"loss": 0.05, "budget": 2}, "layers": layers,
           "model": {"source": "m.pt", "arch": "mobilenet_v1", "resolution": 32},
           "totals": {"muls": 50_000, "adds": 48_000, "params": 1000, "energy_pj": 1e5},
           "pointwise_mul_share": 0.9, "activation_aware": False}
    out = _capture(print_analysis, res)
    _has_names(out)
    assert "6 of 58 filters critical" in _flat(out) and "Σ = I" in out


def test_print_plan():
    out = _capture(print_plan, _plan())
    _has_names(out)
    assert "budget 50.0%" in _flat(out) and "a note" in out


def test_print_compress():
    out = _capture(print_compress, _meta(), {"fit_s": 1.0, "total_s": 3.5}, "out.hfb.pt")
    assert "out.hfb.pt" in out and "finetune_10" in out and "n/a" in out
    assert "MULs" in out and "%" in out


def test_print_report_default_console(capsys):
    """Through the default stdout console (as the CLI calls it)."""
    print_report(build_report(_meta(), None))
    out = capsys.readouterr().out
    _has_names(out)
    assert "other (1)" in out
