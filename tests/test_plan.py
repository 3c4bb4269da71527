"""Budget planner: meets the MUL budget, respects ADDs, explains unreachable budgets."""

from __future__ import annotations

import pytest
import torch

from hfbconvert.costs import ENERGY_PJ, hybrid_cost
from hfbconvert.errors import InputError
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import PointwiseLayer
from hfbconvert.plan import LayerPlan, Plan, budget_plan, uniform_plan


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [PointwiseLayer("a", "conv", 16, 32, 8, 8), PointwiseLayer("b", "conv", 32, 64, 4, 4),
              PointwiseLayer("fc", "linear", 64, 10, 1, 1)]
    curves, energies = {}, {}
    for ly in layers:
        l1 = torch.rand(ly.c_out, generator=g) * 0.3
        curves[ly.name] = torch.stack([l1, l1 * 0.2, l1 * 0.05], 1)
        energies[ly.name] = torch.rand(ly.c_out, generator=g) + 0.5
    orig_pw = sum(ly.pixels * ly.c_in * ly.c_out for ly in layers)
    fixed = orig_pw // 10
    orig_adds = sum(ly.pixels * ly.c_out * (ly.c_in - 1) for ly in layers) + fixed
    return layers, curves, energies, fixed, orig_pw + fixed, orig_adds


@pytest.mark.parametrize("budget", [0.3, 0.536, 0.8])
def test_budget_met_and_loss_decreases_with_budget(budget):
    layers, curves, energies, fixed, orig, adds = _setup()
    plans = budget_plan(layers, curves, energies, {}, (1, 2, 4), budget, fixed, orig, adds, 0.48)
    p = Plan("hybrid", plans, budget, fixed, orig, adds)
    assert p.predicted_muls() <= budget * orig
    for lp in plans:
        assert len(lp.critical_idx) == lp.n_critical
        assert lp.r >= lp.n_tolerant
    tighter = budget_plan(layers, curves, energies, {}, (1, 2, 4), budget * 0.8, fixed, orig,
                          adds, 0.48)
    err = sum(lp.predicted_err for lp in plans)
    assert sum(lp.predicted_err for lp in tighter) >= err - 1e-12


def test_fragile_layers_get_more_critical_filters():
    layers, curves, energies, fixed, orig, adds = _setup()
    base = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.48)
    frag = budget_plan(layers, curves, energies, {"a": 100.0}, (1, 2, 4), 0.5, fixed, orig,
                       adds, 0.48)
    # strict: a planner that ignored fragility would return the same plan and fail here
    assert frag[0].n_critical > base[0].n_critical
    assert frag[0].predicted_err < base[0].predicted_err
    # paid for by the other layers, within the same MUL budget
    assert sum(lp.predicted_err for lp in frag[1:]) > sum(lp.predicted_err for lp in base[1:])
    for plans in (base, frag):
        assert Plan("hybrid", plans, 0.5, fixed, orig, adds).predicted_muls() <= 0.5 * orig
    neutral = budget_plan(layers, curves, energies, {n.name: 1.0 for n in layers}, (1, 2, 4),
                          0.5, fixed, orig, adds, 0.48)
    assert [lp.critical_idx for lp in neutral] == [lp.critical_idx for lp in base]


def test_unreachable_budget_names_smallest():
    layers, curves, energies, fixed, orig, adds = _setup()
    with pytest.raises(InputError, match="smallest reachable budget is"):
        budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.05, fixed, orig, adds, 0.48)
    with pytest.raises(InputError):
        budget_plan(layers, curves, energies, {}, (1, 2, 4), 1.5, fixed, orig, adds, 0.48)


def test_uniform_plan_picks_most_sensitive_filters():
    layers, curves, energies, *_ = _setup()
    plans = uniform_plan(layers, curves, energies, (1, 2, 4), 0.25, 2.0)
    for ly, lp in zip(layers, plans):
        assert lp.n_critical == round(0.25 * ly.c_out)
        assert lp.r == 2 * (ly.c_out - lp.n_critical)
        contrib = curves[ly.name][:, 1] * energies[ly.name]
        crit = set(lp.critical_idx)
        rest = [j for j in range(ly.c_out) if j not in crit]
        assert min(contrib[list(crit)]) >= max(contrib[rest]) - 1e-12


def test_plan_roundtrips_through_dict():
    layers, curves, energies, fixed, orig, adds = _setup()
    plans = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.48)
    p = Plan("hybrid", plans, 0.5, fixed, orig, adds)
    assert Plan.from_dict(p.to_dict()).to_dict() == p.to_dict()


def _caps(kind: str, frac_of_free: float, free: list, bits: int) -> dict:
    if kind == "bytes":
        used = sum(lp.predicted_bytes(bits) for lp in free)
        return {"max_bytes": 1000.0 + frac_of_free * used, "fixed_bytes": 1000.0,
                "weight_bits": bits}
    used = sum(lp.predicted_energy_pj(32, bits) for lp in free)
    return {"max_energy_pj": 1e4 + frac_of_free * used, "fixed_energy_pj": 1e4, "act_bits": bits}


