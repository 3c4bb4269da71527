"""Cost model: MULs, ADDs, parameters, bytes and energy per inference, per layer.

Conventions (stated in every report):
- A dense conv/linear output needs (fan_in) MULs and (fan_in - 1) ADDs; bias additions
  are not counted (as in Howard et al.'s mult-add figures).
- A hybrid layer: critical rows as above; the SPN bank needs r MULs (``a``), plus one
  MUL per tolerant channel if it has a channel scale, and ADDs counted from the real
  non-zeros: Σ_rows max(nnz(W_b row) - 1, 0) + Σ_rows max(nnz(W_c row) - 1, 0).
- Bytes: full-precision weights (critical rows, stem, depthwise, classifier) at their
  storage ``weight_bits`` (32, 16, or 8 with one float32 scale per output channel;
  ``compress --weight-bits``), ternary weights at 2 bits packed four per byte, biases and
  ``a`` at ``fp_bits``. Weight-only storage: the arithmetic (energy) stays at ``fp_bits``.
- Energy: arithmetic only, from the 45 nm constants below (Horowitz, ISSCC 2014), plus
  a separate figure that adds one DRAM read per 32-bit word of weights.
- Int8 activations (``compress --activation-bits 8``, ``act_bits=8``): every
  multiply-accumulate is an int8 MUL into an int32 ADD; the hybrid's ``a`` (one per hidden
  unit) is an int32 MUL that brings the hidden unit to the scale W_c sums at (int32 hidden
  units, the default) or requantizes it to uint8 (``--hidden-bits 8``). Requantizing a
  layer's outputs (one multiplier per output value, BN and channel scales folded into it)
  is the same for every int8 model and not counted, so a hybrid with BN folded into its
  tolerant channel scales counts no MUL for them. uint8 hidden-unit scales differ by
  powers of two: one shift per hidden unit aligns the codes, counted as an ADD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .actquant import hidden_groups, model_act_bits
from .handlers import LayerHandler, is_hybrid, layer_modules
from .hybrid import HybridPointwise

# Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm), picojoules per operation.
ENERGY_PJ = {
    "fp32_mul": 3.7,
    "fp32_add": 0.9,
    "fp16_mul": 1.1,
    "fp16_add": 0.4,
    "int32_mul": 3.1,
    "int32_add": 0.1,
    "int8_mul": 0.2,
    "int8_add": 0.03,
    "dram_read_32bit": 640.0,
}
ENERGY_SOURCE = "Horowitz, ISSCC 2014, 45 nm"
TERNARY_BITS = 2


@dataclass
class LayerCost:
    name: str
    kind: str  # conv | depthwise | pointwise | linear | hybrid
    muls: int
    adds: int
    params: int
    bytes: float
    pixels: int = 1
    extra: dict = field(default_factory=dict)
    scale_muls: int = 0  # of ``muls``: per-hidden-unit/channel scales (``a``), not MACs

    def energy_pj(self, fp_bits: int = 32, act_bits: int = 32) -> float:
        if act_bits == 8:
            return ((self.muls - self.scale_muls) * ENERGY_PJ["int8_mul"]
                    + self.scale_muls * ENERGY_PJ["int32_mul"]
                    + self.adds * ENERGY_PJ["int32_add"])
        p = "fp32" if fp_bits == 32 else "fp16"
        return self.muls * ENERGY_PJ[f"{p}_mul"] + self.adds * ENERGY_PJ[f"{p}_add"]


@dataclass
class ModelCost:
    layers: list[LayerCost]
    fp_bits: int = 32
    weight_bits: int | None = None  # storage bits of FP weights; None: fp_bits
    act_bits: int = 32  # 8: int8 arithmetic (see the module docstring)

    @property
    def muls(self) -> int:
        return sum(c.muls for c in self.layers)

    @property
    def adds(self) -> int:
        return sum(c.adds for c in self.layers)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers)

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.layers)

    @property
    def energy_pj(self) -> float:
        return sum(c.energy_pj(self.fp_bits, self.act_bits) for c in self.layers)

    @property
    def energy_with_reads_pj(self) -> float:
        return self.energy_pj + self.bytes / 4 * ENERGY_PJ["dram_read_32bit"]

    @property
    def shift_adds(self) -> int:
        """ADDs that are int8 hidden units' power-of-two shifts (``--hidden-bits 8``): in
        ``adds`` and held to the ADD cap like the others (:func:`add_limit`), shown apart."""
        return sum(int(c.extra.get("shift_adds", 0)) for c in self.layers)

    def muls_by_bits(self) -> dict[str, int]:
        """Multiplications by arithmetic: MACs at the activation precision, and the scale
        MULs (``a``), which are int32 requantizations with int8 activations."""
        scale = sum(c.scale_muls for c in self.layers)
        if self.act_bits == 8:
            return {"int8": self.muls - scale, "int32": scale}
        return {f"fp{self.fp_bits}": self.muls}

    def by_name(self) -> dict[str, LayerCost]:
        return {c.name: c for c in self.layers}

    def totals(self) -> dict:
        return {
            "muls": self.muls, "adds": self.adds, "params": self.params,
            "bytes": self.bytes, "energy_pj": self.energy_pj,
            "energy_with_weight_reads_pj": self.energy_with_reads_pj,
            "fp_bits": self.fp_bits,
            "weight_bits": self.fp_bits if self.weight_bits is None else self.weight_bits,
            "activation_bits": self.act_bits,
            "muls_by_bits": self.muls_by_bits(),
            "energy_constants": dict(ENERGY_PJ),
            "energy_source": ENERGY_SOURCE,
        }

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "layers": [asdict(c) for c in self.layers]}


def shift_adds(r: int, pow2_hidden: bool) -> int:
    """ADDs per pixel of a bank's hidden-unit shifts: uint8 hidden units whose scales
    differ by powers of two (``--hidden-bits 8``) take one shift per hidden unit, counted
    as an ADD. The one rule for the cost model (``pow2_hidden``: the quantizer has more
    than one scale) and the planner (``pow2_hidden``: the plan's hidden units are uint8;
    a single shared scale, which needs none, is not known before calibration)."""
    return r if pow2_hidden else 0


def add_limit(original_adds: float, max_add_increase: float) -> float:
    """The most ADDs ``--max-add-increase`` allows. One rule for the planner's cap, the
    check of the fitted model and the report: every ADD the cost model counts (ternary
    non-zeros, critical rows, the rest of the network, hidden-unit shifts) is held to it."""
    return (1 + max_add_increase) * original_adds


def add_cap_use(adds: float, original_adds: float, max_add_increase: float) -> dict:
    """``adds`` against the ADD cap: the limit, the ratio to the original and whether the
    cap is met (:func:`add_limit`)."""
    limit = add_limit(original_adds, max_add_increase)
    return {"limit_adds": int(limit), "adds": int(adds),
            "ratio": adds / original_adds if original_adds else None, "met": adds <= limit}


def over_cap(used: float | None, cap: float | None) -> bool:
    """A fraction over its cap (size/energy budgets; a float tolerance for rounding):
    the report and compress's check say the same."""
    return used is not None and cap is not None and used > cap + 1e-9


