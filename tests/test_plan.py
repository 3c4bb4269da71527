"""Budget planner: meets the MUL budget, respects ADDs, explains unreachable budgets."""

from __future__ import annotations

import pytest
import torch

from hfbconvert.errors import InputError
from hfbconvert.layers import PointwiseLayer
from hfbconvert.plan import Plan, budget_plan, uniform_plan


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
    assert frag[0].n_critical >= base[0].n_critical
    assert frag[0].predicted_err <= base[0].predicted_err


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
