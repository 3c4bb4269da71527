"""compress --energy-budget priced by the accelerator model (--energy-model): the engine's
per-option prices, the cap met, fallback marking, refusals. ZigZag runs on a 3-layer net;
the CLI tests run the engine-priced planner with the engine replaced by the constants
model (the wiring is what they check)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hfbconvert.cli import main
from hfbconvert.hw import engine
from hfbconvert.hw.spec import load_design
from hfbconvert.hw.workload import hybrid_parts

from .tiny import write_npz, write_reference_checkpoint

HAS_ZIGZAG = importlib.util.find_spec("zigzag") is not None
needs_zigzag = pytest.mark.skipif(not HAS_ZIGZAG, reason="zigzag-dse not installed "
                                  "(pip install 'hfbconvert[hw]', Python >= 3.11)")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def prices():
    from hfbconvert.hw.planner import engine_prices

    return engine_prices(_net(), 8, ["2"], "hybrid_int8", 8, engine=engine.Engine())


@needs_zigzag
def test_prices_are_the_engine_at_the_anchor(prices) -> None:
    """At the layer's full size each part's price is exactly ZigZag's energy for it, and the
    reference is the whole original on the equal-area MAC-only baseline."""
    des = load_design("hybrid_int8")
    eng = engine.Engine()
    crit, wb, wc = hybrid_parts("2", 8, 16, 16, 16, 8, 8, 1, 8, 32, 32, 1.0, 1.0)
    e = {p.stage: eng.run_part(des, p)["energy_pj"] for p in (crit, wb, wc)}
    assert prices.option_pj("2", 16, 0, 0, 1.0) == pytest.approx(e["critical"])
    hyb = e["wb"] + e["wc"] + engine.scale_energy_pj(des, 16 * 64)
    assert prices.option_pj("2", 0, 16, 16, 1.0) == pytest.approx(hyb)
    # zero-gated adders: only compute energy scales with the non-zero fraction
    drop = prices.option_pj("2", 0, 16, 16, 1.0) - prices.option_pj("2", 0, 16, 16, 0.5)
    assert drop == pytest.approx(0.5 * (wb.ops + wc.ops) * des.adder_unit[0])
    from dataclasses import replace

    from hfbconvert.hw.planner import _rebits
    from hfbconvert.hw.workload import from_model
    int8 = _rebits(from_model(_net(), 8), 8, 32)  # the net carries no activation quantizers
    assert all(lay.parts[0].i_bits == 8 for lay in int8)
    ref = engine.evaluate(replace(des, mac_area_fraction=1.0), int8, eng)
    assert prices.reference_pj == pytest.approx(ref["totals"]["energy_pj"]["total"])
    assert 0 < prices.fixed_pj < prices.reference_pj and prices.fallback_layers == []
    # more critical filters and fewer hidden units: the MAC share grows
    assert prices.option_pj("2", 8, 8, 8, 1.0) < prices.option_pj("2", 16, 0, 0, 1.0)


@needs_zigzag
def test_recorded_prices_price_the_final_model(prices) -> None:
    """What the plan stores (record) prices a finished model as the planner would its plan:
    the real critical count, hidden units and W_b / W_c non-zeros, a dense layer as
    all-critical; a planned layer missing from the model gives None, not a guess."""
    from hfbconvert.hw.planner import priced_pj
    from hfbconvert.plan import LayerPlan

    lp = LayerPlan("2", 4, 12, [0, 1, 2, 3], c_in=8, c_out=16, pixels=64, density=0.5)
    rec = json.loads(json.dumps(prices.record("hybrid_int8", [lp], 1e6)))  # survives JSON
    assert rec["accelerator"] == "hybrid_int8" and rec["cap_pj"] == 1e6
    assert rec["predicted_pj"] == pytest.approx(prices.fixed_pj + prices.plan_pj(lp))
    hyb = {"name": "2", "kind": "hybrid", "extra": {"critical": 4, "tolerant": 12, "r": 12,
                                                     "nnz_wb": 48, "nnz_wc": 36}}
    want = prices.fixed_pj + prices.option_pj("2", 4, 12, 12, 48 / 96, 36 / 144)
    assert priced_pj(rec, [hyb]) == pytest.approx(want)
    assert want != pytest.approx(rec["predicted_pj"])  # densities differ from the plan's
    dense = {"name": "2", "kind": "pointwise", "extra": {}}
    assert priced_pj(rec, [dense]) == pytest.approx(
        prices.fixed_pj + prices.option_pj("2", 16, 0, 0, 1.0))
    assert priced_pj(rec, [{"name": "other", "kind": "pointwise"}]) is None


@needs_zigzag
def test_unmappable_layer_priced_by_constants_and_marked(monkeypatch) -> None:
    from hfbconvert.hw.planner import engine_prices

    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    p = engine_prices(_net(), 8, ["2"], "hybrid_int8", 8)
    assert p.layers["2"].engine == "constants"
    assert set(p.fallback_layers) == {"0", "2", "6"}
    des = load_design("hybrid_int8")
    crit = hybrid_parts("2", 8, 16, 16, 16, 8, 8, 1, 8, 32, 32, 1.0, 1.0)[0]
    c = engine.constants_part(des, crit)
    assert p.option_pj("2", 16, 0, 0, 1.0) == pytest.approx(
        c["compute_pj"] + c["onchip_pj"] + c["dram_pj"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hwplan")
    return {"model": write_reference_checkpoint(d / "tiny.pt"),
            "calib": write_npz(d / "calib.npz", n=32)}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_exit_2(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    errs = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in errs[0], (n, errs[0])


def test_energy_model_refusals(inputs, tmp_path) -> None:
    base = ["compress", inputs["model"], "--calib", inputs["calib"], "--dry-run", "-q"]
    _one_line_exit_2(_run(*base, "--energy-model", "hybrid_int8"), "--energy-budget")
    bad = tmp_path / "acc.yaml"
    bad.write_text("name: x\nprecision: int8\ncompute_area_um2: 1000\nadder_bits: 99\n")
    _one_line_exit_2(_run(*base, "--energy-budget", "1", "--energy-model", bad),
                     "'adder_bits'", str(bad))
    _one_line_exit_2(_run(*base, "--energy-budget", "1", "--energy-model", "nope"),
                     "nope")
    if HAS_ZIGZAG:
        _one_line_exit_2(_run(*base, "--energy-budget", "1", "--energy-model", "hybrid_int8"),
                         "--activation-bits 8")
        small = tmp_path / "small.yaml"
        small.write_text("name: s\nprecision: int8\ncompute_area_um2: 107264\n"
                         "mac_area_fraction: 0.5\nmemory: {act_sram_kib: 1}\n")
        _one_line_exit_2(_run(*base, "--activation-bits", "8", "--energy-budget", "1",
                              "--energy-model", small), "too large", "act_sram_kib")


@needs_zigzag
def test_energy_model_plan_meets_the_cap(inputs, monkeypatch) -> None:
    """The planner's energy cap is priced by the accelerator (here with every part on the
    constants fallback, so it runs in seconds): the plan's predicted energy is within the
    cap, the cap binds, and the fallback is marked in the plan notes."""
    from hfbconvert.hw.planner import engine_prices
    from hfbconvert.models.loading import load_model
    from hfbconvert.plan import LayerPlan

    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    base = ["compress", inputs["model"], "--calib", inputs["calib"], "--dry-run", "--json",
            "-q", "--activation-bits", "8"]
    free = json.loads(_run(*base).stdout)["plan"]
    res = _run(*base, "--energy-budget", "0.8", "--energy-model", "hybrid_int8")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert any("priced on hybrid_int8" in n for n in plan["notes"])
    assert any("priced by the constants model" in n for n in plan["notes"])
    net, info = load_model(str(inputs["model"]))
    names = [lp["name"] for lp in plan["layers"]]
    p = engine_prices(net, info.resolution, names, "hybrid_int8", 8)

    def total(pl):
        return p.fixed_pj + sum(p.plan_pj(LayerPlan(**lp)) for lp in pl["layers"])
    assert total(plan) <= 0.8 * p.reference_pj * (1 + 1e-6)
    assert total(free) > 0.8 * p.reference_pj  # so the cap binds
    # the plan carries the prices its cap was set with (the report prices the result by them)
    rec = plan["energy_pricing"]
    assert rec["accelerator"] == "hybrid_int8" and rec["energy_model"] == "hybrid_int8"
    assert rec["predicted_pj"] == pytest.approx(total(plan))
    assert rec["cap_pj"] == pytest.approx(0.8 * p.reference_pj)
    assert "energy_pricing" not in free


@needs_zigzag
def test_report_uses_the_energy_model_that_priced_the_budget(inputs, tmp_path,
                                                             monkeypatch) -> None:
    """A model planned with --energy-model: the report's energy budget line and
    energy_fraction_used are the accelerator's (the plan's stored prices at the final
    non-zeros), not the constants table's, which is given beside it."""
    from hfbconvert import schemas
    from hfbconvert.hw.planner import priced_pj

    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    out = tmp_path / "e.hfb.pt"
    res = _run("compress", inputs["model"], "--calib", inputs["calib"], "-q", "--steps", "0",
               "--activation-bits", "8", "--energy-budget", "0.8", "--energy-model",
               "hybrid_int8", "-o", out)
    assert res.exit_code == 0, res.output
    rep = json.loads(_run("report", out, "--json").stdout)
    schemas.validate(rep, "report")
    bud = rep["totals"]["budget"]
    from hfbconvert.artifact import load_compressed_meta

    _info, meta = load_compressed_meta(str(out))
    rec = meta["plan"]["energy_pricing"]
    used = priced_pj(rec, meta["cost"]["layers"]) / rec["reference_pj"]
    assert bud["energy_model"] == "hybrid_int8"
    assert bud["energy_fraction_used"] == pytest.approx(used)
    assert bud["energy_fraction_used_constants"] != pytest.approx(used)
    text = _run("report", out).output
    assert "energy on the hybrid_int8 accelerator model" in text
    assert f"used {used:.1%}" in text
