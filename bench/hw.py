"""Hardware claim, measured (issue 19): MobileNetV1-0.5-160 original vs hybrid on the
ZigZag-modelled accelerators, and a MAC-area-fraction sweep for the int8 hybrid.

    python -m bench.hw run --fp32 /tmp/hw_v1.hfb.pt --int8 /tmp/hw_v1_int8.onnx \
        -o bench/results/hw_v1_0.5_160.json
    python -m bench.hw table bench/results/hw_v1_0.5_160.json --doc docs/hardware.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

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


def _layer_rows(ev: dict) -> list[dict]:
    """Per-layer cycles and energy split, without the per-part detail."""
    return [{"name": r["name"], "kind": r["kind"], "cycles": r["cycles"],
             "energy_pj": r["energy_pj"], "engine": r["engine"]} for r in ev["layers"]]


def models(args) -> int:
    """The 3-model hardware table: per model, the float hybrid on hybrid_fp32 and the int8
    hybrid on hybrid_int8, each against its original on the equal-area MAC-only baseline."""
    from hfbconvert.hw.engine import Engine
    from hfbconvert.hw.spec import load_design

    eng = Engine()
    sram = _act_sram(args.act_sram_kib, [c[0] for c in args.case])
    res = {"engine": f"zigzag-dse {zigzag_version()}", "command": args.command,
           "models": {}}
    if args.append and os.path.exists(args.output):
        # add or replace these cases in an earlier run's file; each run's command is kept
        res = json.load(open(args.output))
        res["commands"] = res.get("commands", [res["command"]]) + [args.command]
        res["command"] = "; ".join(res["commands"])
    t0 = time.time()
    for tag, fp, int8 in args.case:
        res["models"][tag] = {}
        for label, path, acc in (("fp32", fp, "hybrid_fp32"), ("int8", int8, "hybrid_int8")):
            des = load_design(acc)
            if tag in sram:
                des = replace(des, name=f"{acc}_act{sram[tag]:.0f}k",
                              memory={**des.memory, "act_sram_kib": sram[tag]})
            rep = run_hw(path, des, engine=eng)
            res["models"][tag][label] = {
                "input": path, "summary": _summary(rep),
                "act_sram_kib": des.memory["act_sram_kib"],
                "act_kib_needed": _act_kib_needed(path),
                "layers": {"original": _layer_rows(rep["original_on_baseline"]),
                           "hybrid": _layer_rows(rep["hybrid_on_design"])}}
            print(tag, label, f"{rep['comparison']['energy_ratio']:.3f}", file=sys.stderr)
            res["seconds"] = time.time() - t0
            with open(args.output, "w") as fh:  # after each run: partial results survive
                json.dump(res, fh, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _act_kib_needed(path: str) -> dict[str, float]:
    """The largest on-chip activation footprint (a part's input + output, KiB) of the
    original and of the hybrid: what the activation SRAM must hold (engine.check_fits)."""
    from hfbconvert.hw.report import load_layers, original_of

    hyb, _ = load_layers(path)
    return {who: max(sum(p.act_bits_in_out()) / 8192 for lay in layers for p in lay.parts)
            for who, layers in (("original", original_of(hyb)), ("hybrid", hyb))}


def _act_sram(specs: list[str], tags: list[str]) -> dict[str, float]:
    """``TAG=KIB`` pairs: the activation SRAM size a model's designs get instead of the
    shipped one (a model too large for it is refused by ``hfbconvert hw``)."""
    out = {}
    for spec in specs:
        tag, _, kib = spec.partition("=")
        if tag not in tags or not kib.replace(".", "", 1).isdigit():
            raise SystemExit(f"--act-sram-kib {spec}: expected TAG=KIB with TAG one of "
                             f"{', '.join(tags)}")
        out[tag] = float(kib)
    return out


KNOB_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
PLANNER_RATIOS = (1.0, 2.0, 3.0, 4.0)  # CompressConfig.ratios: hidden units per tolerant filter
KNOB_R_SCALES = (1.0, 0.75, 0.5, 0.25)
KNOB_ADDER_BITS = (32, 24, 16, 12)


def knobs(args) -> int:
    """The int8 hybrid of one model on hybrid_int8 with one knob moved at a time (MAC area
    fraction, hidden units per tolerant filter, adder width), then the best of each
    together; each point against int8 PTQ on the equal-area MAC-only baseline."""
    from hfbconvert.hw.engine import Engine
    from hfbconvert.hw.knobs import adder_width, scale_hidden_units
    from hfbconvert.hw.report import load_layers
    from hfbconvert.hw.spec import load_design

    eng = Engine()
    layers, _ = load_layers(args.int8)
    des0 = load_design("hybrid_int8")
    res = {"engine": f"zigzag-dse {zigzag_version()}", "command": args.command,
           "model": args.model, "input": args.int8, "goal_saving": 0.2, "points": []}
    t0 = time.time()

    def point(knob: str, value, frac: float, scale: float, bits: int) -> dict:
        des, lay = adder_width(des0.with_fraction(frac), scale_hidden_units(layers, scale),
                               bits)
        rep = run_hw(args.int8, des, engine=eng, layers=lay)
        s = _summary(rep)
        s.update(knob=knob, value=value, r_scale=scale, adder_bits=bits,
                 meets_goal=s["cycles_ratio"] <= 1 and s["energy_saving"] >= 0.2,
                 layers_hybrid=_layer_rows(rep["hybrid_on_design"]),
                 layers_original=_layer_rows(rep["original_on_baseline"]))
        res["points"].append(s)
        print(knob, value, f"cycles x{s['cycles_ratio']:.2f}",
              f"saving {100 * s['energy_saving']:+.1f}%", file=sys.stderr)
        res["seconds"] = time.time() - t0
        with open(args.output, "w") as fh:  # after each point: partial results survive
            json.dump(res, fh, indent=1)
        return s

    best = {}
    for f in KNOB_FRACTIONS:
        best.setdefault("mac_area_fraction", []).append(point("mac_area_fraction", f, f, 1.0,
                                                              32))
    for sc in KNOB_R_SCALES[1:]:
        best.setdefault("r_scale", []).append(point("r_scale", sc, 0.5, sc, 32))
    for b in KNOB_ADDER_BITS[1:]:
        best.setdefault("adder_bits", []).append(point("adder_bits", b, 0.5, 1.0, b))
    # all three at their most favourable value (least energy among equal-or-faster points,
    # else least energy)
    pick = {}
    for k, pts in best.items():
        ok = [p for p in pts if p["cycles_ratio"] <= 1] or pts
        pick[k] = min(ok, key=lambda p: p["energy_pj"]["hybrid"]["total"])["value"]
    point("combined", pick, pick["mac_area_fraction"], pick["r_scale"], pick["adder_bits"])
    point("combined_extreme", {"mac_area_fraction": 0.5, "r_scale": min(KNOB_R_SCALES),
                               "adder_bits": min(KNOB_ADDER_BITS)},
          0.5, min(KNOB_R_SCALES), min(KNOB_ADDER_BITS))
    res["seconds"] = time.time() - t0
    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def planner_check(args) -> int:
    """How close the engine-priced planner's prediction (``--energy-model``) comes to the
    engine's own figure for the model it planned: the compressed model priced by
    ``run_hw`` against ``hw.planner.engine_prices`` of its plan (predicted W_b density)."""
    from hfbconvert.artifact import load_compressed
    from hfbconvert.hw.engine import Engine
    from hfbconvert.hw.planner import engine_prices, priced_pj
    from hfbconvert.models.loading import load_model
    from hfbconvert.plan import LayerPlan

    net, info, meta = load_compressed(args.compressed)
    orig, oinfo = load_model(args.original)
    cfg = meta.get("config") or {}
    act = int(cfg.get("activation_bits", 32))
    plans = [LayerPlan(**lp) for lp in meta["plan"]["layers"]]
    eng = Engine()
    prices = engine_prices(orig, oinfo.resolution, [lp.name for lp in plans], args.accelerator,
                           act, int(cfg.get("hidden_bits", 32)), engine=eng)
    predicted = prices.fixed_pj + sum(prices.plan_pj(lp) for lp in plans)
    rep = run_hw(args.compressed, args.accelerator, engine=eng)
    actual = rep["hybrid_on_design"]["totals"]["energy_pj"]["total"]
    # what `hfbconvert report` states as the budget used: the plan's stored prices at the
    # final model's counts (None for a model planned before the prices were stored)
    rec = meta["plan"].get("energy_pricing")
    report_pj = priced_pj(rec, meta["cost"]["layers"]) if rec else None
    res = {"command": args.command, "engine": f"zigzag-dse {zigzag_version()}",
           "compressed": args.compressed, "accelerator": args.accelerator,
           "energy_budget": cfg.get("energy_budget"), "energy_model": cfg.get("energy_model"),
           "reference_pj": prices.reference_pj, "predicted_pj": predicted,
           "engine_pj": actual, "relative_error": predicted / actual - 1,
           "report_pj": report_pj,
           "report_relative_error": None if report_pj is None else report_pj / actual - 1,
           "engine_vs_reference": actual / prices.reference_pj,
           "baseline_pj": rep["original_on_baseline"]["totals"]["energy_pj"]["total"],
           "cycles_ratio": rep["comparison"]["cycles_ratio"],
           "plan_notes": meta["plan"].get("notes", [])}
    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "plan_notes"}, indent=1))
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


def _split(e: dict) -> str:
    return f"{_uj(e['compute'])} | {_uj(e['onchip'])} | {_uj(e['dram'])} | {_uj(e['total'])}"


def _losing_layers(rows_h: list[dict], rows_o: list[dict], n: int = 3,
                   saving: bool = False) -> str:
    """The layers where the hybrid adds the most energy (``saving``: saves the most), with
    the memory level of it."""
    orig = {r["name"]: r for r in rows_o}
    deltas = []
    for r in rows_h:
        o = orig.get(r["name"])
        if o is None:
            continue
        d = {k: r["energy_pj"][k] - o["energy_pj"][k] for k in ("compute", "onchip", "dram",
                                                                 "total")}
        if (d["total"] < 0) == saving:
            deltas.append((d["total"], r["name"], d))
    deltas.sort(reverse=not saving)
    return "; ".join(f"{name} {_uj(d['total'])} ({_uj(d['onchip'])} on-chip, "
                     f"{_uj(d['dram'])} DRAM, {_uj(d['compute'])} compute)"
                     for _t, name, d in deltas[:n]) or "none"


LEVELS = (("compute", "compute"), ("onchip", "on-chip memory"), ("dram", "DRAM"))


def _wins_losses(tag: str, label: str, run_: dict) -> str:
    """One bullet: the memory levels and layers where the hybrid saves energy against its
    original, and where it spends more."""
    s = run_["summary"]
    eo, eh = s["energy_pj"]["original"], s["energy_pj"]["hybrid"]
    d = {k: eh[k] - eo[k] for k, _ in LEVELS}
    win = ", ".join(f"{w} {_uj(-d[k])} uJ" for k, w in LEVELS if d[k] < 0) or "nothing"
    lose = ", ".join(f"{w} +{_uj(d[k])} uJ" for k, w in LEVELS if d[k] >= 0) or "nothing"
    rows_h, rows_o = run_["layers"]["hybrid"], run_["layers"]["original"]
    return (f"- {tag} {label} (total {100 * (s['energy_ratio'] - 1):+.1f}%, cycles "
            f"x{s['cycles_ratio']:.2f}): saves {win}; spends more in {lose}. Layers "
            f"saving the most: {_losing_layers(rows_h, rows_o, saving=True)}. Layers adding "
            f"the most: {_losing_layers(rows_h, rows_o)}.")


def _verdict(k: dict) -> list[str]:
    """Which knob meets the goal (less energy by goal_saving at cycles <= x1), or how far
    the closest points are and where their energy goes."""
    pts, goal = k["points"], k["goal_saving"]
    ptq = pts[0]["energy_pj"]["original"]
    met = [p for p in pts if p["meets_goal"]]

    def name(p: dict) -> str:
        return (f"{p['knob']} (MAC area {p['mac_area_fraction']:.2f}, r x{p['r_scale']:.2f}, "
                f"{p['adder_bits']}-bit adders)")
    if met:
        b = min(met, key=lambda p: p["energy_ratio"])
        return [f"Met by {name(b)}: {100 * b['energy_saving']:.1f}% less energy at cycles "
                f"x{b['cycles_ratio']:.2f}."]
    out = ["No point meets the goal."]
    cheap = [p for p in pts if p["energy_saving"] >= goal]
    fast = [p for p in pts if p["cycles_ratio"] <= 1]
    if cheap:
        b = min(cheap, key=lambda p: p["cycles_ratio"])
        out.append(f"The energy goal alone is reached by {name(b)} "
                   f"({100 * b['energy_saving']:.1f}% less), but at cycles "
                   f"x{b['cycles_ratio']:.2f} of int8 PTQ.")
    else:
        b = min(pts, key=lambda p: p["energy_ratio"])
        need = b["energy_pj"]["hybrid"]["total"] - (1 - goal) * ptq["total"]
        out.append(f"The lowest energy is {name(b)} at {100 * (b['energy_ratio'] - 1):+.1f}% "
                   f"vs int8 PTQ (cycles x{b['cycles_ratio']:.2f}); the goal needs {_uj(need)} "
                   "uJ less.")
    if fast:
        f = min(fast, key=lambda p: p["energy_ratio"])
        out.append(f"The cheapest point as fast as int8 PTQ is {name(f)} at "
                   f"{100 * (f['energy_ratio'] - 1):+.1f}% energy.")
    else:
        f = min(pts, key=lambda p: p["cycles_ratio"])
        out.append(f"No point is as fast as int8 PTQ (fastest: {name(f)} at cycles "
                   f"x{f['cycles_ratio']:.2f}).")
    e = b["energy_pj"]["hybrid"]
    out.append(f"int8 PTQ spends {_uj(ptq['compute'])} / {_uj(ptq['onchip'])} / "
               f"{_uj(ptq['dram'])} uJ (compute / on-chip / DRAM); {name(b)} spends "
               f"{_uj(e['compute'])} / {_uj(e['onchip'])} / {_uj(e['dram'])}; the layers that "
               "add the most there: " + _losing_layers(b["layers_hybrid"],
                                                        b["layers_original"]) + ".")
    out += _knob_reach(pts, ptq["total"], goal)
    dense_h = sum(r["cycles"] for r in f["layers_hybrid"] if r["kind"] != "hybrid")
    dense_o = sum(r["cycles"] for r in f["layers_original"]
                  if r["name"] in {x["name"] for x in f["layers_hybrid"] if x["kind"] != "hybrid"})
    out.append(f"Throughput: at {name(f)} the layers that stay on the MAC array (stem, "
               f"depthwise, classifier, unconverted) alone take {dense_h:.0f} cycles against "
               f"{dense_o:.0f} on the MAC-only baseline, of int8 PTQ's "
               f"{f['cycles']['original']:.0f} in all.")
    return [" ".join(out)]


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def _knob_reach(pts: list[dict], ptq_pj: float, goal: float) -> list[str]:
    """Each knob alone at its best value, and how far the hidden-units knob could go:
    energy and cycles fitted linearly in ``r scale`` over the measured points that share a
    MAC area fraction and adder width, extrapolated to r -> 0 (no ternary-bank work left,
    everything else kept). An extrapolation, said as such."""
    alone = []
    for knob, what in (("mac_area_fraction", "MAC area {:.2f}"), ("r_scale", "r x{:.2f}"),
                       ("adder_bits", "{}-bit adders")):
        kp = [p for p in pts if p["knob"] == knob]
        if kp:
            b = min(kp, key=lambda p: p["energy_ratio"])
            alone.append(f"{what.format(b['value'])} {100 * (b['energy_ratio'] - 1):+.1f}% "
                         f"(cycles x{b['cycles_ratio']:.2f})")
    out = ["Each knob alone at its least-energy value: " + "; ".join(alone) + "."]
    groups: dict[tuple, dict[float, dict]] = {}
    for p in pts:
        groups.setdefault((p["mac_area_fraction"], p["adder_bits"]), {})[p["r_scale"]] = p
    fits = []
    for (frac, bits), by_r in groups.items():
        if len(by_r) < 2:
            continue
        rs = sorted(by_r)
        e_slope, e0 = _line(rs, [by_r[r]["energy_pj"]["hybrid"]["total"] for r in rs])
        _c_slope, c0 = _line(rs, [by_r[r]["cycles_ratio"] for r in rs])
        fits.append((e0, frac, bits, rs, e_slope, c0))
    if not fits:
        return out
    target = (1 - goal) * ptq_pj
    s = ("Extrapolating energy and cycles linearly in r to r -> 0 (the ternary banks' work "
         "gone, everything else kept) from the measured points: " + "; ".join(
             f"MAC area {frac:.2f} with {bits}-bit adders (r x"
             f"{', x'.join(f'{r:g}' for r in rs)}) {_uj(e0)} uJ, "
             f"{100 * (e0 / ptq_pj - 1):+.1f}% vs int8 PTQ, cycles x{c0:.2f}"
             for e0, frac, bits, rs, _s, c0 in sorted(fits)) + ". ")
    e0, frac, bits, rs, e_slope, c0 = min(fits)
    if e0 > target:
        s += (f"Even the lowest is above the goal's {_uj(target)} uJ, so no hidden-unit count "
              "reaches it at these splits and widths: what is left is the stem, depthwise, "
              "classifier and critical filters on the smaller MAC array and their on-chip "
              "traffic.")
    else:
        r_need = (target - e0) / e_slope if e_slope > 0 else 0.0
        s += (f"At MAC area {frac:.2f} with {bits}-bit adders the energy goal would need about "
              f"r x{r_need:.2f} (extrapolated; accuracy not measured there)")
        s += (". That is below 1/4: the planner's ratios r / tolerant filters are 1 to 4, so "
              "every layer would have fewer hidden units than tolerant filters, a bank "
              "hfbconvert does not build." if r_need < 1 / max(PLANNER_RATIOS) else ".")
    return out + [s]


def _planner_lines(path: str) -> list[str]:
    """The engine-priced planner's prediction against the engine on the model it planned,
    whether the engine's figure keeps the cap, and what accuracy the plan kept."""
    c = json.load(open(path))
    eng = c["engine_vs_reference"]
    cap = c["energy_budget"]
    out = (f"Planner check (`{c.get('compress_command', 'compress --energy-budget ' + str(cap))}`"
           f", then `{c['command']}`; from `{path}`): the plan's predicted energy on "
           f"{c['accelerator']} {_uj(c['predicted_pj'])} uJ, the engine on the compressed model "
           f"{_uj(c['engine_pj'])} uJ ({100 * c['relative_error']:+.1f}% prediction error)")
    if c.get("report_pj") is not None:
        out += (f"; `hfbconvert report` states {_uj(c['report_pj'])} uJ "
                f"({100 * c['report_relative_error']:+.1f}%: the stored prices at the final "
                "ternary non-zeros)")
    out += (f". By the engine the model uses {eng:.3f} of the original on the equal-area "
            f"MAC-only baseline ({_uj(c['reference_pj'])} uJ, i.e. int8 PTQ), "
            + ("within" if eng <= cap else "over") + f" the cap of {cap}"
            + ("" if eng <= cap else " that the planner's linear prices kept")
            + f", at cycles x{c['cycles_ratio']:.2f} of that baseline.")
    least = c.get("least_plan")
    if least:
        out += (f" The least energy any plan reaches on this design, by the planner's prices, "
                f"is {least['of_reference']:.3f} of int8 PTQ (`{least['command']}`: "
                f"\"{least['error'].removeprefix('error: ')}\").")
    iv = c.get("final_agreement_interval")
    if iv:
        out += (f" Accuracy is not part of this check, and this plan (`--steps 0`, no "
                f"fine-tune) keeps top-1 agreement {iv['agree']}/{iv['n']} with the original "
                f"on the held-apart images (95% interval {iv['ci95'][0]:.2f}-"
                f"{iv['ci95'][1]:.2f}).")
    return ["", out]


def _knob_section(path: str) -> list[str]:
    """One knob results file: its table and the verdict."""
    k = json.load(open(path))
    out: list[str] = []
    out += ["", f"Knobs, {k['model']} int8 hybrid on hybrid_int8 against int8 PTQ on the "
            f"equal-area MAC-only baseline (goal: at least {100 * k['goal_saving']:.0f}% "
            "less energy at equal or better throughput; `r scale`: hidden units per "
            "tolerant filter times this; `adder bits`: adder width, the ternary parts' "
            f"partial sums and hidden units at that width; from `{path}`, produced by "
            f"`{k['command']}`):", "",
            "| knob | MAC area fraction | r scale | adder bits | MACs + adders | "
            "cycles vs PTQ | hybrid compute | on-chip | DRAM | total | energy vs PTQ | "
            "goal |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in k["points"]:
        out.append(f"| {p['knob']} | {p['mac_area_fraction']:.2f} | {p['r_scale']:.2f} | "
                   f"{p['adder_bits']} | {p['n_mac']} + {p['n_adder']} | "
                   f"x{p['cycles_ratio']:.2f} | {_split(p['energy_pj']['hybrid'])} | "
                   f"{100 * (p['energy_ratio'] - 1):+.1f}% | "
                   f"{'met' if p['meets_goal'] else 'not met'} |")
    out += [""] + _verdict(k)
    return out


def _headline(res: dict, knob_paths: list[str]) -> list[str]:
    """The verdict in three sentences: the int8 hybrid against int8 PTQ per model, the float
    hybrid against the float original, where (by level) the hybrid saves and spends, and
    whether any knob point meets the goal."""
    def pair(label: str) -> str:
        return "; ".join(
            f"{tag} {100 * (r[label]['summary']['energy_ratio'] - 1):+.1f}% energy at cycles "
            f"x{r[label]['summary']['cycles_ratio']:.2f}"
            for tag, r in res["models"].items() if label in r)
    runs = [run_["summary"] for r in res["models"].values() for run_ in r.values()]
    by_level = []
    for k, what in LEVELS:
        n = sum(1 for s in runs if s["energy_pj"]["hybrid"][k] < s["energy_pj"]["original"][k])
        by_level.append(f"{what} in {n} of {len(runs)}")
    out = [f"In short: the int8 hybrid on the area-equivalent design against int8 PTQ on the "
           f"MAC-only baseline: {pair('int8')}. The float hybrid against the float original: "
           f"{pair('fp32')}. The hybrid uses less energy than its original for "
           + ", ".join(by_level) + " runs."]
    for path in knob_paths:
        k = json.load(open(path))
        met = [p for p in k["points"] if p["meets_goal"]]
        best = min(k["points"], key=lambda p: p["energy_ratio"])
        out.append(
            f"Goal ({100 * k['goal_saving']:.0f}% less energy than int8 PTQ at equal or better "
            f"throughput), {k['model']}: " + (
                f"met at {len(met)} of {len(k['points'])} knob points." if met else
                f"not met at any of {len(k['points'])} knob points; the least energy is "
                f"{best['knob']} (MAC area {best['mac_area_fraction']:.2f}, r "
                f"x{best['r_scale']:.2f}, {best['adder_bits']}-bit adders) at "
                f"{100 * (best['energy_ratio'] - 1):+.1f}% and cycles "
                f"x{best['cycles_ratio']:.2f} (details below)."))
    return ["", " ".join(out)]


def models_table(args) -> int:
    res = json.load(open(args.models_results))
    out = [f"Generated by `python -m bench.hw models-table` from "
           f"`{args.models_results}`" + (f" and {', '.join(f'`{k}`' for k in args.knobs)}"
                                         if args.knobs else "") +
           f" (engine {res['engine']}; produced by `{res['command']}`). Energies in uJ per "
           "inference; unit costs Horowitz 45 nm; compute area only (memories not in the "
           "area); the original on the MAC-only baseline, the hybrid on the area-equivalent "
           "MAC + adder design (MAC area fraction 0.5); hybrids from `compress --steps 0`.",
           *_headline(res, args.knobs),
           "", "| model | arithmetic | accelerator | area (um^2) | act SRAM (KiB) | "
           "MACs + adders | cycles | cycles vs original | utilization | compute | on-chip | "
           "DRAM | total | energy vs original |",
           "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    losers: list[str] = []
    bigger: dict[str, tuple[float, list]] = {}
    for tag, runs in res["models"].items():
        for label, run_ in runs.items():
            s = run_["summary"]
            for who, name, units in (("original", s["baseline"], f"{s['n_mac_baseline']} + 0"),
                                     ("hybrid", s["design"], f"{s['n_mac']} + {s['n_adder']}")):
                e = s["energy_pj"][who]
                cyc = "" if who == "original" else f"x{s['cycles_ratio']:.2f}"
                en = "" if who == "original" else f"{100 * (s['energy_ratio'] - 1):+.1f}%"
                out.append(f"| {tag} | {label} {who} | {name} | "
                           f"{s['area_um2']['budget_um2']:.0f} | "
                           f"{run_.get('act_sram_kib', 4096):.0f} | {units} | "
                           f"{s['cycles'][who]:.0f} | {cyc} | {s['utilization'][who]:.2f} | "
                           f"{_split(e)} | {en} |")
            losers.append(_wins_losses(tag, label, run_))
            kib = run_.get("act_sram_kib", 4096)
            if kib != 4096:
                bigger.setdefault(tag, (kib, []))[1].append(
                    (label, run_.get("act_kib_needed") or {}))
    for tag, (kib, needs) in bigger.items():
        need = "; ".join(f"{label}: original {n['original']:.0f} KiB, hybrid {n['hybrid']:.0f} "
                         "KiB" for label, n in needs if n)
        out += ["", f"{tag} runs on variants of both designs with `memory.act_sram_kib: "
                f"{kib:.0f}` ({kib / 1024:g} MiB of activation SRAM instead of the shipped 4 "
                "MiB, which refuses the model with exit 2)" + (
                    f"; the largest on-chip activation footprint (a layer part's input + "
                    f"output) is {need}" if need else "") + ". The SRAM's energy per access "
                "is kept, so only the capacity differs (a bigger SRAM costs more per access "
                "in silicon, which this model charges to neither design)."]
    out += ["", "Where the hybrid wins and where it loses, against its own original (uJ per "
            "inference, by level; then the three layers that save the most and the three "
            "that add the most):", ""] + losers
    for path in args.knobs:
        out += _knob_section(path)
    for path in args.planner_check:
        out += _planner_lines(path)
    text = "\n".join(out)
    begin, end = "<!-- hw-models:begin -->", "<!-- hw-models:end -->"
    for doc in args.doc:
        body = open(doc).read()
        i, j = body.index(begin) + len(begin), body.index(end)
        with open(doc, "w") as fh:
            fh.write(body[:i] + "\n" + text + "\n" + body[j:])
        print(f"updated {doc}", file=sys.stderr)
    if not args.doc:
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
    m = sub.add_parser("models")
    m.add_argument("--case", nargs=3, action="append", required=True,
                   metavar=("TAG", "FLOAT", "INT8"),
                   help="model tag, float hybrid (.hfb.pt), int8 hybrid (.onnx)")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--act-sram-kib", action="append", default=[], metavar="TAG=KIB",
                   help="give this model's designs (baseline and hybrid) an activation SRAM "
                        "of KIB KiB instead of the shipped 4096 (repeatable)")
    m.add_argument("--append", action="store_true",
                   help="add these cases to the results already in --output")
    k = sub.add_parser("knobs")
    k.add_argument("--model", required=True, help="model tag for the results file")
    k.add_argument("--int8", required=True, help="int8 hybrid (.onnx or .hfb.pt)")
    k.add_argument("-o", "--output", required=True)
    mt = sub.add_parser("models-table")
    mt.add_argument("models_results")
    mt.add_argument("--knobs", nargs="*", default=[], help="knob results files")
    mt.add_argument("--doc", action="append", default=[],
                    help="replace the block between the hw-models markers of this file "
                         "(repeatable)")
    mt.add_argument("--planner-check", nargs="*", default=[],
                    help="planner-check results files")
    pc = sub.add_parser("planner-check")
    pc.add_argument("compressed", help=".hfb.pt made with --energy-model")
    pc.add_argument("--original", required=True)
    pc.add_argument("--accelerator", required=True)
    pc.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    a.command = "python -m bench.hw " + " ".join(sys.argv[1:] if argv is None else argv)
    return {"run": run, "table": table, "costs": costs, "models": models, "knobs": knobs,
            "models-table": models_table, "planner-check": planner_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
