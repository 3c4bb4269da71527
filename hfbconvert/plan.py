"""Budget planner: how many critical filters and hidden units each pointwise layer gets.

Per layer and option (critical count n_c, hidden-unit ratio ρ = r / n_tolerant) the
predicted error is the share of the layer's output energy that its tolerant filters lose,

    err = Σ_{j tolerant} L_j(ρ)·‖w_j‖²_Σ / Σ_j ‖w_j‖²_Σ,

the critical filters being those with the largest L_j(ρ)·‖w_j‖²_Σ. The planner minimizes
Σ_layers λ_ℓ·err_ℓ (λ_ℓ: measured fragility of the layer, how much the logits move per
unit of relative weight error) subject to the MUL budget, by a Lagrangian relaxation of
the multiple-choice knapsack (bisection on the MUL price) followed by a greedy fill.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .costs import LayerCost, add_limit, shift_adds, ternary_bytes, weight_bytes
from .errors import ConfigError, InputError
from .layers import PointwiseLayer

CRITICAL_STEPS = 32  # critical-fraction grid resolution (n_c multiples of c_out/32)
ASSUMED_DENSITY = 0.7  # W_b non-zero fraction used to predict ADDs before fitting


@dataclass
class LayerPlan:
    name: str
    n_critical: int
    r: int
    critical_idx: list[int]
    c_in: int = 0
    c_out: int = 0
    pixels: int = 1
    predicted_err: float = 0.0
    extra: dict = field(default_factory=dict)
    density: float = ASSUMED_DENSITY  # W_b non-zero fraction the ADD prediction uses
    hidden_bits: int = 32  # 8: uint8 hidden units, one shift ADD each (costs.shift_adds)

    @property
    def n_tolerant(self) -> int:
        return self.c_out - self.n_critical

    def predicted_muls(self) -> int:
        return self.pixels * (self.n_critical * self.c_in + self.r)

    def predicted_adds(self, density: float | None = None) -> int:
        density = self.density if density is None else density
        n_t = self.n_tolerant
        per = self.n_critical * (self.c_in - 1)
        if n_t:
            per += self.r * max(density * self.c_in - 1, 0) + max(self.r - n_t, 0)
            per += shift_adds(self.r, self.hidden_bits == 8)
        return int(self.pixels * per)

    def predicted_bytes(self, weight_bits: int = 32, fp_bits: int = 32) -> float:
        """Stored bytes as ``costs.hybrid_cost`` counts them (no channel scales)."""
        n_t = self.n_tolerant
        return (weight_bytes(self.n_critical * self.c_in, self.n_critical, weight_bits)
                + (self.c_out + self.r) * fp_bits / 8
                + ternary_bytes(self.r * self.c_in) + ternary_bytes(n_t * self.r))

    def predicted_energy_pj(self, fp_bits: int = 32, act_bits: int = 32) -> float:
        """Arithmetic energy as ``costs.LayerCost.energy_pj`` prices it (ADDs predicted)."""
        scale = self.pixels * self.r
        return LayerCost(self.name, "hybrid", self.predicted_muls(), self.predicted_adds(), 0,
                         0.0, self.pixels, scale_muls=scale).energy_pj(fp_bits, act_bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["hidden_bits"] == 32:  # the default: plans written before it read the same
            del d["hidden_bits"]
        return d


@dataclass
class Plan:
    method: str
    layers: list[LayerPlan]
    budget: float | None = None
    fixed_muls: int = 0  # MULs outside pointwise layers (stem, depthwise)
    original_muls: int = 0
    original_adds: int = 0
    notes: list[str] = field(default_factory=list)
    # --energy-model: the accelerator prices the energy cap was set with
    # (hw.planner.EnginePrices.record), so the report prices the result the same way
    energy_pricing: dict | None = None
    # only when the MILP did not prove its plan optimal (time limit, no solution, no scipy):
    # {"status", "gap", "time_limit_s", "node_limit", "used"}, see exact_choice
    milp: dict | None = None

    def predicted_muls(self) -> int:
        return self.fixed_muls + sum(lp.predicted_muls() for lp in self.layers)

    def to_dict(self) -> dict:
        d = {"method": self.method, "budget": self.budget, "fixed_muls": self.fixed_muls,
             "original_muls": self.original_muls, "original_adds": self.original_adds,
             "predicted_muls": self.predicted_muls(), "notes": self.notes,
             "layers": [lp.to_dict() for lp in self.layers]}
        if self.energy_pricing is not None:
            d["energy_pricing"] = self.energy_pricing
        if self.milp is not None:
            d["milp"] = self.milp
        return d

    @staticmethod
    def from_dict(d: dict) -> Plan:
        layers = [LayerPlan(**lp) for lp in d["layers"]]
        return Plan(d["method"], layers, d.get("budget"), d.get("fixed_muls", 0),
                    d.get("original_muls", 0), d.get("original_adds", 0), d.get("notes", []),
                    d.get("energy_pricing"), d.get("milp"))


def _ranked(curve: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter order (most critical first) and cumulative tolerant error for each n_c."""
    contrib = curve * energy
    order = torch.argsort(contrib, descending=True, stable=True)
    total = energy.sum().clamp_min(1e-30)
    # err(n_c) = (sum of contrib of all but the first n_c) / total
    csum = torch.cat([torch.zeros(1, dtype=contrib.dtype), torch.cumsum(contrib[order], 0)])
    err = (contrib.sum() - csum) / total
    return order, err


