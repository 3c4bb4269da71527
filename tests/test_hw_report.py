"""report --hw (hardware section, inline SVG) and the what-if knobs of bench/hw.py. The
engine is replaced by the constants model where a whole model is priced (seconds)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from hfbconvert import schemas
from hfbconvert.cli import main
from hfbconvert.errors import InputError
from hfbconvert.hw import engine
from hfbconvert.hw.knobs import adder_width, scale_hidden_units
from hfbconvert.hw.spec import int_adder, load_design
from hfbconvert.hw.workload import Layer, hybrid_parts

from .tiny import write_npz, write_reference_checkpoint

HAS_ZIGZAG = importlib.util.find_spec("zigzag") is not None


def _hyb(r: int = 12) -> Layer:
    parts = hybrid_parts("pw", 16, 4, 12, r, 8, 8, 1, 8, 32, 32, 0.6, 0.5)
    return Layer("pw", "hybrid", parts, scale_muls=r * 64,
                 extra={"c_in": 16, "c_out": 16, "critical": 4, "r": r})


def test_scale_hidden_units_changes_only_the_bank() -> None:
    lay = _hyb(12)
    (half,) = scale_hidden_units([lay], 0.5)
    crit, wb, wc = half.parts
    assert crit == lay.parts[0]
    assert (wb.k, wb.c, wc.k, wc.c) == (6, 16, 12, 6)
    assert half.scale_muls == 6 * 64 and half.extra["r"] == 6
    assert (wb.density, wc.density) == (0.6, 0.5)
    assert wb.ops + wc.ops == (lay.parts[1].ops + lay.parts[2].ops) // 2
    assert scale_hidden_units([lay], 0.01)[0].extra["r"] == 1  # at least one hidden unit
    with pytest.raises(InputError):
        scale_hidden_units([lay], 0)


def test_adder_width_narrows_adders_and_hidden_units() -> None:
    des = load_design("hybrid_int8")
    d16, (lay,) = adder_width(des, [_hyb()], 16)
    assert d16.adder_unit == int_adder(16) and d16.n_adder > des.n_adder
    assert d16.n_mac == des.n_mac and d16.compute_area_um2 == des.compute_area_um2
    crit, wb, wc = lay.parts
    assert crit == _hyb().parts[0]
    assert (wb.o_bits, wb.of_bits, wc.i_bits, wc.o_bits, wc.of_bits) == (16, 16, 16, 16, 8)
    with pytest.raises(InputError, match="int8"):
        adder_width(load_design("hybrid_fp32"), [], 16)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("hwrep")
    model = write_reference_checkpoint(d / "tiny.pt")
    calib = write_npz(d / "calib.npz", n=32)
    out = d / "tiny.hfb.pt"
    res = CliRunner().invoke(main, ["compress", str(model), "--calib", str(calib), "--steps",
                                    "0", "--no-reconstruct", "--min-agreement", "0", "-q",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _one_line_exit_2(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    errs = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in errs[0], (n, errs[0])


@pytest.mark.skipif(not HAS_ZIGZAG, reason="zigzag-dse not installed")
def test_report_hw_section(artifact, tmp_path, monkeypatch) -> None:
    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    hw = tmp_path / "hw.json"
    res = CliRunner().invoke(main, ["hw", str(artifact), "--accelerator", "hybrid_fp32",
                                    "-o", str(hw), "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(hw.read_text())
    n_hybrid = sum(r["kind"] == "hybrid" for r in data["hybrid_on_design"]["layers"])
    assert n_hybrid > 0
    res = CliRunner().invoke(main, ["report", str(artifact), "--hw", str(hw),
                                    "--output-dir", str(tmp_path / "rep"), "-q"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Hardware (accelerator model)" in page and page.count("<svg") == 2
    # one bar per level per design in the totals plot, then original + hybrid per layer
    assert page.count("<rect") == 3 * 2 + 3 * 2 * n_hybrid + 2 * 3  # + legend swatches
    assert "Priced by the constants model" in page  # the fallback is marked
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["hardware"]["comparison"] == data["comparison"]
    schemas.validate(rep, "report")
    assert "## Hardware (accelerator model)" in (tmp_path / "rep" / "report.md").read_text()
    # without --hw: no hardware key, no section
    res = CliRunner().invoke(main, ["report", str(artifact), "--json", "-q"])
    assert res.exit_code == 0 and "hardware" not in json.loads(res.stdout)


def test_report_hw_bad_file(artifact, tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_exit_2(CliRunner().invoke(main, ["report", str(artifact), "--hw", str(bad)]),
                     str(bad), "JSON")
    bad.write_text(json.dumps({"model": "x"}))
    _one_line_exit_2(CliRunner().invoke(main, ["report", str(artifact), "--hw", str(bad)]),
                     "original_on_baseline")
    _one_line_exit_2(CliRunner().invoke(main, ["report", str(artifact), "--hw",
                                               str(tmp_path / "none.json")]), "no such file")


@pytest.mark.skipif(not HAS_ZIGZAG, reason="zigzag-dse not installed")
def test_hw_cli_bad_inputs(artifact, tmp_path, monkeypatch) -> None:
    """A model too large for the memory hierarchy: one line naming the layer and the field,
    exit 2; a layer the engine cannot map: priced by constants and listed."""
    small = tmp_path / "small.yaml"
    small.write_text("name: s\nprecision: fp32\ncompute_area_um2: 3042304\n"
                     "mac_area_fraction: 0.5\nmemory: {act_sram_kib: 1}\n")
    _one_line_exit_2(CliRunner().invoke(main, ["hw", str(artifact), "--accelerator",
                                               str(small)]),
                     "too large", "layer ", "act_sram_kib")
    listy = tmp_path / "list.yaml"
    listy.write_text("- name: x\n")
    _one_line_exit_2(CliRunner().invoke(main, ["hw", str(artifact), "--accelerator",
                                               str(listy)]), str(listy), "mapping")

    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    res = CliRunner().invoke(main, ["hw", str(artifact), "--accelerator", "hybrid_fp32",
                                    "-q"])
    assert res.exit_code == 0, res.output
    assert "Layers priced by the constants model (engine could not map them): " in res.output
    assert "| constants |" in res.output


def _point(knob: str, cycles_ratio: float, saving: float) -> dict:
    e = {"compute": 1.0, "onchip": 2.0, "dram": 1.0, "total": 4.0}
    rows = [{"name": "dw", "kind": "depthwise", "cycles": 10.0, "energy_pj": e},
            {"name": "pw", "kind": "hybrid", "cycles": 5.0, "energy_pj": e}]
    return {"knob": knob, "value": 1, "mac_area_fraction": 0.5, "r_scale": 1.0,
            "adder_bits": 32, "cycles_ratio": cycles_ratio, "energy_saving": saving,
            "energy_ratio": 1 - saving, "cycles": {"original": 100.0, "hybrid": 100.0},
            "meets_goal": cycles_ratio <= 1 and saving >= 0.2,
            "energy_pj": {"original": {**e, "total": 10e6}, "hybrid": {**e, "total": 9e6}},
            "layers_hybrid": rows, "layers_original": [dict(rows[0], cycles=5.0)]}


def test_knob_verdict_names_what_meets_the_goal_or_why_not() -> None:
    from bench.hw import _verdict

    (text,) = _verdict({"goal_saving": 0.2, "points": [_point("a", 1.2, 0.1),
                                                         _point("b", 0.9, 0.25)]})
    assert text.startswith("Met by b ") and "25.0% less energy" in text
    (text,) = _verdict({"goal_saving": 0.2, "points": [_point("a", 1.2, 0.3),
                                                         _point("b", 1.5, 0.1)]})
    assert "No point meets the goal" in text and "energy goal alone is reached by a" in text
    assert "No point is as fast as int8 PTQ (fastest: a " in text
    assert "take 10 cycles against 5 on the MAC-only baseline" in text


def test_report_energy_budget_names_its_pricing_model() -> None:
    """Without --energy-model the energy budget is the constants table's (and says so); with
    stored accelerator prices the used fraction is theirs, priced from the final model's
    counts, and the constants fraction is kept beside it. No engine needed."""
    from hfbconvert.report import build_report, render_markdown

    from .test_report import fake_meta

    meta, info = fake_meta()
    meta["config"]["energy_budget"] = 0.9
    bud = build_report(meta, info)["totals"]["budget"]
    assert bud["energy_model"] == "constants"
    assert bud["energy_fraction_used"] == bud["energy_fraction_used_constants"] is not None
    meta["config"]["energy_model"] = "hybrid_int8"  # priced by an accelerator, prices lost
    bud = build_report(meta, info)["totals"]["budget"]
    assert bud["energy_model"] == "hybrid_int8" and bud["energy_fraction_used"] is None
    rows = {r["name"]: r for r in meta["cost"]["layers"]}
    layers = {}
    for lp in meta["plan"]["layers"]:
        layers[lp["name"]] = {"c_in": lp["c_in"], "c_out": lp["c_out"], "pixels": lp["pixels"],
                              "critical_pj_per_op": 2.0, "wb_mem_pj_per_op": 1.0,
                              "wc_mem_pj_per_op": 1.0, "adder_pj": 0.5}
    meta["plan"]["energy_pricing"] = {
        "energy_model": "my_acc.yaml", "accelerator": "my_acc", "reference_pj": 1e9,
        "fixed_pj": 1e6, "cap_pj": 9e8, "predicted_pj": 0.0, "scale_mul_pj": 3.0,
        "layers": layers}
    want = 1e6
    for name, lp in layers.items():
        ex, pix, c = rows[name]["extra"], lp["pixels"], lp["c_in"]
        want += (ex["critical"] * c * pix * 2.0 + ex["r"] * c * pix + ex["tolerant"] * ex["r"]
                 * pix + 0.5 * (ex["nnz_wb"] + ex["nnz_wc"]) * pix + 3.0 * ex["r"] * pix)
    rep = build_report(meta, info)
    schemas.validate(rep, "report")
    bud = rep["totals"]["budget"]
    assert bud["energy_model"] == "my_acc"
    assert bud["energy_fraction_used"] == pytest.approx(want / 1e9)
    assert bud["energy_fraction_used_constants"] != pytest.approx(want / 1e9)
    md = render_markdown(rep)
    assert "energy budget 90.0% (energy on the my_acc accelerator model" in md
    assert f"used {want / 1e9:.1%}" in md and "arithmetic energy by the constants table" in md
