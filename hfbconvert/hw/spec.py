"""Accelerator descriptions: hfbconvert's own small YAML format, validated field by field,
turned into one ZigZag core description per array (MAC array, adder array).

Unit costs (energy pJ per operation, area µm² per unit) are the 45 nm figures of
Horowitz, "Computing's energy problem", ISSCC 2014 (the table widely reproduced from the
talk; ``costs.ENERGY_PJ`` uses the energies of the same table). A MAC unit is one
multiplier plus one accumulator adder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError

HOROWITZ = "Horowitz, ISSCC 2014, 45 nm (energy pJ/op, area um^2)"
# (energy pJ, area µm²) per operation / unit
MUL = {"int8": (0.2, 282.0), "int32": (3.1, 3495.0), "fp16": (1.1, 1640.0), "fp32": (3.7, 7700.0)}
ADD = {"int8": (0.03, 36.0), "int16": (0.05, 67.0), "int32": (0.1, 137.0),
       "fp16": (0.4, 1360.0), "fp32": (0.9, 4184.0)}
# accumulator of a MAC unit: int8 products accumulate in int32; floats at their precision
ACC = {"int8": "int32", "fp16": "fp16", "fp32": "fp32"}
PRECISIONS = ("int8", "fp16", "fp32")
BITS = {"int8": 8, "fp16": 16, "fp32": 32}

MEMORY_DEFAULTS: dict[str, float] = {
    # on-chip activation buffer (inputs, outputs, the hybrid's hidden units)
    "act_sram_kib": 4096, "act_sram_bits": 1024, "act_sram_pj": 1600.0,
    # on-chip weight buffer, filled from DRAM
    "weight_sram_kib": 128, "weight_sram_bits": 512, "weight_sram_pj": 200.0,
    # DRAM (weights only: activations stay on chip, see docs/hardware.md)
    "dram_bits": 64, "dram_pj": 1280.0,
    # per-unit register files (one weight, one partial sum per unit)
    "rf_pj": 0.02,
}


def int_adder(bits: int) -> tuple[float, float]:
    """(pJ, µm²) of an integer adder of ``bits``: Horowitz's 8/16/32-bit points, linear
    in the width between them (and beyond 32 bits)."""
    pts = [(8, ADD["int8"]), (16, ADD["int16"]), (32, ADD["int32"])]
    if bits <= 8:
        return tuple(v * bits / 8 for v in ADD["int8"])  # type: ignore[return-value]
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if bits <= b1:
            t = (bits - b0) / (b1 - b0)
            return (v0[0] + t * (v1[0] - v0[0]), v0[1] + t * (v1[1] - v0[1]))
    return tuple(v * bits / 32 for v in ADD["int32"])  # type: ignore[return-value]


@dataclass
class Design:
    """One accelerator: a MAC array and, when ``mac_area_fraction`` < 1, an adder array
    sharing ``compute_area_um2`` with it, over one memory hierarchy."""

    name: str
    precision: str
    compute_area_um2: float
    mac_area_fraction: float = 1.0
    adder_bits: int = 32
    array_columns: int = 16
    mac_unit: tuple[float, float] = (0.0, 0.0)  # (pJ, µm²)
    adder_unit: tuple[float, float] = (0.0, 0.0)
    memory: dict[str, float] = field(default_factory=lambda: dict(MEMORY_DEFAULTS))
    source: str = ""
    description: str = ""

    @property
    def n_mac(self) -> int:
        return int(self.compute_area_um2 * self.mac_area_fraction // self.mac_unit[1])

    @property
    def n_adder(self) -> int:
        if self.mac_area_fraction >= 1:
            return 0
        return int(self.compute_area_um2 * (1 - self.mac_area_fraction) // self.adder_unit[1])

    @property
    def hybrid(self) -> bool:
        return self.n_adder > 0

    def areas(self) -> dict[str, float]:
        return {"mac_array_um2": self.n_mac * self.mac_unit[1],
                "adder_array_um2": self.n_adder * self.adder_unit[1],
                "budget_um2": self.compute_area_um2}

    def with_fraction(self, f: float) -> Design:
        if not 0 < f <= 1:
            raise InputError(f"{{fraction}} must be in (0, 1], got {f}",
                             fraction="mac_area_fraction")
        return replace(self, mac_area_fraction=float(f))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision,
                "compute_area_um2": self.compute_area_um2,
                "mac_area_fraction": self.mac_area_fraction, "n_mac": self.n_mac,
                "n_adder": self.n_adder, "adder_bits": self.adder_bits,
                "mac_unit": {"pj": self.mac_unit[0], "um2": self.mac_unit[1]},
                "adder_unit": {"pj": self.adder_unit[0], "um2": self.adder_unit[1]},
                "areas": self.areas(), "memory": dict(self.memory),
                "unit_cost_source": HOROWITZ, "source": self.source}

    # ------------------------------------------------------------------ ZigZag cores
    def core(self, unit: str) -> dict[str, Any]:
        """The ZigZag accelerator description of the ``unit`` ("mac" or "adder") array."""
        n = self.n_mac if unit == "mac" else self.n_adder
        pj = self.mac_unit[0] if unit == "mac" else self.adder_unit[0]
        um2 = self.mac_unit[1] if unit == "mac" else self.adder_unit[1]
        cols = max(1, min(self.array_columns, n))
        rows = max(1, n // cols)
        m = self.memory

        def port(name, typ, bw, alloc):
            return {"name": name, "type": typ, "bandwidth_min": int(bw), "bandwidth_max": int(bw),
                    "allocation": alloc}

        def mem(size, cost, bw, ops, served, ports):
            return {"size": int(size), "r_cost": float(cost), "w_cost": float(cost), "area": 0.0,
                    "latency": 1, "operands": ops, "ports": ports, "served_dimensions": served}

        rd = lambda ops: [f"{o}, tl" for o in ops] + (["O, th"] if "O" in ops else [])  # noqa: E731
        wr = lambda ops: [f"{o}, fh" for o in ops] + (["O, fl"] if "O" in ops else [])  # noqa: E731
        return {
            "name": f"{self.name}_{unit}",
            "memories": {
                "rf_w": mem(32, m["rf_pj"], 32, ["I2"], [],
                            [port("r_port_1", "read", 32, ["I2, tl"]),
                             port("w_port_1", "write", 32, ["I2, fh"])]),
                "rf_o": mem(32, m["rf_pj"], 32, ["O"], [],
                            [port("r_port_1", "read", 32, ["O, tl"]),
                             port("r_port_2", "read", 32, ["O, th"]),
                             port("w_port_1", "write", 32, ["O, fh"]),
                             port("w_port_2", "write", 32, ["O, fl"])]),
                "weight_sram": mem(m["weight_sram_kib"] * 8192, m["weight_sram_pj"],
                                   m["weight_sram_bits"], ["I2"], ["D1", "D2"],
                                   [port("r_port_1", "read", m["weight_sram_bits"], rd(["I2"])),
                                    port("w_port_1", "write", m["weight_sram_bits"], wr(["I2"]))]),
                "act_sram": mem(m["act_sram_kib"] * 8192, m["act_sram_pj"], m["act_sram_bits"],
                                ["I1", "O"], ["D1", "D2"],
                                [port("r_port_1", "read", m["act_sram_bits"], rd(["I1", "O"])),
                                 port("w_port_1", "write", m["act_sram_bits"],
                                      wr(["I1", "O"]))]),
                "dram": mem(10**10, m["dram_pj"], m["dram_bits"], ["I2"], ["D1", "D2"],
                            [port("rw_port_1", "read_write", m["dram_bits"],
                                  ["I2, fh", "I2, tl"])]),
            },
            "operational_array": {"unit_energy": float(pj), "unit_area": float(um2),
                                  "dimensions": ["D1", "D2"], "sizes": [rows, cols]},
        }

    def units(self, unit: str) -> int:
        c = self.core(unit)["operational_array"]["sizes"]
        return c[0] * c[1]


# ---------------------------------------------------------------------- YAML loading

_TOP = {"name": str, "precision": str, "compute_area_um2": (int, float),
        "mac_area_fraction": (int, float), "adder_bits": int, "array_columns": int,
        "mac_unit": dict, "adder_unit": dict, "memory": dict, "source": str,
        "description": str}
_REQUIRED = ("name", "precision", "compute_area_um2")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _units(d: dict, where: str, prec: str, abits: int) -> tuple[tuple[float, float],
                                                               tuple[float, float]]:
    """(pJ, um^2) of the MAC and adder units: Horowitz's for the precision and adder width,
    unless ``mac_unit`` / ``adder_unit`` override them."""
    mul_e, mul_a = MUL[prec]
    acc_e, acc_a = ADD[ACC[prec]]
    units = {"mac_unit": (mul_e + acc_e, mul_a + acc_a),
             "adder_unit": int_adder(abits) if prec == "int8" else ADD[prec]}
    for key, default in list(units.items()):
        if key in d:
            u = d[key]
            for f in u:
                if f not in ("energy_pj", "area_um2"):
                    raise InputError(f"{where}: unknown field '{key}.{f}' "
                                     "(allowed: energy_pj, area_um2)")
                if not _num(u[f]) or u[f] <= 0:
                    raise InputError(f"{where}: field '{key}.{f}' must be a positive number")
            units[key] = (float(u.get("energy_pj", default[0])),
                          float(u.get("area_um2", default[1])))
    return units["mac_unit"], units["adder_unit"]


def _memory(d: dict, where: str) -> dict[str, float]:
    """The memory hierarchy: the defaults with the file's ``memory`` fields, validated."""
    memory = dict(MEMORY_DEFAULTS)
    for k, v in (d.get("memory") or {}).items():
        if k not in MEMORY_DEFAULTS:
            raise InputError(f"{where}: unknown field 'memory.{k}' "
                             f"(allowed: {', '.join(MEMORY_DEFAULTS)})")
        if not _num(v) or v <= 0:
            raise InputError(f"{where}: field 'memory.{k}' must be a positive number, got {v!r}")
        memory[k] = v
    for k in ("act_sram_bits", "weight_sram_bits", "dram_bits"):
        if memory[k] != int(memory[k]) or memory[k] < 8:
            raise InputError(f"{where}: field 'memory.{k}' must be an integer >= 8")
    return memory