def uniform_plan(layers: list[PointwiseLayer], curves: dict[str, torch.Tensor],
                 energies: dict[str, torch.Tensor], budgets: tuple[int, ...],
                 critical_fraction: float, ratio: float, method: str = "hybrid") -> list[LayerPlan]:
    """Paper-style: the same critical fraction and hidden-unit ratio in every layer."""
    out = []
    for ly in layers:
        n = ly.c_out
        n_c = min(n, int(round(critical_fraction * n)))
        col = _budget_column(budgets, ratio)
        order, err = _ranked(curves[ly.name][:, col].double(), energies[ly.name].double())
        n_t = n - n_c
        r = int(math.ceil(ratio * n_t)) if n_t else 0
        out.append(LayerPlan(ly.name, n_c, r, sorted(order[:n_c].tolist()), ly.c_in, n,
                             ly.pixels, float(err[n_c])))
    return out


def _budget_column(budgets: tuple[int, ...], ratio: float) -> int:
    """Sensitivity column for a hidden-unit ratio ρ: the largest budget ≤ ρ (≥ 1)."""
    best = 0
    for i, b in enumerate(budgets):
        if b <= max(ratio, 1.0) + 1e-9:
            best = i
    return best


class _Opt(NamedTuple):
    muls: int
    adds: int
    bytes: float
    energy: float  # pJ of arithmetic per inference
    werr: float  # fragility-weighted predicted error
    n_c: int
    r: int
    order: torch.Tensor
    err: float
    density: float
    hidden_bits: int = 32

    def use(self, k: int) -> float:
        """Resource k of the caps: 0 ADDs, 1 bytes, 2 energy."""
        return (self.adds, self.bytes, self.energy)[k]


CAP_NAMES = ("ADD cap", "size budget", "energy budget")
CAP_FIELDS = ("max_add_increase", "max_bytes", "max_energy_pj")  # ConfigError.field


def plan_caps(layers: list[PointwiseLayer], original_adds: int, max_add_increase: float,
              max_bytes: float | None = None, fixed_bytes: float = 0.0,
              max_energy_pj: float | None = None, fixed_energy_pj: float = 0.0) -> list[float]:
    """What the planned layers may use of ADDs, bytes and energy (the rest of the model's
    share subtracted)."""
    fixed_adds = original_adds - sum(ly.pixels * ly.c_out * (ly.c_in - 1) for ly in layers)
    return [add_limit(original_adds, max_add_increase) - fixed_adds,
            math.inf if max_bytes is None else max_bytes - fixed_bytes,
            math.inf if max_energy_pj is None else max_energy_pj - fixed_energy_pj]


