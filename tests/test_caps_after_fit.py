"""The caps hold on the model the fit built, counted and priced as the report counts them
(issue #15 follow-ups):

* the ADD-cap repair refits re-planned layers the way the fit did, reconstruction included;
* uint8 hidden units' shifts (``--hidden-bits 8``) are ADDs for the planner, the cap and
  the report alike;
* ``--energy-budget`` is checked on the fitted model (``meta["energy_cap"]``, exit 1 on a
  miss), by the same function the report uses;
* the plan line names the densities the planner used; a MILP stopped by its time limit
  is recorded in the plan and shown in the report.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from rich.console import Console

from hfbconvert import schemas, stages
from hfbconvert.calib.readers import CalibData
from hfbconvert.costs import model_cost
from hfbconvert.distill import FinetuneConfig
from hfbconvert.models.info import ModelInfo
from hfbconvert.pipeline import CompressConfig, compress
from hfbconvert.plan import LayerPlan, Plan, budget_plan
from hfbconvert.report import build_report
from hfbconvert.report.tables import summary_lines

from .test_conv_banks import _KxkNet
from .test_plan import _setup

pytestmark = pytest.mark.usefixtures("one_thread")

KXK = {"budget": 0.536, "layer_kinds": ("pointwise", "linear", "conv"), "exclude": ("conv1",),
       "weight_bits": 32, "finetune": FinetuneConfig(steps=0)}
KXK_INFO = ModelInfo(arch="custom", config={}, resolution=16)


def _images(n: int, res: int) -> CalibData:
    imgs = torch.randint(0, 256, (n, 3, res, res), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)
    return CalibData(imgs, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [str(i) for i in range(n)], source="random")


def _kxk(c: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return _KxkNet(c).eval()


# ---------------------------------------------------------------- 1. repair + reconstruct
def test_add_repair_reconstructs_what_it_refits() -> None:
    """With --reconstruct the repaired model is the one a run planned that way from the
    start builds (the final plan given as a --plan file): the re-planned layers and the
    layers after them are reconstructed again, not left at the one-shot fit."""
    cfg = CompressConfig(**KXK, reconstruct=True, fragility=False, stats_images=64,
                         recon_images=96, per_image=32)
    net, data = _kxk(16), _images(120, 16)
    repaired, meta = compress(net, KXK_INFO, data, cfg)
    assert meta["add_repair"] and meta["add_repair"][0]["layers_replanned"], "precondition"
    assert "reconstruction" in meta and meta["add_cap"]["met"]
    final = {"layers": {lp["name"]: {"critical_idx": lp["critical_idx"], "r": lp["r"]}
                        for lp in meta["plan"]["layers"]}}
    direct, _ = compress(net, KXK_INFO, data, cfg, plan_override=final)
    want = direct.state_dict()
    for k, v in repaired.state_dict().items():
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k


# ---------------------------------------------------------------- 2. shifts are ADDs
def test_planner_prices_hidden_unit_shifts_under_the_add_cap() -> None:
    from hfbconvert.costs import shift_adds

    lp8 = LayerPlan("x", 2, 12, [0, 1], 16, 10, 9, hidden_bits=8)
    lp32 = LayerPlan("x", 2, 12, [0, 1], 16, 10, 9)
    assert lp8.predicted_adds() - lp32.predicted_adds() == 9 * shift_adds(12, True) == 9 * 12
    assert "hidden_bits" not in lp32.to_dict()  # default plans read as before
    assert Plan.from_dict(Plan("hybrid", [lp8]).to_dict()).layers[0].hidden_bits == 8
    layers, curves, energies, fixed, orig, adds = _setup()
    plans = budget_plan(layers, curves, energies, {}, (1, 2, 4), 0.5, fixed, orig, adds, 0.3,
                        act_bits=8, hidden_bits=8)
    assert all(lp.hidden_bits == 8 for lp in plans)
    dense_pw = sum(ly.pixels * ly.c_out * (ly.c_in - 1) for ly in layers)
    shifts = sum(lp.pixels * lp.r for lp in plans if lp.n_tolerant)
    assert shifts > 0
    assert adds - dense_pw + sum(lp.predicted_adds() for lp in plans) <= 1.3 * adds


def test_hidden_bits_8_cap_record_counts_the_adds_the_report_counts() -> None:
    """compress's ADD-cap record holds every counted ADD (shifts included) to the cap, and
    the report says OVER THE LIMIT exactly when the record says the cap was missed."""
    cfg = CompressConfig(**{**KXK, "weight_bits": 8}, activation_bits=8, hidden_bits=8,
                         fragility=False, stats_images=48, act_calib_images=32)
    hybrid, meta = compress(_kxk(16), KXK_INFO, _images(60, 16), cfg)
    cost = model_cost(hybrid, 16)
    rec = meta["add_cap"]
    assert rec["shift_adds"] > 0, "precondition: the banks' hidden units shift"
    assert rec["adds"] == cost.adds == meta["cost"]["totals"]["adds"]
    assert rec["met"] == (cost.adds <= rec["limit_adds"])
    assert all(lp["hidden_bits"] == 8 for lp in meta["plan"]["layers"])
    schemas.validate(meta, "artifact-meta")
    over = "OVER THE LIMIT" in " ".join(summary_lines(build_report(meta, None)))
    assert over == (not rec["met"])
    for met in (True, False):  # the report follows the record's rule on either side
        lim = rec["adds"] / meta["original_cost"]["totals"]["adds"] - 1 + (1e-6 if met else -1e-6)
        m = {**meta, "config": {**meta["config"], "max_add_increase": lim}}
        assert ("OVER THE LIMIT" in " ".join(summary_lines(build_report(m, None)))) != met


# ---------------------------------------------------------------- 3. energy re-check
def _kxk_energy(budget: float, monkeypatch) -> dict:
    monkeypatch.setattr(stages, "ADD_REPAIR_ROUNDS", 0)
    # the ADD cap out of the way: only the energy budget binds
    cfg = CompressConfig(**KXK, energy_budget=budget, max_add_increase=10.0)
    return compress(_kxk(), KXK_INFO, None, cfg)[1]


def test_energy_budget_is_checked_on_the_fitted_model(monkeypatch, capsys) -> None:
    """The planner prices ADDs at the sensitivity fit's density; these banks fit denser,
    so a budget between the plan's prediction and the fitted energy is missed, and the
    record says so, by the number the report prints."""
    meta = _kxk_energy(1.0, monkeypatch)
    rec = meta["energy_cap"]
    assert rec["met"] is True and rec["enforced"] is True and rec["energy_model"] == "constants"
    bud = build_report(meta, None)["totals"]["budget"]
    assert rec["fraction_used"] == pytest.approx(bud["energy_fraction_used"], rel=1e-12)
    plan = Plan.from_dict(meta["plan"])
    orig = model_cost(_kxk(), 16)
    planned = {lp.name for lp in plan.layers}
    predicted = (sum(c.energy_pj() for c in orig.layers if c.name not in planned)
                 + sum(lp.predicted_energy_pj() for lp in plan.layers)) / orig.energy_pj
    assert predicted < rec["fraction_used"], "precondition: the fit costs more than planned"
    cap = (predicted + rec["fraction_used"]) / 2
    meta = _kxk_energy(cap, monkeypatch)
    assert meta["plan"]["layers"] == plan.to_dict()["layers"]  # the cap let the plan be
    rec = meta["energy_cap"]
    assert rec["met"] is False and rec["fraction_used"] > cap
    assert "over the energy budget" in capsys.readouterr().err
    lines = " ".join(summary_lines(build_report(meta, None)))
    assert "energy budget" in lines and "OVER BUDGET" in lines
    schemas.validate(meta, "artifact-meta")


def test_energy_gate_exits_1_only_for_an_enforced_miss(tmp_path) -> None:
    from hfbconvert.cli import _cap_gate as _energy_cap_gate
    from hfbconvert.errors import CheckFailed

    miss = {"energy_budget": 0.72, "energy_model": "constants", "fraction_used": 0.733,
            "fraction_used_constants": 0.733, "met": False, "enforced": True}
    with pytest.raises(CheckFailed, match=r"73\.3% .*--energy-budget 0\.72") as exc:
        _energy_cap_gate({"energy_cap": miss}, tmp_path / "m.hfb.pt")
    assert "\n" not in str(exc.value) and "m.hfb.pt" in str(exc.value)
    _energy_cap_gate({"energy_cap": {**miss, "enforced": False}}, tmp_path / "m.hfb.pt")
    _energy_cap_gate({"energy_cap": {**miss, "met": True}}, tmp_path / "m.hfb.pt")
    _energy_cap_gate({"energy_cap": {**miss, "met": None}}, tmp_path / "m.hfb.pt")  # unpriced
    _energy_cap_gate({}, tmp_path / "m.hfb.pt")  # no --energy-budget


def test_both_caps_missed_are_named_in_one_line(tmp_path) -> None:
    from hfbconvert.cli import _cap_gate
    from hfbconvert.errors import CheckFailed

    energy = {"energy_budget": 0.72, "energy_model": "constants", "fraction_used": 0.733,
              "met": False, "enforced": True}
    adds = {"max_add_increase": 0.48, "ratio": 1.54, "met": False, "enforced": True,
            "repair_rounds": 3}
    with pytest.raises(CheckFailed) as exc:
        _cap_gate({"energy_cap": energy, "add_cap": adds}, tmp_path / "m.hfb.pt")
    msg = str(exc.value)
    assert "\n" not in msg and "1.540x" in msg and "73.3%" in msg
    assert "--max-add-increase 0.48" in msg and "--energy-budget 0.72" in msg


# ---------------------------------------------------------------- 4. the plan line
def test_plan_line_names_the_densities_the_planner_used() -> None:
    from hfbconvert.report.terminal import print_plan

    layers = [LayerPlan(n, 2, 8, [0, 1], 16, 10, 4, density=d).to_dict()
              for n, d in (("a", 0.55), ("b", 0.65), ("c", 0.62))]
    plan = {"method": "hybrid", "budget": 0.5, "fixed_muls": 0, "original_muls": 2000,
            "original_adds": 1900, "notes": [], "layers": layers}
    buf = io.StringIO()
    print_plan(plan, console=Console(file=buf, width=200, highlight=False))
    out = " ".join(buf.getvalue().split())
    assert "mean 0.607, 0.550–0.650" in out and "density 0.7" not in out


# ---------------------------------------------------------------- 5. MILP time limit
@pytest.mark.parametrize("found", [True, False], ids=["best-found", "none-found"])
def test_milp_time_limit_is_recorded_and_reported(found: bool, monkeypatch, capsys) -> None:
    import scipy.optimize

    real = scipy.optimize.milp

    def stopped(*args, **kwargs):  # HiGHS's answer when its time limit ends the search
        res = real(*args, **kwargs)
        res.status, res.message, res.mip_gap = 1, "Time limit reached.", 0.031
        if not found:
            res.x = None
        return res

    monkeypatch.setattr(scipy.optimize, "milp", stopped)
    _, meta = compress(_kxk(16), KXK_INFO, None, CompressConfig(**KXK), dry_run=True)
    rec = meta["plan"]["milp"]
    if found:
        assert rec == {"status": "stopped at its 600 s time limit (the plan depends on this "
                                 "machine's speed)", "used": "its best plan",
                       "gap": 0.031, "time_limit_s": 600.0, "node_limit": 5000}
    else:
        assert rec["used"] == "the heuristic plan" and rec["gap"] is None
    assert "MILP planner" in capsys.readouterr().err
    assert Plan.from_dict(meta["plan"]).milp == rec
    schemas.validate({"schema_version": 1, "plan": meta["plan"]}, "compress-plan")
    from hfbconvert.report.markdown import render_markdown

    md = render_markdown(build_report(meta, None))
    section = md[md.index("## Planner notes"):]
    assert "time limit" in section and (("3.10%" in section) == found)


def _hard_knapsack() -> tuple[list, float, list[float]]:
    """A multiple-choice knapsack HiGHS needs 26 branch-and-bound nodes for (30 layers of
    6 options, MUL and ADD caps), found by trying seeds."""
    import random

    from hfbconvert.plan import _Opt

    rng = random.Random(20)
    opts = [[_Opt(rng.randint(10, 100), rng.randint(10, 100), 0.0, 0.0,
                  rng.randint(1, 100) / 7, k, 1, torch.zeros(1), 0.0, 1.0) for k in range(6)]
            for _ in range(30)]
    limit = sum(min(o.muls for o in lo) for lo in opts) * 1.6
    adds = sum(min(o.adds for o in lo) for lo in opts) * 1.8
    return opts, limit, [adds, math.inf, math.inf]


def test_milp_node_limit_gives_the_same_plan_on_any_machine() -> None:
    """Stopped by its node limit, the planner uses its best plan and says so; the plan
    does not depend on the time it was given (a time limit reached would), and a proven
    optimum needs no note and is no worse."""
    from hfbconvert.plan import MilpNotOptimal, exact_choice

    opts, limit, caps = _hard_knapsack()
    runs = []
    for time_limit in (30.0, 600.0):
        with pytest.warns(MilpNotOptimal) as got:
            sel = exact_choice(opts, limit, caps, time_limit=time_limit, node_limit=3)
        rec = [w.message.record for w in got if isinstance(w.message, MilpNotOptimal)][0]
        assert rec["status"] == "stopped at its node limit (3 nodes)"
        assert rec["used"] == "its best plan" and rec["node_limit"] == 3
        assert rec["gap"] is not None and rec["gap"] > 0
        runs.append([(o.n_c, o.muls) for o in sel])
    assert runs[0] == runs[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MilpNotOptimal)  # proven optimal: no warning
        best = exact_choice(opts, limit, caps)
    assert sum(o.werr for o in best) <= sum(o.werr for o in sel) + 1e-9
    assert sum(o.muls for o in best) <= limit and sum(o.adds for o in best) <= caps[0]


@pytest.mark.parametrize("scale", [1e-9, 1e-5, 1.0, 1e6])
def test_the_milp_plan_is_the_true_optimum_at_any_scale_of_predicted_error(scale) -> None:
    """Against brute force over every plan of a small knapsack: the planner's plan is the
    optimum whether the predicted errors are 1e-9 or 1e6 (HiGHS's absolute gap and
    tolerances once made it stop short on tiny ones, calling a worse plan optimal)."""
    import itertools
    import random

    from hfbconvert.plan import MILP_REL_GAP, MilpNotOptimal, _Opt, exact_choice

    rng = random.Random(3)
    opts = [[_Opt(rng.randint(10, 100), rng.randint(10, 100), 0.0, 0.0,
                  rng.randint(1, 1000) / 1000 * scale, k, 1, torch.zeros(1), 0.0, 1.0)
             for k in range(5)] for _ in range(6)]
    limit = sum(min(o.muls for o in lo) for lo in opts) * 1.5
    adds = sum(min(o.adds for o in lo) for lo in opts) * 1.6
    best = min((sum(o.werr for o in pick), [o.n_c for o in pick])
               for pick in itertools.product(*opts)
               if sum(o.muls for o in pick) <= limit and sum(o.adds for o in pick) <= adds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MilpNotOptimal)
        sel = exact_choice(opts, limit, [adds, math.inf, math.inf])
    assert best[0] * (1 - 1e-9) <= sum(o.werr for o in sel) <= best[0] * (1 + MILP_REL_GAP)


def test_an_optimal_milp_plan_records_nothing() -> None:
    _, meta = compress(_kxk(16), KXK_INFO, None, CompressConfig(**KXK), dry_run=True)
    assert "milp" not in meta["plan"]
