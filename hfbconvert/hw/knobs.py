"""What-if knobs on a hybrid's accelerator workload (issue 19: which knob would get the
int8 hybrid to the energy goal): hidden units per tolerant filter and adder width. They
change the workload and the design only; the accuracy at the changed setting is not
measured by them (``compress --hidden-units-ratio`` / ``--hidden-bits 8`` are the real
conversions that approach these points)."""

from __future__ import annotations

from dataclasses import replace

from ..errors import InputError
from .spec import Design, int_adder
from .workload import Layer


def scale_hidden_units(layers: list[Layer], scale: float) -> list[Layer]:
    """Every hybrid layer with ``r`` scaled by ``scale`` (at least 1 hidden unit): ``W_b``
    gets ``r'`` outputs, ``W_c`` ``r'`` inputs, and the scale MULs by ``a`` follow; ternary
    densities stay as measured."""
    if scale <= 0:
        raise InputError(f"hidden-unit scale must be > 0, got {scale}")
    out = []
    for lay in layers:
        if lay.kind != "hybrid" or not lay.extra.get("r"):
            out.append(lay)
            continue
        r = max(1, round(scale * lay.extra["r"]))
        parts, pix = [], 1
        for p in lay.parts:
            if p.stage == "wb":
                p, pix = replace(p, k=r), p.ox * p.oy
            elif p.stage == "wc":
                p = replace(p, c=r)
            parts.append(p)
        out.append(replace(lay, parts=parts, scale_muls=r * pix if lay.scale_muls else 0,
                           extra={**lay.extra, "r": r}))
    return out


def adder_width(des: Design, layers: list[Layer], bits: int) -> tuple[Design, list[Layer]]:
    """An int8 design whose adders are ``bits`` wide (unit energy and area from
    :func:`~hfbconvert.hw.spec.int_adder`, so more of them fit the same area), and the
    ternary parts' partial sums and hidden units at that width (``W_b``'s output, ``W_c``'s
    input); the stored int8 outputs stay 8-bit."""
    if des.precision != "int8":
        raise InputError("the adder-width knob applies to int8 designs (float adders are "
                         "priced at the design's precision)")
    if not 2 <= bits <= 64:
        raise InputError(f"adder width must be in 2..64, got {bits}")
    des = replace(des, adder_bits=bits, adder_unit=int_adder(bits))
    out = []
    for lay in layers:
        parts = []
        for p in lay.parts:
            if p.stage == "wb":
                p = replace(p, o_bits=min(p.o_bits, bits), of_bits=min(p.of_bits, bits))
            elif p.stage == "wc":
                p = replace(p, i_bits=min(p.i_bits, bits), o_bits=min(p.o_bits, bits))
            parts.append(p)
        out.append(replace(lay, parts=parts))
    return des, out