def plan_options(layers: list[PointwiseLayer], curves: dict[str, torch.Tensor],
                 energies: dict[str, torch.Tensor], fragility: dict[str, float],
                 budgets: tuple[int, ...], ratios: tuple[float, ...] = (1.0, 2.0),
                 densities: dict[str, torch.Tensor] | None = None, *,
                 weight_bits: int = 32, fp_bits: int = 32,
                 act_bits: int = 32,
                 energy_fn: Callable[[LayerPlan], float] | None = None,
                 density_scale: dict[str, float] | None = None,
                 hidden_bits: int = 32) -> list[list[_Opt]]:
    """Every (n_c, ρ) choice of every layer with its MULs, ADDs, bytes, energy and
    fragility-weighted predicted error: the multiple-choice knapsack that
    :func:`budget_plan` solves (and ``bench/planner_exact.py`` solves exactly).
    ``energy_fn`` prices an option's energy (pJ) instead of the constants table (the
    accelerator model, :mod:`hfbconvert.hw.planner`). ``density_scale`` multiplies a
    layer's predicted W_b density: the measured/predicted ratio of the codes the layer fit
    produced (:func:`hfbconvert.stages.add_cap`), which the sensitivity fit's density
    need not match. ``hidden_bits`` 8: each hidden unit's shift is an ADD
    (:func:`hfbconvert.costs.shift_adds`), priced in the option's ADDs and energy."""
    opts: list[list[_Opt]] = []
    for ly in layers:
        lam = fragility.get(ly.name, 1.0)
        lo = []
        for rho in ratios:
            col = _budget_column(budgets, rho)
            order, err = _ranked(curves[ly.name][:, col].double(), energies[ly.name].double())
            dens = ASSUMED_DENSITY
            if densities is not None and ly.name in densities:
                # measured W_b density of the filters most likely tolerant (a little margin)
                dens = min(1.0, 1.05 * float(densities[ly.name][:, col].mean()))
            if density_scale and ly.name in density_scale:
                dens = min(1.0, dens * density_scale[ly.name])
            grid = sorted({int(round(ly.c_out * i / CRITICAL_STEPS))
                           for i in range(CRITICAL_STEPS + 1)})
            for n_c in grid:
                n_t = ly.c_out - n_c
                r = int(math.ceil(rho * n_t)) if n_t else 0
                lp = LayerPlan(ly.name, n_c, r, [], ly.c_in, ly.c_out, ly.pixels, float(err[n_c]),
                               density=dens, hidden_bits=hidden_bits)
                lo.append(_Opt(lp.predicted_muls(), lp.predicted_adds(),
                               lp.predicted_bytes(weight_bits, fp_bits),
                               energy_fn(lp) if energy_fn else
                               lp.predicted_energy_pj(fp_bits, act_bits), lam * float(err[n_c]),
                               n_c, r, order, float(err[n_c]), dens, hidden_bits))
        opts.append(lo)
    return opts


