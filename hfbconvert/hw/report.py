"""``hfbconvert hw``: the original on the MAC-only baseline and the hybrid on the
area-equivalent MAC + adder design, per layer and in total, with the constants model
(``costs.py``: arithmetic only, plus weight reads from DRAM) side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from .engine import Engine, evaluate
from .spec import Design, load_design
from .workload import Layer, dense_part, from_model, from_onnx


def original_of(layers: list[Layer]) -> list[Layer]:
    """The original network's workload: every hybrid layer back to a dense pointwise layer
    of the same shape (c_in -> c_out over the same pixels), the rest unchanged."""
    out = []
    for lay in layers:
        if lay.kind != "hybrid":
            out.append(lay)
            continue
        p0 = lay.parts[0]
        ref = next((p for p in lay.parts if p.stage in ("critical", "wb")), p0)
        act_bits = 8 if ref.i_bits == 8 else ref.i_bits
        fp_bits = ref.i_bits if act_bits != 8 else 32
        kind = "linear" if ref.ox * ref.oy == 1 else "pointwise"
        p = dense_part(lay.name, kind, lay.extra["c_out"], lay.extra["c_in"], 1, ref.ox, ref.oy,
                       1, ref.stride, act_bits, fp_bits)
        out.append(Layer(lay.name, kind, [p]))
    return out


def load_layers(path: str, trust_pickle: bool = False) -> tuple[list[Layer], str]:
    """Workload of ``path``: an exported .onnx (what ships), else a .hfb.pt / plain model."""
    if str(path).lower().endswith(".onnx"):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        return from_onnx(path), "onnx"
    from ..cli import _load_any

    net, info, _meta = _load_any(path, None, trust_pickle)
    return from_model(net, info.resolution), "pytorch"


def run_hw(model: str, accelerator: str | Design, mac_area_fraction: float | None = None,
           original: str | None = None, trust_pickle: bool = False,
           progress_cb=None, engine: Engine | None = None,
           layers: list[Layer] | None = None) -> dict[str, Any]:
    """``engine``: share one engine's cache across calls (sweeps); ``layers``: a workload
    already loaded (or transformed, bench/hw.py's knobs) instead of reading ``model``."""
    design = accelerator if isinstance(accelerator, Design) else load_design(accelerator)
    if mac_area_fraction is not None:
        design = design.with_fraction(mac_area_fraction)
    if layers is None:
        layers, source = load_layers(model, trust_pickle)
    else:
        source = "given"
    is_hybrid = any(lay.kind == "hybrid" for lay in layers)
    if original is not None:
        orig_layers, _ = load_layers(original, trust_pickle)
    else:
        orig_layers = original_of(layers)
    baseline = replace(design, mac_area_fraction=1.0,
                       name=design.name.replace("hybrid", "mac") + "_equal_area"
                       if design.hybrid else design.name)
    eng = engine or Engine()
    base = evaluate(baseline, orig_layers, eng, progress_cb)
    hyb = evaluate(design, layers, eng, progress_cb) if is_hybrid else None
    rep: dict[str, Any] = {"model": str(model), "workload_source": source,
                           "original_on_baseline": base, "hybrid_on_design": hyb,
                           "constants_model": _constants(layers, orig_layers, design)}
    if hyb:
        bt, ht = base["totals"], hyb["totals"]
        rep["comparison"] = {
            "cycles_ratio": ht["cycles"] / bt["cycles"],
            "energy_ratio": ht["energy_pj"]["total"] / bt["energy_pj"]["total"],
            "energy_saving": 1 - ht["energy_pj"]["total"] / bt["energy_pj"]["total"],
            "compute_energy_ratio": ht["energy_pj"]["compute"] / bt["energy_pj"]["compute"],
        }
    return rep


def _constants(layers: list[Layer], orig: list[Layer], des: Design) -> dict[str, Any]:
    """The arithmetic-only view (costs.py's convention: every op at its unit energy, zero
    ternary weights skipped), on the same workload, for comparison with the engine."""
    def arith(ls: list[Layer], d: Design) -> float:
        e = 0.0
        for lay in ls:
            for p in lay.parts:
                unit = d.mac_unit if p.unit == "mac" or not d.hybrid else d.adder_unit
                e += p.ops * p.density * unit[0]
        from .engine import scale_energy_pj

        return e + sum(scale_energy_pj(d, lay.scale_muls) for lay in ls)
    a0, a1 = arith(orig, des), arith(layers, des)
    return {"assumption": "arithmetic only: MAC/adder unit energy per op (zero ternary weights "
                          "skipped), scale MULs by a; no memory", "original_pj": a0,
            "hybrid_pj": a1, "saving": 1 - a1 / a0 if a0 else 0.0}


def _uj(pj: float) -> str:
    return f"{pj / 1e6:.2f}"


def markdown(rep: dict[str, Any]) -> str:
    base, hyb = rep["original_on_baseline"], rep["hybrid_on_design"]
    lines = []
    bd = base["accelerator"]
    lines.append(f"Original on {bd['name']} ({bd['n_mac']} {bd['precision']} MACs, "
                 f"{bd['compute_area_um2']:.0f} um^2)" + (
                     f"; hybrid on {hyb['accelerator']['name']} ({hyb['accelerator']['n_mac']} "
                     f"MACs + {hyb['accelerator']['n_adder']} {hyb['accelerator']['adder_bits']}"
                     f"-bit adders, MAC area fraction "
                     f"{hyb['accelerator']['mac_area_fraction']:.2f})" if hyb else "")
                 + f". Engine: {base['engine']}; energies in uJ.")
    lines.append("")
    hdr = "| layer | kind | cycles orig | util orig | E orig (comp/on-chip/DRAM) |"
    sep = "|---|---|---:|---:|---|"
    if hyb:
        hdr += " cycles hyb (MAC/adder) | util hyb | E hyb (comp/on-chip/DRAM) | engine |"
        sep += "---:|---:|---|---|"
    lines += [hdr, sep]
    hrows = {r["name"]: r for r in (hyb["layers"] if hyb else [])}

    def e3(r):
        e = r["energy_pj"]
        return f"{_uj(e['compute'])} / {_uj(e['onchip'])} / {_uj(e['dram'])}"
    for r in base["layers"]:
        row = (f"| {r['name']} | {r['kind']} | {r['cycles']:.0f} | {r['utilization']:.2f} | "
               f"{e3(r)} |")
        h = hrows.get(r["name"])
        if hyb and h:
            row += (f" {h['cycles']:.0f} ({h['mac_cycles']:.0f}/{h['adder_cycles']:.0f}) | "
                    f"{h['utilization']:.2f} | {e3(h)} | {h['engine']} |")
        lines.append(row)
    bt = base["totals"]
    tot = (f"| **total** | | {bt['cycles']:.0f} | {bt['utilization']:.2f} | "
           f"{_uj(bt['energy_pj']['compute'])} / {_uj(bt['energy_pj']['onchip'])} / "
           f"{_uj(bt['energy_pj']['dram'])} = {_uj(bt['energy_pj']['total'])} |")
    if hyb:
        ht = hyb["totals"]
        tot += (f" {ht['cycles']:.0f} | {ht['utilization']:.2f} | "
                f"{_uj(ht['energy_pj']['compute'])} / {_uj(ht['energy_pj']['onchip'])} / "
                f"{_uj(ht['energy_pj']['dram'])} = {_uj(ht['energy_pj']['total'])} | |")
    lines.append(tot)
    if hyb:
        c = rep["comparison"]
        k = rep["constants_model"]
        lines += ["", f"Hybrid vs original: cycles x{c['cycles_ratio']:.2f}, energy "
                  f"x{c['energy_ratio']:.2f} ({100 * c['energy_saving']:+.1f}% saved); "
                  f"arithmetic-only constants model: {100 * k['saving']:+.1f}% saved."]
    fb = (hyb or base)["totals"]["fallback_layers"] + base["totals"]["fallback_layers"]
    if fb:
        lines.append(f"Layers priced by the constants model (engine could not map them): "
                     f"{', '.join(sorted(set(fb)))}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------- HTML (report --hw)
LEVELS = (("compute", "#4c72b0"), ("onchip", "#dd8452"), ("dram", "#55a868"))


def _svg_bars(rows: list[tuple[str, dict[str, float]]], title: str, width: int = 720,
              bar_h: int = 14, gap: int = 6) -> str:
    """Horizontal stacked bars (compute / on-chip / DRAM energy) as inline SVG: no
    plotting dependency, one self-contained page."""
    import html

    label_w, right = 230, 70
    scale_w = width - label_w - right
    top = max((sum(v[k] for k, _ in LEVELS) for _, v in rows), default=0.0) or 1.0
    h = 28 + len(rows) * (bar_h + gap) + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
           f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" '
           'font-size="11">', f'<text x="0" y="14" font-weight="bold">{html.escape(title)}'
           '</text>']
    y = 28
    for name, e in rows:
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end">'
                   f'{html.escape(name)}</text>')
        x = float(label_w)
        for key, colour in LEVELS:
            w = scale_w * e[key] / top
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0):.1f}" height="{bar_h}" '
                       f'fill="{colour}"><title>{key}: {e[key] / 1e6:.2f} uJ</title></rect>')
            x += w
        total = sum(e[k] for k, _ in LEVELS)
        out.append(f'<text x="{x + 4:.1f}" y="{y + bar_h - 3}">{total / 1e6:.1f} uJ</text>')
        y += bar_h + gap
    x = label_w
    for key, colour in LEVELS:
        out.append(f'<rect x="{x}" y="{y + 4}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{y + 13}">{"on-chip" if key == "onchip" else key}'
                   '</text>')
        x += 90
    out.append("</svg>")
    return "".join(out)