def _used(kind: str, plans: list, bits: int) -> float:
    if kind == "bytes":
        return sum(lp.predicted_bytes(bits) for lp in plans)
    return sum(lp.predicted_energy_pj(32, bits) for lp in plans)


@pytest.mark.parametrize("kind,bits", [("bytes", 8), ("bytes", 16), ("bytes", 32),
                                       ("energy", 8), ("energy", 32)])
def test_caps_are_met_and_cost_predicted_accuracy(kind, bits):
    """Size and energy caps: met by the plan (with the MUL budget), or refused; a much
    tighter cap predicts a worse model (the planner is a heuristic, so not step by step)."""
    layers, curves, energies, fixed, orig, adds = _setup()
    ratios = (1.0, 2.0, 4.0)
    free_kw = {"weight_bits": bits} if kind == "bytes" else {"act_bits": bits}
    free = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.48,
                       ratios, **free_kw)
    free_err = sum(lp.predicted_err for lp in free)
    met, err = 0, free_err
    for frac in (0.95, 0.8, 0.6, 0.4):
        caps = _caps(kind, frac, free, bits)
        limit = caps.get("max_bytes", caps.get("max_energy_pj"))
        try:
            plans = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds,
                                0.48, ratios, **caps)
        except InputError as exc:  # a cap no plan meets is refused, never bent
            assert ("size budget" if kind == "bytes" else "energy budget") in str(exc)
            break
        met += 1
        assert 1000.0 * (kind == "bytes") + 1e4 * (kind == "energy") + _used(
            kind, plans, bits) <= limit
        assert Plan("hybrid", plans, 0.5, fixed, orig, adds).predicted_muls() <= 0.5 * orig
        err = sum(lp.predicted_err for lp in plans)
    assert met >= 2
    assert err > free_err


def test_int8_energy_prices_a_as_an_int32_mul():
    """With int8 activations an ``a`` costs an int32 MUL (3.1 pJ) and a MAC an int8 MUL
    plus an int32 ADD; the planner's figure is the cost model's arithmetic."""
    lp = LayerPlan("x", 5, 22, list(range(5)), 24, 16, 4)
    e = ENERGY_PJ
    assert lp.predicted_energy_pj(32, 8) == pytest.approx(
        4 * 5 * 24 * e["int8_mul"] + 4 * 22 * e["int32_mul"] + lp.predicted_adds() * e["int32_add"])
    assert lp.predicted_energy_pj(32, 32) == pytest.approx(
        lp.predicted_muls() * e["fp32_mul"] + lp.predicted_adds() * e["fp32_add"])


def test_size_budget_below_the_smallest_plan_is_refused():
    layers, curves, energies, fixed, orig, adds = _setup()
    with pytest.raises(InputError, match="size budget .* is unreachable: the smallest plan needs"):
        budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.48,
                    max_bytes=100.0, fixed_bytes=50.0)


def test_predicted_bytes_match_the_cost_model():
    """The planner's byte count is the cost model's, for a real hybrid layer."""
    torch.manual_seed(0)
    lp = LayerPlan("x", 5, 22, list(range(5)), 24, 16, 4)
    m = HybridPointwise(24, 16, torch.tensor(lp.critical_idx), lp.r)
    for wbits in (8, 16, 32):
        assert hybrid_cost("x", m, 4, 32, wbits).bytes == lp.predicted_bytes(wbits)


def test_heuristic_planner_refuses_an_unmeetable_add_cap(monkeypatch):
    """Without the MILP (scipy missing or timed out) the relaxation used to return a plan
    over the ADD cap silently; it now refuses it like the size and energy caps."""
    from hfbconvert import plan as P
    from hfbconvert.errors import ConfigError

    layers, curves, energies, fixed, orig, adds = _setup()
    monkeypatch.setattr(P, "exact_choice", lambda *a, **k: None)
    ok = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.8, fixed, orig, adds, 0.48)
    dense_pw = sum(ly.pixels * ly.c_out * (ly.c_in - 1) for ly in layers)
    assert adds - dense_pw + sum(lp.predicted_adds() for lp in ok) <= 1.48 * adds
    with pytest.raises(ConfigError, match="ADD cap cannot be met") as exc:
        budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.3, fixed, orig, adds, -0.9)
    assert exc.value.field == "max_add_increase"


def test_density_scale_and_slack_tighten_the_add_prediction():
    """The repair's two corrections reach the ADD cap: denser codes and counted slack
    leave fewer ADDs for banks, so the planner keeps more filters critical."""
    layers, curves, energies, fixed, orig, adds = _setup()
    args = (layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.3)
    base = budget_plan(*args)
    dense_pw = sum(ly.pixels * ly.c_out * (ly.c_in - 1) for ly in layers)
    scaled = budget_plan(*args, density_scale={ly.name: 1.4 for ly in layers})
    assert all(s.density == pytest.approx(min(1.0, 1.4 * b.density))
               for s, b in zip(scaled, base))
    for plans, slack in ((scaled, 0.0), (budget_plan(*args, add_slack=0.05 * adds), 0.05 * adds)):
        assert adds - dense_pw + sum(lp.predicted_adds() for lp in plans) + slack <= 1.3 * adds
