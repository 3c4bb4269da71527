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


@pytest.mark.parametrize("pack", ["2bit", "base3"])
def test_onnx_workload_is_the_model_workload(tmp_path, pack) -> None:
    """The workload read from an exported file (shapes from onnxruntime, each bank paired
    with its critical Conv, densities unpacked from W_b / W_c) is the PyTorch model's, part
    for part; a layer with no critical filters is an unpaired bank."""
    from dataclasses import asdict

    import torch

    from hfbconvert.export.onnx import export_onnx
    from hfbconvert.hw.workload import from_model, from_onnx
    from hfbconvert.layers import find_pointwise
    from hfbconvert.models.mobilenet_v1 import MobileNetV1
    from hfbconvert.pipeline import build_hybrid
    from hfbconvert.plan import LayerPlan

    g = torch.Generator().manual_seed(0)
    net = MobileNetV1(width_mult=0.25, num_classes=10).eval()
    layers = find_pointwise(net, 32)
    plans = [LayerPlan(ly.name, n_c, ly.c_out - n_c + 1, list(range(n_c)), ly.c_in, ly.c_out,
                       ly.pixels) for ly, n_c in zip(layers, [0] + [ly.c_out // 4
                                                                     for ly in layers[1:]])]
    hybrid = build_hybrid(net, plans, {ly.name: ly.kind for ly in layers})
    for lp in plans:
        h = hybrid.get_submodule(lp.name)
        h.set_factors(torch.randint(-1, 2, (h.r, h.c_in), generator=g).float(),
                      torch.rand(h.r, generator=g),
                      torch.randint(-1, 2, (h.n_tolerant, h.r), generator=g).float())
        h.freeze()
    path = tmp_path / "h.onnx"
    export_onnx(hybrid, path, 32, pack=pack)

    def strip(lay) -> dict:
        d = asdict(lay)
        d.pop("name")
        for p in d["parts"]:
            p.pop("name")
            p["density"] = round(p["density"], 9)
        return d
    want, got = from_model(hybrid, 32), from_onnx(str(path))
    assert [strip(x) for x in got] == [strip(x) for x in want]
    kinds = [x.kind for x in got]
    assert kinds.count("hybrid") == len(plans) and {"conv", "depthwise"} <= set(kinds)
    assert got[-1].kind == "hybrid" and got[-1].parts[0].ox * got[-1].parts[0].oy == 1  # Gemm
    first = next(x for x in got if x.kind == "hybrid")
    assert first.extra["critical"] == 0 and [p.stage for p in first.parts] == ["wb", "wc"]
    assert 0.5 < first.parts[0].density < 0.8  # random codes: about 2/3 non-zero