def html_section(rep: dict[str, Any]) -> str:
    """The hardware section of the HTML report: totals, the energy split per design and
    per layer (inline SVG), from an ``hfbconvert hw`` JSON report."""
    import html

    base, hyb = rep["original_on_baseline"], rep.get("hybrid_on_design")
    runs = [("original on " + base["accelerator"]["name"], base)]
    if hyb:
        runs.append(("hybrid on " + hyb["accelerator"]["name"], hyb))
    rows = ["<tr><th>design</th><th>MACs + adders</th><th>cycles</th><th>utilization</th>"
            "<th>energy uJ (compute / on-chip / DRAM = total)</th></tr>"]
    for name, ev in runs:
        a, t = ev["accelerator"], ev["totals"]
        e = t["energy_pj"]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{a['n_mac']} + {a['n_adder']}</td>"
                    f"<td>{t['cycles']:.0f}</td><td>{t['utilization']:.2f}</td><td>"
                    f"{_uj(e['compute'])} / {_uj(e['onchip'])} / {_uj(e['dram'])} = "
                    f"{_uj(e['total'])}</td></tr>")
    parts = ["<h2>Hardware (accelerator model)</h2>",
             f"<p><small>{html.escape(base['engine'])}; model "
             f"{html.escape(str(rep.get('model', '')))}; see docs/hardware.md for what is "
             "modelled.</small></p>", "<table>" + "".join(rows) + "</table>",
             _svg_bars([(n, ev["totals"]["energy_pj"]) for n, ev in runs],
                       "Energy per inference")]
    if hyb:
        c = rep["comparison"]
        parts.append(f"<p>Hybrid vs original: cycles x{c['cycles_ratio']:.2f}, energy "
                     f"x{c['energy_ratio']:.2f}; arithmetic-only constants model: "
                     f"{100 * rep['constants_model']['saving']:+.1f}% saved.</p>")
        orig = {r["name"]: r for r in base["layers"]}
        per = []
        for r in hyb["layers"]:
            if r["kind"] == "hybrid" and r["name"] in orig:
                per += [(r["name"] + " (orig)", orig[r["name"]]["energy_pj"]),
                        (r["name"] + " (hybrid)", r["energy_pj"])]
        if per:
            parts.append(_svg_bars(per, "Energy per hybrid layer, original vs hybrid"))
        fb = hyb["totals"]["fallback_layers"] + base["totals"]["fallback_layers"]
        if fb:
            parts.append("<p>Priced by the constants model (the engine could not map them): "
                         + html.escape(", ".join(sorted(set(fb)))) + ".</p>")
    return "\n".join(parts)


def check_hw_report(data: Any, where: str) -> dict[str, Any]:
    """A parsed ``hfbconvert hw`` JSON report, or InputError naming what is missing."""
    if not isinstance(data, dict) or not isinstance(data.get("original_on_baseline"), dict):
        raise InputError(f"{where}: not an 'hfbconvert hw' JSON report (no "
                         "original_on_baseline)")
    for key in ("totals", "layers", "accelerator"):
        if key not in data["original_on_baseline"]:
            raise InputError(f"{where}: original_on_baseline has no {key!r}")
    if data.get("hybrid_on_design") and "comparison" not in data:
        raise InputError(f"{where}: a hybrid_on_design without 'comparison'")
    return data