def same_bits_energy(orig: dict, comp: dict) -> float | None:
    """The original's arithmetic energy at the compressed model's activation bits (what
    ``--energy-budget`` is a fraction of), from the two models' ``totals()``."""
    if comp.get("activation_bits") != 8:
        return orig.get("energy_pj")
    if orig.get("muls") is None or orig.get("adds") is None:
        return None
    return LayerCost("original", "dense", orig["muls"], orig["adds"], 0, 0.0
                     ).energy_pj(act_bits=8)


def energy_use(comp: dict, orig: dict, pricing: dict | None,
               energy_model: str | None) -> dict:
    """How much of ``--energy-budget`` a compressed model uses (``comp``, ``orig``: the
    two models' ``to_dict()``), by the model that priced the cap: the accelerator prices
    stored with the plan (``pricing``, ``--energy-model``), else the constants table; the
    constants table's arithmetic fraction either way. One function for compress's check
    and the report."""
    ct, ot = comp.get("totals") or {}, orig.get("totals") or {}
    ref = same_bits_energy(ot, ct)
    arith = None if ct.get("energy_pj") is None or not ref else ct["energy_pj"] / ref
    if not pricing:
        model = energy_model or "constants"
        # an accelerator-priced plan saved without its prices: unknown, not the table's
        return {"energy_model": model,
                "energy_fraction_used": arith if model == "constants" else None,
                "energy_fraction_used_constants": arith}
    from .hw.planner import priced_pj

    used, ref_pj = priced_pj(pricing, comp.get("layers") or []), pricing.get("reference_pj")
    return {"energy_model": pricing.get("accelerator"),
            "energy_fraction_used": None if used is None or not ref_pj else used / ref_pj,
            "energy_fraction_used_constants": arith}


