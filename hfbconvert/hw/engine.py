"""Run layer workloads on a :class:`~hfbconvert.hw.spec.Design` with ZigZag, one part at a
time (results cached by shape), and combine the parts of a hybrid layer: the MAC array
(critical filters) and the adder array (``W_b`` then ``W_c``) run concurrently, so the
layer takes the longer of the two; energies add. A part ZigZag cannot map is priced by the
constants model (:func:`constants_part`) and marked ``engine: constants``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any

from ..errors import InputError
from .spec import MUL, Design
from .workload import Layer, Part

ENGINE = "zigzag"


def zigzag_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("zigzag-dse")
    except Exception:  # noqa: BLE001
        return None


def require_zigzag() -> None:
    if zigzag_version() is None:
        raise InputError("hfbconvert hw needs ZigZag: pip install 'hfbconvert[hw]' "
                         "(zigzag-dse, Python >= 3.11)")


def _zz_layer(p: Part) -> dict[str, Any]:
    if p.g > 1:
        eq = "O[b][g][oy][ox]+=W[g][fy][fx]*I[b][g][iy][ix]"
        dims, sizes = ["B", "G", "OY", "OX", "FY", "FX"], [1, p.g, p.oy, p.ox, p.fy, p.fx]
    else:
        eq = "O[b][k][oy][ox]+=W[k][c][fy][fx]*I[b][c][iy][ix]"
        dims = ["B", "K", "C", "OY", "OX", "FY", "FX"]
        sizes = [1, p.k, p.c, p.oy, p.ox, p.fy, p.fx]
    return {"id": 0, "name": "dw" if p.g > 1 else "layer", "operator_type": "Conv",
            "equation": eq,
            "dimension_relations": [f"ix={p.stride}*ox+1*fx", f"iy={p.stride}*oy+1*fy"],
            "loop_dims": dims, "loop_sizes": sizes,
            "operand_precision": {"W": p.w_bits, "I": p.i_bits, "O": p.o_bits,
                                  "O_final": p.of_bits},
            "operand_source": {"W": 0}}


def _mapping(cols: int, rows: int) -> list[dict[str, Any]]:
    links = {"O": "O", "W": "I2", "I": "I1"}
    return [{"name": "default", "spatial_mapping": {"D1": [f"K, {rows}"], "D2": [f"C, {cols}"]},
             "memory_operand_links": links},
            {"name": "dw", "spatial_mapping": {"D1": [f"G, {rows}"], "D2": [f"OX, {cols}"]},
             "memory_operand_links": links}]


class Engine:
    """ZigZag runner with a per-process cache keyed by (core, part shape)."""

    def __init__(self, lpf_limit: int = 4) -> None:
        self.lpf_limit = lpf_limit
        self.cache: dict[str, dict[str, Any]] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="hfb-hw-")

    def _write(self, name: str, obj: Any) -> str:
        import yaml

        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as fh:
            yaml.safe_dump(obj, fh, sort_keys=False)
        return path

    def run_part(self, des: Design, p: Part) -> dict[str, Any]:
        core = des.core(p.unit)
        layer = _zz_layer(p)
        key = json.dumps([core, layer], sort_keys=True)
        if key not in self.cache:
            try:
                self.cache[key] = self._zigzag(core, layer)
            except Exception as exc:  # noqa: BLE001 - any engine failure: constants fallback
                res = constants_part(des, p)
                res["fallback_reason"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                self.cache[key] = res
        res = dict(self.cache[key])
        # ternary parts: adders are gated on zero weights, so compute energy scales with
        # the non-zero fraction; cycles stay those of the dense schedule
        res["compute_pj"] = res["compute_pj"] * p.density
        res["energy_pj"] = res["compute_pj"] + res["onchip_pj"] + res["dram_pj"]
        return res

    def _zigzag(self, core: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
        from zigzag.mapping.temporal_mapping import TemporalMappingType
        from zigzag.stages.evaluation.cost_model_evaluation import CostModelStage
        from zigzag.stages.main import MainStage
        from zigzag.stages.mapping.spatial_mapping_generation import SpatialMappingGeneratorStage
        from zigzag.stages.mapping.temporal_mapping_generator_stage import (
            TemporalMappingGeneratorStage,
        )
        from zigzag.stages.parser.accelerator_parser import AcceleratorParserStage
        from zigzag.stages.parser.workload_parser import WorkloadParserStage
        from zigzag.stages.results.reduce_stages import MinimalLatencyStage
        from zigzag.stages.workload_iterator import WorkloadStage

        rows, cols = core["operational_array"]["sizes"]
        acc = self._write(f"{core['name']}.yaml", core)
        mapping = self._write(f"{core['name']}_map.yaml", _mapping(cols, rows))
        prev = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            stages = [WorkloadParserStage, AcceleratorParserStage, WorkloadStage,
                      MinimalLatencyStage, SpatialMappingGeneratorStage, MinimalLatencyStage,
                      TemporalMappingGeneratorStage, CostModelStage]
            ms = MainStage(stages, accelerator=acc, workload=[layer], mapping=mapping,
                           loma_lpf_limit=self.lpf_limit, loma_show_progress_bar=False,
                           nb_mappings_generated=3,
                           enable_mix_spatial_mapping_generation=False,
                           access_same_data_considered_as_no_access=True,
                           temporal_mapping_type=TemporalMappingType("uneven"))
            res = ms.run()
        finally:
            logging.disable(prev)
        cme = res[0][0]
        onchip = dram = 0.0
        by_op: dict[str, float] = {}
        for _op, levels in cme.mem_energy_breakdown.items():
            names = [lv.name for lv in cme.accelerator.memory_hierarchy.get_memory_levels(
                cme.memory_operand_links.layer_to_mem_op(_op))]
            for nm, e in zip(names, levels):
                if nm == "dram":
                    dram += float(e)
                else:
                    onchip += float(e)
                    by_op[str(_op)] = by_op.get(str(_op), 0.0) + float(e)
        return {"engine": ENGINE, "cycles": float(cme.latency_total2),
                "ideal_cycles": float(cme.ideal_cycle),
                "utilization": float(cme.mac_utilization1),
                "spatial_utilization": float(cme.mac_spatial_utilization),
                "compute_pj": float(cme.mac_energy), "onchip_pj": onchip, "dram_pj": dram,
                "onchip_by_operand_pj": by_op}


def constants_part(des: Design, p: Part) -> dict[str, Any]:
    """The constants model for one part (fallback): ideal cycles (ops / units), unit
    energy per op, one on-chip read of every input and write of every output, one DRAM read
    of every weight bit (no reuse modelled)."""
    n = des.units(p.unit)
    pj = (des.mac_unit if p.unit == "mac" else des.adder_unit)[0]
    m = des.memory
    a_in, a_out = p.act_bits_in_out()
    cyc = math.ceil(p.ops / max(n, 1))
    return {"engine": "constants", "cycles": float(cyc), "ideal_cycles": float(cyc),
            "utilization": p.ops / max(cyc * n, 1), "spatial_utilization": 1.0,
            "compute_pj": p.ops * pj,
            "onchip_pj": (a_in + a_out) / m["act_sram_bits"] * m["act_sram_pj"]
            + p.weight_bits() / m["weight_sram_bits"] * m["weight_sram_pj"],
            "dram_pj": p.weight_bits() / m["dram_bits"] * m["dram_pj"]}


def scale_energy_pj(des: Design, muls: int) -> float:
    """The hybrid's multiplications by ``a``: int32 MULs (requantization) for int8
    designs, MULs at the float precision otherwise. Priced by constants, done in the
    output pipeline (not on either array, so no cycles)."""
    key = "int32" if des.precision == "int8" else des.precision
    return muls * MUL[key][0]


def check_fits(des: Design, layers: list[Layer]) -> None:
    cap = des.memory["act_sram_kib"] * 8192
    for lay in layers:
        for p in lay.parts:
            a_in, a_out = p.act_bits_in_out()
            if a_in + a_out > cap:
                raise InputError(
                    f"model too large for {des.name}: layer {lay.name} needs "
                    f"{(a_in + a_out) / 8192:.0f} KiB of activations on chip, act_sram holds "
                    f"{des.memory['act_sram_kib']:.0f} KiB (raise memory.act_sram_kib)")


def evaluate(des: Design, layers: list[Layer], engine: Engine | None = None,
             progress_cb=None) -> dict[str, Any]:
    """Per-layer and total cycles, utilization and energy of ``layers`` on ``des``."""
    engine = engine or Engine()
    check_fits(des, layers)
    rows = []
    for i, lay in enumerate(layers):
        if progress_cb:
            progress_cb(i, len(layers), lay.name)
        parts = []
        for p in lay.parts:
            if p.unit == "adder" and des.n_adder == 0:
                p = _on_macs(p)
            r = engine.run_part(des, p)
            parts.append({"name": p.name, "unit": p.unit, "stage": p.stage, "ops": p.ops,
                          "density": p.density, **r})
        mac_cyc = sum(x["cycles"] for x in parts if x["unit"] == "mac")
        add_cyc = sum(x["cycles"] for x in parts if x["unit"] == "adder")
        cycles = max(mac_cyc, add_cyc)
        scale = scale_energy_pj(des, lay.scale_muls)
        compute = sum(x["compute_pj"] for x in parts) + scale
        onchip = sum(x["onchip_pj"] for x in parts)
        dram = sum(x["dram_pj"] for x in parts)
        mac_ops = sum(x["ops"] for x in parts if x["unit"] == "mac")
        add_ops = sum(x["ops"] for x in parts if x["unit"] == "adder")
        util = (mac_ops + add_ops) / max(cycles * (des.units("mac") + (
            des.units("adder") if des.n_adder else 0)), 1)
        rows.append({
            "name": lay.name, "kind": lay.kind, "cycles": cycles, "mac_cycles": mac_cyc,
            "adder_cycles": add_cyc, "mac_ops": mac_ops, "adder_ops": add_ops,
            "scale_muls": lay.scale_muls,
            "utilization": util,
            "mac_utilization": mac_ops / max(mac_cyc * des.units("mac"), 1) if mac_cyc else 0.0,
            "adder_utilization": (add_ops / max(add_cyc * des.units("adder"), 1)
                                  if add_cyc and des.n_adder else 0.0),
            "energy_pj": {"compute": compute, "onchip": onchip, "dram": dram,
                          "total": compute + onchip + dram, "scale_muls": scale},
            "engine": "constants" if any(x["engine"] != ENGINE for x in parts) else ENGINE,
            "parts": parts, **{k: v for k, v in lay.extra.items()}})
    tot_cyc = sum(r["cycles"] for r in rows)
    e = {k: sum(r["energy_pj"][k] for r in rows) for k in ("compute", "onchip", "dram", "total")}
    ops = sum(r["mac_ops"] + r["adder_ops"] for r in rows)
    n_units = des.units("mac") + (des.units("adder") if des.n_adder else 0)
    return {"accelerator": des.summary(), "engine": f"zigzag-dse {zigzag_version()}",
            "totals": {"cycles": tot_cyc, "energy_pj": e,
                       "mac_ops": sum(r["mac_ops"] for r in rows),
                       "adder_ops": sum(r["adder_ops"] for r in rows),
                       "utilization": ops / max(tot_cyc * n_units, 1),
                       "fallback_layers": [r["name"] for r in rows if r["engine"] != ENGINE]},
            "layers": rows}


def _on_macs(p: Part) -> Part:
    from dataclasses import replace

    return replace(p, unit="mac")
