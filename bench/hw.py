"""Hardware claim, measured (issue 19): MobileNetV1-0.5-160 original vs hybrid on the
ZigZag-modelled accelerators, and a MAC-area-fraction sweep for the int8 hybrid.

    python -m bench.hw run --fp32 /tmp/hw_v1.hfb.pt --int8 /tmp/hw_v1_int8.onnx \
        -o bench/results/hw_v1_0.5_160.json
    python -m bench.hw table bench/results/hw_v1_0.5_160.json --doc docs/hardware.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hfbconvert.hw.engine import zigzag_version
from hfbconvert.hw.report import run_hw

SWEEP = (0.25, 0.5, 0.75, 0.9)


def _hidden_traffic_pj(rep: dict) -> float:
    """On-chip energy of the hybrid's hidden units: W_b's output and W_c's input."""
    e = 0.0
    for lay in rep["hybrid_on_design"]["layers"]:
        for p in lay["parts"]:
            by = p.get("onchip_by_operand_pj", {})
            if p["stage"] == "wb":
                e += by.get("O", 0.0)
            elif p["stage"] == "wc":
                e += by.get("I", 0.0)
    return e


def _summary(rep: dict) -> dict:
    b, h = rep["original_on_baseline"], rep["hybrid_on_design"]
    out = {"baseline": b["accelerator"]["name"], "design": h["accelerator"]["name"],
           "mac_area_fraction": h["accelerator"]["mac_area_fraction"],
           "n_mac_baseline": b["accelerator"]["n_mac"], "n_mac": h["accelerator"]["n_mac"],
           "n_adder": h["accelerator"]["n_adder"], "area_um2": h["accelerator"]["areas"],
           "cycles": {"original": b["totals"]["cycles"], "hybrid": h["totals"]["cycles"]},
           "utilization": {"original": b["totals"]["utilization"],
                           "hybrid": h["totals"]["utilization"]},
           "energy_pj": {"original": b["totals"]["energy_pj"], "hybrid": h["totals"]["energy_pj"]},
           "hidden_unit_onchip_pj": _hidden_traffic_pj(rep),
           "constants_model": rep["constants_model"], **rep["comparison"]}
    return out