def budget_plan(layers: list[PointwiseLayer], curves: dict[str, torch.Tensor],
                energies: dict[str, torch.Tensor], fragility: dict[str, float],
                budgets: tuple[int, ...], budget: float, fixed_muls: int, original_muls: int,
                original_adds: int, max_add_increase: float,
                ratios: tuple[float, ...] = (1.0, 2.0),
                densities: dict[str, torch.Tensor] | None = None, *,
                max_bytes: float | None = None, fixed_bytes: float = 0.0,
                weight_bits: int = 32, fp_bits: int = 32,
                max_energy_pj: float | None = None, fixed_energy_pj: float = 0.0,
                act_bits: int = 32,
                energy_fn: Callable[[LayerPlan], float] | None = None,
                density_scale: dict[str, float] | None = None,
                add_slack: float = 0.0, hidden_bits: int = 32) -> list[LayerPlan]:
    """Choose (n_c, ρ) per layer minimizing Σ λ·err under the MUL budget and three caps:
    ADDs; with ``max_bytes`` the whole model's stored bytes (``fixed_bytes``: layers outside
    the plan; critical rows at ``weight_bits``, biases and ``a`` at ``fp_bits``, ternary at
    2 bits, as ``costs.hybrid_cost`` counts them); with ``max_energy_pj`` its arithmetic
    energy at ``act_bits`` (int8: an ``a`` costs an int32 MUL, 15x an int8 MAC's MUL, so
    hidden units that save MULs can cost energy). ``density_scale``: see
    :func:`plan_options`; ``add_slack``: ADDs the cost model counts beyond what the plan
    predicts (measured after a fit), taken off the ADD cap; ``hidden_bits``: see
    :func:`plan_options`.

    The exact MILP (:func:`exact_choice`); without it, the Lagrangian relaxation
    (:func:`_relaxed_choice`) then a greedy fill of the leftover MULs (:func:`_greedy_fill`);
    ``bench/planner_exact.py`` compares the two."""
    if not (0 < budget <= 1):
        raise ConfigError("budget", budget, "must be in (0, 1]")
    caps = plan_caps(layers, original_adds, max_add_increase, max_bytes, fixed_bytes,
                     max_energy_pj, fixed_energy_pj)
    caps[0] -= max(add_slack, 0.0)
    lim = _Limits(budget, fixed_muls, original_muls, original_adds, max_add_increase,
                  max_bytes, fixed_bytes, max_energy_pj, fixed_energy_pj, add_slack,
                  limit=budget * original_muls - fixed_muls, caps=caps)
    opts = plan_options(layers, curves, energies, fragility, budgets, ratios, densities,
                        weight_bits=weight_bits, fp_bits=fp_bits, act_bits=act_bits,
                        energy_fn=energy_fn, density_scale=density_scale,
                        hidden_bits=hidden_bits)
    _refuse_unreachable(opts, lim)
    limit = lim.limit
    sel = exact_choice(opts, limit, caps)
    if sel is None:  # no MILP solver (scipy missing) or no solution within its limits
        sel = _relaxed_choice(opts, limit, caps)
        _refuse_unmet_caps(sel, lim, layers)
        sel = _greedy_fill(opts, sel, limit, caps)
    return _layer_plans(layers, sel, fragility)


@dataclass(frozen=True)
class _Limits:
    """One planning call's MUL budget and caps: as the user set them (the refusals name
    them) and what the planned layers may use of them (``limit`` MULs; ``caps``: ADDs,
    bytes, pJ, each less the rest of the model's share, the ADDs less ``add_slack``)."""

    budget: float
    fixed_muls: int
    original_muls: int
    original_adds: int
    max_add_increase: float
    max_bytes: float | None
    fixed_bytes: float
    max_energy_pj: float | None
    fixed_energy_pj: float
    add_slack: float
    limit: float
    caps: list[float]

    def user_cap(self, k: int) -> tuple[float | None, float, str]:
        """``(as set, the part outside the plan, unit)`` of cap ``k`` (1 bytes, 2 energy)."""
        if k == 1:
            return self.max_bytes, self.fixed_bytes, "bytes"
        return self.max_energy_pj, self.fixed_energy_pj, "pJ"


def _refuse_unreachable(opts: list[list[_Opt]], lim: _Limits) -> None:
    """Refuses a MUL budget, size or energy cap that even each layer's cheapest option
    exceeds, naming the least it could be."""
    min_muls = sum(min(o.muls for o in lo) for lo in opts)
    if min_muls > lim.limit:
        smallest = (min_muls + lim.fixed_muls) / lim.original_muls
        raise ConfigError(
            "budget", lim.budget, "unreachable: the smallest reachable budget is "
            f"{math.ceil(smallest * 1000) / 1000:.3f} (non-pointwise layers alone use "
            f"{lim.fixed_muls / lim.original_muls:.3f} of the MULs)")
    for k in (1, 2):
        cap, fixed, unit = lim.user_cap(k)
        least = sum(min(o.use(k) for o in lo) for lo in opts)
        if cap is not None and least > lim.caps[k]:
            raise ConfigError(
                CAP_FIELDS[k], cap, f"the {CAP_NAMES[k]} ({cap:,.0f} {unit}) is unreachable: "
                f"the smallest plan "
                f"needs {least + fixed:,.0f} {unit} ({fixed:,.0f} of them in layers that "
                f"are not planned)")


