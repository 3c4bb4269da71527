"""Accelerator-priced energy for the budget planner (``compress --energy-budget F
--energy-model NAME|FILE.yaml``).

The planner weighs about 130 (critical count, hidden-unit ratio) options per layer; running
ZigZag on every option's three parts would take thousands of engine calls. Instead each
planned layer's three parts are run once at the layer's full size (critical filters
``n_c = c_out``; ``W_b`` with ``r = c_out``; ``W_c`` ``c_out x c_out``) and the engine's
memory energy per operation of each part is kept; an option's energy is then

    Σ_parts ops_part · (unit_pJ · density_part + memory_pJ_per_op_part) + scale MULs,

exact at the anchor shape and linear in the part's operation count elsewhere (the same
per-op unit energies as ``hfbconvert hw``; ternary parts' compute scaled by the predicted
non-zero fraction, as the engine report does). Layers outside the plan and the reference
(the original model on the MAC-only baseline of equal area) are priced by the engine as a
whole. A part ZigZag cannot map is priced by the constants model and its layer is listed
in ``fallback_layers``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import InputError
from .engine import Engine, check_fits, evaluate, require_zigzag, scale_energy_pj
from .spec import Design, load_design
from .workload import Layer, dense_part, from_model, hybrid_parts


@dataclass
class LayerPrice:
    """Per-op energies (pJ) of one planned layer's parts on the design."""

    name: str
    c_in: int
    pixels: int
    critical_pj_per_op: float
    wb_mem_pj_per_op: float
    wc_mem_pj_per_op: float
    adder_pj: float
    engine: str = "zigzag"
    c_out: int = 0


@dataclass
class EnginePrices:
    design: Design
    layers: dict[str, LayerPrice]
    reference_pj: float          # the original model on the equal-area MAC-only baseline
    fixed_pj: float              # layers outside the plan, on the design
    fallback_layers: list[str] = field(default_factory=list)

    def option_pj(self, name: str, n_c: int, r: int, n_t: int, density: float,
                  density_c: float | None = None) -> float:
        """Energy (pJ per inference) of one planned layer with ``n_c`` critical filters and
        ``r`` hidden units for ``n_t`` tolerant filters; ``density``: W_b's non-zero
        fraction, ``density_c`` W_c's (default: the same)."""
        lp = self.layers[name]
        pix, c = lp.pixels, lp.c_in
        dc = density if density_c is None else density_c
        e = n_c * c * pix * lp.critical_pj_per_op
        if n_t and r:
            wb, wc = r * c * pix, n_t * r * pix
            e += wb * (lp.adder_pj * density + lp.wb_mem_pj_per_op)
            e += wc * (lp.adder_pj * dc + lp.wc_mem_pj_per_op)
            e += scale_energy_pj(self.design, r * pix)
        return e

    def plan_pj(self, lp) -> float:
        """:meth:`option_pj` of a :class:`~hfbconvert.plan.LayerPlan`."""
        return self.option_pj(lp.name, lp.n_critical, lp.r, lp.n_tolerant, lp.density)

    def summary(self) -> dict[str, Any]:
        return {"accelerator": self.design.name, "reference_pj": self.reference_pj,
                "fixed_pj": self.fixed_pj, "fallback_layers": list(self.fallback_layers)}

    def record(self, energy_model: str, plans: list, cap_pj: float) -> dict[str, Any]:
        """What the plan's energy cap was priced with, stored with the plan (``plan.
        energy_pricing``) so the report can price the finished model the same way
        (:func:`priced_pj`) without re-running the engine."""
        from .engine import zigzag_version

        return {"energy_model": energy_model, "accelerator": self.design.name,
                "engine": f"zigzag-dse {zigzag_version()}", "reference_pj": self.reference_pj,
                "fixed_pj": self.fixed_pj, "cap_pj": cap_pj,
                "predicted_pj": self.fixed_pj + sum(self.plan_pj(lp) for lp in plans),
                "scale_mul_pj": scale_energy_pj(self.design, 1),
                "fallback_layers": list(self.fallback_layers),
                "layers": {n: asdict(lp) for n, lp in self.layers.items()}}


