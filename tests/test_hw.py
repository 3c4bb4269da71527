"""hfbconvert hw: accelerator validation, area-equivalent design, a hand-computable layer,
CLI exit codes. ZigZag runs only on tiny workloads here."""

from __future__ import annotations

import importlib.util
import math

import pytest
from click.testing import CliRunner

from hfbconvert.cli import main
from hfbconvert.errors import InputError
from hfbconvert.hw.spec import ADD, MUL, design_from_dict, load_design, shipped
from hfbconvert.hw.workload import Layer, Part

HAS_ZIGZAG = importlib.util.find_spec("zigzag") is not None
needs_zigzag = pytest.mark.skipif(not HAS_ZIGZAG, reason="zigzag-dse not installed "
                                  "(pip install 'hfbconvert[hw]', Python >= 3.11)")


def _base(**kw):
    d = {"name": "t", "precision": "int8", "compute_area_um2": 419.0 * 16}
    d.update(kw)
    return d


@pytest.mark.parametrize("bad, field", [
    (_base(precision="int4"), "'precision'"),
    (_base(compute_area_um2=-1), "'compute_area_um2'"),
    (_base(mac_area_fraction=1.5), "'mac_area_fraction'"),
    (_base(memory={"dram_pj": "x"}), "'memory.dram_pj'"),
    (_base(memory={"sram": 1}), "'memory.sram'"),
    (_base(colour="red"), "'colour'"),
    ({"name": "t", "precision": "int8"}, "'compute_area_um2'"),
    (_base(mac_unit={"area_um2": 0}), "'mac_unit.area_um2'"),
])
def test_accelerator_validation_names_the_field(bad, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        design_from_dict(bad, "acc.yaml")


def test_shipped_accelerators_load():
    assert {"mac_int8", "mac_fp16", "mac_fp32", "hybrid_int8", "hybrid_fp16",
            "hybrid_fp32"} <= set(shipped())
    for name in shipped():
        load_design(name)


def test_area_equivalent_design_matches_ratio():
    base, hyb = load_design("mac_int8"), load_design("hybrid_int8")
    assert base.compute_area_um2 == hyb.compute_area_um2
    mac_a = MUL["int8"][1] + ADD["int32"][1]  # 282 + 137 um^2 (Horowitz)
    assert base.mac_unit[1] == mac_a and base.n_mac == 256
    assert hyb.adder_unit[1] == ADD["int32"][1]
    for f in (0.25, 0.5, 0.75):
        d = hyb.with_fraction(f)
        a = d.areas()
        assert a["mac_array_um2"] + a["adder_array_um2"] <= d.compute_area_um2
        assert a["mac_array_um2"] == pytest.approx(f * d.compute_area_um2, abs=mac_a)
        assert a["adder_array_um2"] == pytest.approx((1 - f) * d.compute_area_um2,
                                                     abs=ADD["int32"][1])


def _tiny_pw(k=16, c=16, ox=4):
    return [Layer("pw", "pointwise", [Part("pw", "mac", "dense", k, c, 1, ox, ox, 1, 1, 1,
                                           8, 8, 32, 8)])]


@needs_zigzag
def test_single_layer_macs_and_cycle_lower_bound():
    from hfbconvert.hw.engine import evaluate

    des = load_design("mac_int8")
    rep = evaluate(des, _tiny_pw())
    row = rep["layers"][0]
    assert row["mac_ops"] == 16 * 16 * 4 * 4  # k * c * pixels
    # 256 MACs: at least ops / units cycles
    assert row["cycles"] >= math.ceil(row["mac_ops"] / des.units("mac"))
    assert 0 < row["utilization"] <= 1
    e = row["energy_pj"]
    assert e["compute"] == pytest.approx(row["mac_ops"] * des.mac_unit[0])
    assert e["dram"] > 0 and e["onchip"] > 0


@needs_zigzag
def test_unmappable_part_falls_back_to_constants(monkeypatch):
    from hfbconvert.hw import engine

    def boom(self, core, layer):
        raise RuntimeError("cannot map")
    monkeypatch.setattr(engine.Engine, "_zigzag", boom)
    rep = engine.evaluate(load_design("mac_int8"), _tiny_pw())
    assert rep["layers"][0]["engine"] == "constants"
    assert rep["totals"]["fallback_layers"] == ["pw"]
    assert "cannot map" in rep["layers"][0]["parts"][0]["fallback_reason"]


def test_model_too_large_for_memory():
    from hfbconvert.hw.engine import check_fits

    des = design_from_dict(_base(memory={"act_sram_kib": 1}), "x.yaml")
    with pytest.raises(InputError, match="too large"):
        check_fits(des, _tiny_pw(k=64, c=64, ox=16))


def test_cli_bad_accelerator_exit_2(tmp_path):
    bad = tmp_path / "acc.yaml"
    bad.write_text("name: x\nprecision: int8\ncompute_area_um2: 1000\nmac_area_fraction: 2\n")
    r = CliRunner().invoke(main, ["hw", "builtin:any", "--accelerator", str(bad)])
    assert r.exit_code == 2
    assert "mac_area_fraction" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["hw", "builtin:any", "--accelerator", "nope"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


@needs_zigzag
def test_cli_missing_model_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["hw", str(tmp_path / "none.onnx"),
                                  "--accelerator", "mac_int8"])
    assert r.exit_code == 2 and "no such file" in r.output