def _relaxed_choice(opts: list[list[_Opt]], limit: float, caps: list[float]) -> list[_Opt]:
    """Lagrangian relaxation: each layer's option minimizing λ·err plus priced MULs and
    caps; the MUL price bisected to the budget, a cap's price doubled while the choice
    exceeds it. The result may still exceed a cap (the caller refuses it) and leave MULs
    unspent (the greedy fill spends them)."""

    def choose(price: float, prices: list[float]) -> list[_Opt]:
        return [min(lo, key=lambda o: o.werr + price * o.muls
                    + sum(p * o.use(k) for k, p in enumerate(prices) if p)) for lo in opts]

    def solve(prices: list[float]) -> list[_Opt]:
        lo_p, hi_p = 0.0, 1.0
        while sum(o.muls for o in choose(hi_p, prices)) > limit:
            hi_p *= 4
            if hi_p > 1e30:
                break
        for _ in range(80):
            mid = (lo_p + hi_p) / 2
            if sum(o.muls for o in choose(mid, prices)) > limit:
                lo_p = mid
            else:
                hi_p = mid
        return choose(hi_p, prices)

    prices = [0.0] * len(caps)
    sel = solve(prices)
    for _ in range(200):  # raise the price of whichever cap is exceeded
        exceeded = _over(sel, caps)
        if not any(exceeded):
            break
        prices = [(p * 2 if p else 1e-12) if x else p for p, x in zip(prices, exceeded)]
        sel = solve(prices)
    return sel


def _over(sel: list[_Opt], caps: list[float]) -> list[bool]:
    """Per cap: does the choice exceed it."""
    return [sum(o.use(k) for o in sel) > caps[k] for k in range(len(caps))]


def _refuse_unmet_caps(sel: list[_Opt], lim: _Limits, layers: list[PointwiseLayer]) -> None:
    """Refuses the relaxation's choice when it exceeds a cap (the ADD cap binds like the
    others: it was once let through silently), saying what the closest plan needs."""
    exceeded = _over(sel, lim.caps)
    if exceeded[0]:
        fixed_adds = lim.original_adds - sum(ly.pixels * ly.c_out * (ly.c_in - 1)
                                             for ly in layers)
        need = (sum(o.adds for o in sel) + fixed_adds + max(lim.add_slack, 0.0)
                ) / lim.original_adds
        raise ConfigError(
            CAP_FIELDS[0], lim.max_add_increase,
            f"the {CAP_NAMES[0]} cannot be met together with {{other}} {lim.budget:g} and "
            f"the other caps: the closest plan needs {need:.3f}x the original ADDs; raise it "
            "or {other}", other="budget")
    if exceeded[1] or exceeded[2]:
        k = 1 if exceeded[1] else 2
        cap, fixed, unit = lim.user_cap(k)
        raise ConfigError(
            CAP_FIELDS[k], cap,
            f"the {CAP_NAMES[k]} cannot be met together with {{other}} {lim.budget:g} and the "
            f"other caps: the closest plan needs "
            f"{sum(o.use(k) for o in sel) + fixed:,.0f} "
            f"{unit}; raise it or {{other}}", other="budget")


def _greedy_fill(opts: list[list[_Opt]], sel: list[_Opt], limit: float,
                 caps: list[float]) -> list[_Opt]:
    """Spend the MULs the choice leaves under ``limit``: repeatedly take the one option
    change with the best error reduction per MUL that keeps every cap (a change that
    also saves MULs first)."""
    sel = list(sel)
    used = sum(o.muls for o in sel)
    improved = True
    while improved:
        improved = False
        best, best_gain = None, 0.0
        totals = [sum(o.use(k) for o in sel) for k in range(len(caps))]  # once per round
        for i, lo in enumerate(opts):
            cur = sel[i]
            for o in lo:
                dm = o.muls - cur.muls
                de = cur.werr - o.werr
                if de > 0 and used + dm <= limit and (dm <= 0 or de / dm > best_gain):
                    if any(totals[k] - cur.use(k) + o.use(k) > caps[k]
                           for k in range(len(caps))):
                        continue
                    gain = float("inf") if dm <= 0 else de / dm
                    if best is None or gain > best_gain:
                        best, best_gain = (i, o), gain
        if best is not None:
            i, o = best
            used += o.muls - sel[i].muls
            sel[i] = o
            improved = True
    return sel