def run(args) -> int:
    res = {"engine": f"zigzag-dse {zigzag_version()}", "model": "mobilenet_v1_0.5_160",
           "runs": {}, "sweep_int8": []}
    t0 = time.time()
    for label, path, acc in (("fp32", args.fp32, "hybrid_fp32"),
                             ("int8", args.int8, "hybrid_int8")):
        rep = run_hw(path, acc)
        res["runs"][label] = {"input": path, "summary": _summary(rep), "report": rep}
        print(label, json.dumps(res["runs"][label]["summary"]["energy_ratio"]), file=sys.stderr)
    for f in SWEEP:
        rep = run_hw(args.int8, "hybrid_int8", mac_area_fraction=f)
        res["sweep_int8"].append(_summary(rep))
    res["seconds"] = time.time() - t0
    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def costs(args) -> int:
    """Add costs.py's own figures (arithmetic only, and with one DRAM read per weight word)
    for the original and the two hybrids to the results JSON, for the cross-check."""
    from hfbconvert.artifact import load_compressed
    from hfbconvert.costs import model_cost
    from hfbconvert.models.loading import load_model

    res = json.load(open(args.results))
    orig, info = load_model(args.original)
    out = {}
    for label, path, act in (("fp32", args.fp32, 32), ("int8", args.int8_pt, 8)):
        net, inf, _ = load_compressed(path)
        o = model_cost(orig, info.resolution, act_bits=act)
        h = model_cost(net, inf.resolution)
        out[label] = {"original_pj": o.energy_pj, "hybrid_pj": h.energy_pj,
                      "original_with_weight_reads_pj": o.energy_with_reads_pj,
                      "hybrid_with_weight_reads_pj": h.energy_with_reads_pj,
                      "original_muls": o.muls, "hybrid_muls": h.muls,
                      "original_adds": o.adds, "hybrid_adds": h.adds}
    res["costs_py"] = out
    with open(args.results, "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


def _uj(x: float) -> str:
    return f"{x / 1e6:.1f}"


def table(args) -> int:
    res = json.load(open(args.results))
    out = [f"Engine: {res['engine']}; model {res['model']}; energies in uJ per inference "
           "(compute / on-chip memory / DRAM = total).", "",
           "| arithmetic | accelerator | area (um^2) | MACs + adders | cycles | utilization "
           "| energy | vs original | arithmetic-only (costs.py view) |",
           "|---|---|---:|---|---:|---:|---|---|---|"]
    for label, run_ in res["runs"].items():
        s = run_["summary"]
        for who, name, units in (("original", s["baseline"], f"{s['n_mac_baseline']} + 0"),
                                 ("hybrid", s["design"], f"{s['n_mac']} + {s['n_adder']}")):
            e = s["energy_pj"][who]
            vs = "" if who == "original" else (
                f"cycles x{s['cycles_ratio']:.2f}, energy {100 * s['energy_saving']:+.1f}% saved")
            k = s["constants_model"]
            ar = _uj(k["original_pj"] if who == "original" else k["hybrid_pj"]) + (
                "" if who == "original" else f" ({100 * k['saving']:+.1f}% saved)")
            out.append(f"| {label} {who} | {name} | {s['area_um2']['budget_um2']:.0f} | {units} "
                       f"| {s['cycles'][who]:.0f} | {s['utilization'][who]:.2f} | "
                       f"{_uj(e['compute'])} / {_uj(e['onchip'])} / {_uj(e['dram'])} = "
                       f"{_uj(e['total'])} | {vs} | {ar} |")
    out += ["", "Of the hybrid's on-chip energy, the hidden units (W_b's output written to and "
            "W_c's input read from the activation SRAM):", ""]
    for label, run_ in res["runs"].items():
        s = run_["summary"]
        out.append(f"- {label}: {_uj(s['hidden_unit_onchip_pj'])} of "
                   f"{_uj(s['energy_pj']['hybrid']['onchip'])} uJ")
    out += ["", "int8 hybrid, MAC area fraction swept (same total area):", "",
            "| MAC area fraction | MACs + adders | cycles vs int8 original | energy saved | "
            "energy saved without hidden-unit SRAM traffic |", "|---:|---|---:|---:|---:|"]
    for s in res["sweep_int8"]:
        eo = s["energy_pj"]["original"]["total"]
        eh = s["energy_pj"]["hybrid"]["total"]
        out.append(f"| {s['mac_area_fraction']:.2f} | {s['n_mac']} + {s['n_adder']} | "
                   f"x{s['cycles_ratio']:.2f} | {100 * (1 - eh / eo):+.1f}% | "
                   f"{100 * (1 - (eh - s['hidden_unit_onchip_pj']) / eo):+.1f}% |")
    if "costs_py" in res:
        out += ["", "costs.py on the same models (arithmetic only / plus one DRAM read per "
                "32-bit weight word), for the cross-check:", "",
                "| | original | hybrid | saved |", "|---|---:|---:|---:|"]
        for label, c in res["costs_py"].items():
            for what, a, b in (("arithmetic", c["original_pj"], c["hybrid_pj"]),
                               ("+ weight reads", c["original_with_weight_reads_pj"],
                                c["hybrid_with_weight_reads_pj"])):
                out.append(f"| {label} {what} | {_uj(a)} | {_uj(b)} | {100 * (1 - b / a):+.1f}% |")
    text = "\n".join(out)
    if args.doc:
        begin, end = "<!-- hw-table:begin -->", "<!-- hw-table:end -->"
        doc = open(args.doc).read()
        i, j = doc.index(begin) + len(begin), doc.index(end)
        with open(args.doc, "w") as fh:
            fh.write(doc[:i] + "\n" + text + "\n" + doc[j:])
        print(f"updated {args.doc}", file=sys.stderr)
    else:
        print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hw")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--fp32", required=True, help="float hybrid (.hfb.pt or .onnx)")
    r.add_argument("--int8", required=True, help="int8 hybrid (.hfb.pt or .onnx)")
    r.add_argument("-o", "--output", required=True)
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--doc", default=None, help="replace the block between the hw-table "
                   "markers of this markdown file")
    c = sub.add_parser("costs")
    c.add_argument("results")
    c.add_argument("--original", required=True)
    c.add_argument("--fp32", required=True, help="float hybrid .hfb.pt")
    c.add_argument("--int8-pt", required=True, help="int8 hybrid .hfb.pt")
    a = ap.parse_args(argv)
    return {"run": run, "table": table, "costs": costs}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