def priced_pj(pricing: dict[str, Any], cost_layers: list[dict[str, Any]]) -> float | None:
    """A finished model's energy (pJ per inference) by the accelerator prices its plan was
    made with (:meth:`EnginePrices.record`): the layers outside the plan as priced then,
    each planned layer from its real critical count, hidden units and ternary non-zeros
    (``costs.hybrid_cost``'s ``extra``), a planned layer left dense as all-critical. None
    when a planned layer is missing from ``cost_layers``."""
    rows = {r.get("name"): r for r in cost_layers}
    e = float(pricing["fixed_pj"])
    for name, lp in pricing["layers"].items():
        row = rows.get(name)
        if row is None:
            return None
        pix, c = lp["pixels"], lp["c_in"]
        ex = row.get("extra") or {}
        if row.get("kind") != "hybrid":
            e += lp["c_out"] * c * pix * lp["critical_pj_per_op"]
            continue
        n_c, n_t, r = ex["critical"], ex["tolerant"], ex["r"]
        e += n_c * c * pix * lp["critical_pj_per_op"]
        if n_t and r:
            e += r * c * pix * lp["wb_mem_pj_per_op"] + n_t * r * pix * lp["wc_mem_pj_per_op"]
            e += lp["adder_pj"] * (ex["nnz_wb"] + ex["nnz_wc"]) * pix
            e += pricing["scale_mul_pj"] * r * pix
    return e


def _rebits(layers: list[Layer], act_bits: int, fp_bits: int) -> list[Layer]:
    """The same dense layers at the planned arithmetic (the model being planned may not
    carry its activation quantizers yet)."""
    out = []
    for lay in layers:
        p = lay.parts[0]
        out.append(Layer(lay.name, lay.kind, [dense_part(
            lay.name, lay.kind, p.k, p.c, p.g, p.ox, p.oy, p.fx, p.stride, act_bits,
            fp_bits)]))
    return out


def engine_prices(model, resolution: int, planned: list[str], energy_model: str,
                  act_bits: int, hidden_bits: int = 32,
                  engine: Engine | None = None) -> EnginePrices:
    """Price ``model``'s layers on the accelerator ``energy_model`` (a shipped name or a
    YAML file) for the planner. ``planned``: names of the layers the planner chooses
    options for."""
    des = load_design(energy_model, "energy_model")
    require_zigzag()
    want = "int8" if act_bits == 8 else None
    if want and des.precision != "int8":
        raise InputError(f"{{em}} {energy_model}: a {des.precision} design prices "
                         "float arithmetic; with {ab} 8 use an int8 design "
                         "(e.g. hybrid_int8)", em="energy_model", ab="activation_bits")
    if not want and des.precision == "int8":
        raise InputError(f"{{em}} {energy_model}: an int8 design needs {{ab}} 8",
                         em="energy_model", ab="activation_bits")
    fp_bits = 16 if des.precision == "fp16" else 32
    dense = _rebits(from_model(model, resolution, fp_bits), act_bits, fp_bits)
    names = {lay.name for lay in dense}
    missing = [n for n in planned if n not in names]
    if missing:
        raise InputError(f"{{em}}: no workload for layer(s) {', '.join(missing[:3])}",
                         em="energy_model")
    eng = engine or Engine()
    baseline = replace(des, mac_area_fraction=1.0)
    check_fits(baseline, dense)
    ref = evaluate(baseline, dense, eng)
    outside = [lay for lay in dense if lay.name not in set(planned)]
    out = evaluate(des, outside, eng) if outside else None
    fixed = out["totals"]["energy_pj"]["total"] if out else 0.0
    fallback = sorted(set(ref["totals"]["fallback_layers"])
                      | set(out["totals"]["fallback_layers"] if out else []))
    adder_unit = "adder" if des.hybrid else "mac"
    adder_pj = (des.adder_unit if des.hybrid else des.mac_unit)[0]
    prices = {}
    by_name = {lay.name: lay for lay in dense}
    for name in planned:
        p = by_name[name].parts[0]
        c_out, c_in = p.k, p.c
        parts = hybrid_parts(name, c_in, c_out, c_out, c_out, p.ox, p.oy, p.stride, act_bits,
                             fp_bits, hidden_bits, 1.0, 1.0)
        per: dict[str, float] = {}
        mark = "zigzag"
        for part in parts:
            if part.unit == "adder":
                part = replace(part, unit=adder_unit)
            res = eng.run_part(des, part)
            if res["engine"] != "zigzag":
                mark = "constants"
            mem = res["onchip_pj"] + res["dram_pj"]
            per[part.stage] = (res["compute_pj"] + mem if part.stage == "critical"
                               else mem) / max(part.ops, 1)
        if mark != "zigzag" and name not in fallback:
            fallback.append(name)
        prices[name] = LayerPrice(name, c_in, p.ox * p.oy, per["critical"], per["wb"],
                                  per["wc"], adder_pj, mark, c_out)
    return EnginePrices(des, prices, ref["totals"]["energy_pj"]["total"], fixed, fallback)