def _layer_plans(layers: list[PointwiseLayer], sel: list[_Opt],
                 fragility: dict[str, float]) -> list[LayerPlan]:
    return [LayerPlan(ly.name, o.n_c, o.r, sorted(o.order[:o.n_c].tolist()), ly.c_in,
                      ly.c_out, ly.pixels, o.err, {"fragility": fragility.get(ly.name, 1.0)},
                      o.density, o.hidden_bits) for ly, o in zip(layers, sel)]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr while HiGHS runs: its C++ code prints debug lines
    (e.g. "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") to
    stdout even with disp off, which corrupted `compress --json` output."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real fd 1 (e.g. embedded): as is
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# When the exact planner stops short of a proven optimum and uses its best plan: after
# MILP_NODE_LIMIT branch-and-bound nodes, so the plan is the same on a fast and a slow
# machine (HiGHS runs the same nodes in the same order), with a time limit only as a
# backstop. Measured on real dry runs, budgets 0.3-0.8, with today's scaled costs and
# gap: at most 585 nodes on MobileNetV1-0.5-160, 343 on the CIFAR-10 MobileNetV1-0.5,
# and MobileNetV2 at the limit at budget 0.5 (bench/results/milp-scale-20261203.json);
# a time limit alone made the plan depend on the machine once reached.
MILP_NODE_LIMIT = 5_000
MILP_TIME_LIMIT = 600.0
# A plan within 0.01% of the proven optimum is optimal: the predicted errors are estimates
# from a few hundred images, far coarser than that. On MobileNetV2 (costs scaled, as
# _unit_objective does) 1e-6 ran into the node limit at the default budget 0.536, 1e-4
# proved its plan in 3,915 nodes (bench/results/milp-scale-20261203.json).
MILP_REL_GAP = 1e-4


class MilpNotOptimal(UserWarning):
    """The MILP planner did not prove its plan optimal: its time limit stopped it (its best
    plan is used; ``gap``: the relative distance to the proven bound) or it found none, or
    scipy is missing (the heuristic plans). ``record`` is what ``Plan.milp`` stores;
    :func:`hfbconvert.pipeline.make_plan` catches it and records it with the plan."""

    def __init__(self, status: str, used: str, gap: float | None = None,
                 time_limit: float | None = None, node_limit: int | None = None) -> None:
        self.record = {"status": status, "used": used, "gap": gap, "time_limit_s": time_limit,
                       "node_limit": node_limit}
        gap_s = "" if gap is None else f", {gap:.2%} from the proven bound"
        super().__init__(f"MILP planner: {status}; {used} used{gap_s}")


def _say_not_optimal(res, time_limit: float, node_limit: int) -> None:
    """A :class:`MilpNotOptimal` warning for a ``scipy.optimize.milp`` result short of a
    proven optimum (status 1: the node or time limit stopped HiGHS, with or without a
    plan). Only the time limit makes the plan depend on the machine's speed: it says so."""
    if res.status == 0:
        return
    nodes = getattr(res, "mip_node_count", None)
    # scipy has no status code for it: HiGHS's "solution limit" (status 16) comes back as
    # an unrecognised status with the node count at the limit
    by_nodes = nodes is not None and nodes >= node_limit
    why = (f"stopped at its node limit ({node_limit:,} nodes)" if by_nodes else
           f"stopped at its {time_limit:g} s time limit (the plan depends on this "
           "machine's speed)" if res.status == 1 else None)
    if res.x is None:
        said = MilpNotOptimal(f"{why}, no plan found" if why else f"no plan ({res.message})",
                              "the heuristic plan", None, time_limit, node_limit)
    else:
        gap = getattr(res, "mip_gap", None)
        said = MilpNotOptimal(why or str(res.message), "its best plan",
                              float(gap) if gap is not None and math.isfinite(gap) else None,
                              time_limit, node_limit)
    warnings.warn(said, stacklevel=3)