def design_from_dict(d: Any, where: str) -> Design:
    """Validate ``d`` (a parsed YAML mapping); InputError naming the field otherwise."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: an accelerator description must be a mapping of fields")
    for k in d:
        if k not in _TOP:
            raise InputError(f"{where}: unknown field {k!r} (allowed: {', '.join(_TOP)})")
    for k in _REQUIRED:
        if k not in d:
            raise InputError(f"{where}: missing required field {k!r}")
    for k, typ in _TOP.items():
        if k in d and (not isinstance(d[k], typ) or isinstance(d[k], bool)):
            raise InputError(f"{where}: field {k!r} has the wrong type ({type(d[k]).__name__})")
    prec = d["precision"]
    if prec not in PRECISIONS:
        raise InputError(f"{where}: field 'precision' must be one of {', '.join(PRECISIONS)}, "
                         f"got {prec!r}")
    if not _num(d["compute_area_um2"]) or d["compute_area_um2"] <= 0:
        raise InputError(f"{where}: field 'compute_area_um2' must be a positive number")
    frac = d.get("mac_area_fraction", 1.0)
    if not _num(frac) or not 0 < frac <= 1:
        raise InputError(f"{where}: field 'mac_area_fraction' must be in (0, 1], got {frac!r}")
    abits = d.get("adder_bits", 32)
    if not 2 <= abits <= 64:
        raise InputError(f"{where}: field 'adder_bits' must be in 2..64, got {abits!r}")
    cols = d.get("array_columns", 16)
    if cols < 1:
        raise InputError(f"{where}: field 'array_columns' must be >= 1, got {cols!r}")
    mac_unit, adder_unit = _units(d, where, prec, abits)
    memory = _memory(d, where)
    des = Design(name=d["name"], precision=prec, compute_area_um2=float(d["compute_area_um2"]),
                 mac_area_fraction=float(frac), adder_bits=int(abits), array_columns=int(cols),
                 mac_unit=mac_unit, adder_unit=adder_unit, memory=memory,
                 source=d.get("source", ""), description=d.get("description", ""))
    if des.n_mac < 1:
        raise InputError(f"{where}: field 'compute_area_um2' leaves no room for one MAC unit "
                         f"({mac_unit[1]} um^2) at mac_area_fraction {frac}")
    return des


SHIPPED_DIR = Path(__file__).with_name("accelerators")


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def load_design(name_or_path: str, field: str = "accelerator") -> Design:
    """A shipped accelerator by name, or a YAML file; ``field`` is the setting that named
    it (for the error message)."""
    import yaml

    ships = shipped()
    p = ships.get(name_or_path) or Path(name_or_path)
    if not p.is_file():
        raise InputError(f"{{field}} {name_or_path}: neither a shipped accelerator "
                         f"({', '.join(ships)}) nor a readable .yaml file", field=field)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{p}: not a readable YAML file ({_first_line(exc)})") from None
    return design_from_dict(data, str(p))


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def baseline_for(des: Design) -> Design:
    """The MAC-only design of the same area and precision (the hybrid's comparison)."""
    return replace(des, name=des.name.replace("hybrid", "mac") + "_baseline"
                   if "hybrid" in des.name else des.name, mac_area_fraction=1.0)