def ternary_bytes(n: int) -> float:
    return math.ceil(n * TERNARY_BITS / 8)


def weight_bytes(numel: int, channels: int, weight_bits: int) -> float:
    """Storage of a full-precision weight tensor: ``weight_bits`` per value, plus one
    float32 scale per output channel at 8 bits (per-channel int8)."""
    if numel == 0:
        return 0.0
    return numel * weight_bits / 8 + (channels * 4 if weight_bits == 8 else 0)


def hybrid_cost(name: str, m: HybridPointwise, pixels: int, fp_bits: int = 32,
                weight_bits: int | None = None, act_bits: int = 32) -> LayerCost:
    """Cost of one hybrid layer counted from its real ternary non-zeros; the critical rows
    are stored at ``weight_bits`` (default ``fp_bits``). With int8 activations a channel
    scale merges into the output requantization (no MUL counted)."""
    wbits = fp_bits if weight_bits is None else weight_bits
    tb, _, tc = m.ternary_factors()
    n_c, n_t, c_in, r = m.n_critical, m.n_tolerant, m.c_in, m.r
    nnz_b = (tb != 0).sum(1) if n_t else torch.zeros(0)
    nnz_c = (tc != 0).sum(1) if n_t else torch.zeros(0)
    add_b = int((nnz_b - 1).clamp_min(0).sum())
    add_c = int((nnz_c - 1).clamp_min(0).sum())
    cs = n_t if m.channel_scale is not None else 0
    cs_muls = 0 if act_bits == 8 else cs
    shifts = shift_adds(r, act_bits == 8 and hidden_groups(m.hidden_quant) > 1)
    muls = pixels * (n_c * c_in + r + cs_muls)
    adds = pixels * (n_c * (c_in - 1) + add_b + add_c + shifts)
    fp_params = n_c * c_in + m.c_out + r + cs  # critical rows, bias, a, scales
    tern = r * c_in + n_t * r
    byts = (weight_bytes(n_c * c_in, n_c, wbits) + (m.c_out + r + cs) * fp_bits / 8
            + ternary_bytes(r * c_in) + ternary_bytes(n_t * r))
    return LayerCost(name, "hybrid", muls, adds, fp_params + tern, byts, pixels, scale_muls=
                     pixels * (r + cs_muls), extra={
        "critical": n_c, "tolerant": n_t, "r": r, "c_in": c_in, "c_out": m.c_out,
        "nnz_wb": int(nnz_b.sum()) if n_t else 0, "nnz_wc": int(nnz_c.sum()) if n_t else 0,
        "adds_wb": pixels * add_b, "adds_wc": pixels * add_c, "weight_bits": wbits,
        "shift_adds": pixels * shifts,
    })


@torch.no_grad()
def model_cost(model: nn.Module, resolution: int, fp_bits: int = 32,
               count_conv_bias: bool = True, weight_bits: int | None = None,
               act_bits: int | None = None) -> ModelCost:
    """Walk one forward pass and cost every layer a kind owns (``handlers``: convs,
    Linear, hybrid layers; each kind prices its dense form). Weights are
    stored at ``weight_bits``: by default the model's own (``compress --weight-bits``, see
    ``weightquant``), 32 for a model that was not rounded; ``fp_bits`` if given and lower.
    ``act_bits`` None: the model's own (8 after ``compress --activation-bits 8``)."""
    from .weightquant import model_weight_bits

    wbits = weight_bits if weight_bits is not None else min(model_weight_bits(model), fp_bits)
    abits = model_act_bits(model) if act_bits is None else int(act_bits)
    rows: list[LayerCost] = []
    hooks = []

    def make_hook(name: str, mod: nn.Module, h: LayerHandler):
        def hook(_m, inp, out):
            if is_hybrid(mod):
                rows.append(hybrid_cost(name, mod, h.pixels(out), fp_bits, wbits, abits))
            else:
                rows.append(h.dense_cost(name, mod, out, fp_bits, wbits, count_conv_bias))
        return hook

    for name, mod, h in layer_modules(model):
        hooks.append(mod.register_forward_hook(make_hook(name, mod, h)))
    was = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        model(torch.zeros(1, 3, resolution, resolution, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return ModelCost(rows, fp_bits, wbits, abits)