def _milp_rows(opts: list[list[_Opt]], flat: list[_Opt], limit: float, caps: list[float],
               coo_matrix):
    """Constraint matrix and bounds of :func:`exact_choice`: one option per layer, then
    each resource (MULs, every finite cap) scaled to O(1), so the solver's feasibility
    tolerance means the same for every row."""
    n = len(flat)
    rows, cols, vals, j = [], [], [], 0
    for i, k in enumerate(len(lo) for lo in opts):  # one option per layer
        rows += [i] * k
        cols += list(range(j, j + k))
        vals += [1.0] * k
        j += k
    lo_b, hi_b = [1.0] * len(opts), [1.0] * len(opts)
    resources = [("muls", limit)] + [(k, c) for k, c in enumerate(caps) if math.isfinite(c)]
    for r, (what, cap) in enumerate(resources, start=len(opts)):
        use = [o.muls if what == "muls" else o.use(what) for o in flat]
        scale = max(abs(cap), max(use), 1.0)
        rows += [r] * n
        cols += list(range(n))
        vals += [u / scale for u in use]
        lo_b.append(-math.inf)
        hi_b.append(cap / scale)
    a = coo_matrix((vals, (rows, cols)), shape=(len(lo_b), n)).tocsr()
    return a, lo_b, hi_b


def _unit_objective(werr: list[float], cons, box, milp) -> np.ndarray:
    """The costs scaled so the optimum is about 1. HiGHS also stops at an absolute gap
    (1e-6) and judges optimality with absolute tolerances (1e-7): on raw predicted errors,
    whose optimum can be 1e-5, it called a plan optimal that was 0.4% worse than the true
    optimum, after 39 s of presolve (a random-weight EfficientNet-B0; scaled: the optimum
    in 2 s). The scale is the LP relaxation's value (0.1 s), after a first scaling by the
    largest cost so that LP's own tolerances are not the ones at fault."""
    c = np.asarray(werr, dtype=np.float64)
    top = float(np.abs(c).max()) if c.size else 0.0
    if top <= 0.0:
        return c
    c = c / top
    lp = milp(c, constraints=cons, integrality=0, bounds=box)
    if lp.status == 0 and lp.fun is not None and lp.fun > 1e-9:
        c = c / float(lp.fun)
    return c


def exact_choice(opts: list[list[_Opt]], limit: float, caps: list[float],
                 time_limit: float | None = None,
                 node_limit: int | None = None) -> list[_Opt] | None:
    """The optimal option per layer (multiple-choice knapsack as a MILP, HiGHS via
    ``scipy.optimize.milp``): minimum Σ λ·err, MULs within ``limit``, each finite cap
    respected. Measured against the Lagrangian + greedy heuristic on the three shared
    models (bench/planner_exact.py): the heuristic was up to 18.8% worse (MobileNetV2 at
    budget 0.5, 6.0% at 0.536), so this is the planner; None when scipy is missing or no
    solution is found within ``node_limit`` nodes (default :data:`MILP_NODE_LIMIT`) or
    ``time_limit`` s (default :data:`MILP_TIME_LIMIT`): the caller falls back to the
    heuristic. Short of a proven optimum it warns (:class:`MilpNotOptimal`).
    Raises InputError when the caps cannot be met together."""
    time_limit = time_limit or MILP_TIME_LIMIT
    node_limit = node_limit or MILP_NODE_LIMIT
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError:
        warnings.warn(MilpNotOptimal("scipy missing", "the heuristic plan"), stacklevel=2)
        return None
    sizes = [len(lo) for lo in opts]
    flat = [o for lo in opts for o in lo]
    a, lo_b, hi_b = _milp_rows(opts, flat, limit, caps, coo_matrix)
    cons, box = LinearConstraint(a, lo_b, hi_b), Bounds(0, 1)
    with _stdout_to_stderr():
        cost = _unit_objective([o.werr for o in flat], cons, box, milp)
        res = milp(cost, constraints=cons, integrality=[1] * len(flat), bounds=box,
                   options={"time_limit": time_limit, "node_limit": node_limit,
                            "mip_rel_gap": MILP_REL_GAP})
    if res.x is None and res.status == 2:  # infeasible: the caps exclude every plan
        raise InputError("the ADD cap, size budget and energy budget cannot be met "
                         "together with the MUL budget; raise one of them or {budget}",
                         budget="budget")
    _say_not_optimal(res, time_limit, node_limit)
    if res.x is None:
        return None
    x = res.x.round().astype(bool)
    out, j = [], 0
    for k in sizes:
        pick = [o for o, on in zip(flat[j:j + k], x[j:j + k]) if on]
        if len(pick) != 1:
            warnings.warn(MilpNotOptimal("solution not integral", "the heuristic plan"),
                          stacklevel=2)
            return None
        out.append(pick[0])
        j += k
    return out
