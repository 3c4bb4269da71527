"""Report files: schema, rows and totals match the metadata, self-contained, byte-stable,
and the HTML renders in a real browser without errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hfbconvert.costs import model_cost
from hfbconvert.layers import find_pointwise
from hfbconvert.models.info import ModelInfo
from hfbconvert.models.mobilenet_v1 import MobileNetV1
from hfbconvert.pipeline import build_hybrid
from hfbconvert.plan import LayerPlan, Plan
from hfbconvert.report import build_report, render_markdown, write_reports

RES = 32
BUDGETS = [1, 2, 4]


def _codes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=g).float()


def fake_meta(seed: int = 0, net: torch.nn.Module | None = None,
              res: int = RES) -> tuple[dict, ModelInfo]:
    """Metadata shaped like compress() returns, from a tiny real model (no fitting)."""
    g = torch.Generator().manual_seed(seed)
    net = net if net is not None else MobileNetV1(width_mult=0.25, num_classes=10).eval()
    info = ModelInfo("mobilenet_v1", net.config, resolution=res, num_classes=10,
                     source="builtin:tiny")
    layers = find_pointwise(net, res)
    plans = []
    for ly in layers:
        n_c = ly.c_out // 4
        crit = sorted(torch.randperm(ly.c_out, generator=g)[:n_c].tolist())
        plans.append(LayerPlan(ly.name, n_c, ly.c_out - n_c, crit, ly.c_in, ly.c_out,
                               ly.pixels, 0.01 + 0.001 * len(plans)))
    hybrid = build_hybrid(net, plans, {ly.name: ly.kind for ly in layers})
    for lp in plans:
        h = hybrid.get_submodule(lp.name)
        h.set_factors(_codes((h.r, h.c_in), g), torch.rand(h.r, generator=g),
                      _codes((h.n_tolerant, h.r), g))
        h.freeze()
    orig = model_cost(net, res)
    plan = Plan("hybrid", plans, 0.536, sum(c.muls for c in orig.layers
                                            if c.name not in {ly.name for ly in layers}),
                orig.muls, orig.adds)
    sens = {ly.name: (torch.rand(ly.c_out, 1, generator=g) * 0.5 + 0.05
                      ) * torch.tensor([1.0, 0.5, 0.2]) for ly in layers}
    meta = {
        "config": {"method": "hybrid", "budget": 0.536, "max_add_increase": 0.48},
        "plan": plan.to_dict(),
        "sensitivity": {n: c.tolist() for n, c in sens.items()},
        "budgets": BUDGETS,
        "fragility": {ly.name: 1.0 + i for i, ly in enumerate(layers)},
        "layers": [ly.to_dict() for ly in layers],
        "calibration": {"source": "calib.npz", "n_images": 200, "held_images": 20},
        "finetune_log": {"steps": [0, 10, 20], "loss": [1.0, 0.5, 0.3],
                         "agreement": [0.5, 0.8, 0.9]},
        "stages": [{"stage": "fit", "agreement": 0.41, "seconds": 1.2},
                   {"stage": "sequential", "agreement": 0.83, "seconds": 3.4},
                   {"stage": "finetune_20", "agreement": 0.91, "seconds": 9.9}],
        "final_agreement": 0.91,
        "cost": model_cost(hybrid, res).to_dict(),
        "original_cost": orig.to_dict(),
        "layer_errors": {ly.name: {"bank_loss_before_ft": 0.2, "bank_loss_after_ft": 0.1,
                                   "output_rel_err": 0.05} for ly in layers[:-1]},
        "source_model": "builtin:tiny",
        "versions": {"hfbconvert": "0", "torch": torch.__version__},
    }
    # the last layer has no error entry: the report must say n/a, not fail
    meta["layer_errors"][layers[-1].name] = {"bank_loss_before_ft": None,
                                             "bank_loss_after_ft": float("nan"),
                                             "output_rel_err": None}
    return meta, info


@pytest.fixture(scope="module")
def sample() -> tuple[dict, ModelInfo]:
    return fake_meta()


@pytest.fixture(scope="module")
def written(sample, tmp_path_factory) -> list[Path]:
    meta, info = sample
    export = {"output": "m.onnx", "export": {"bytes": 12345},
              "verify": {"passed": True, "max_rel_diff": 1e-6, "agreement": 1.0}}
    return write_reports(meta, info, tmp_path_factory.mktemp("rep"), export=export)


def test_json_rows_and_totals(sample, written):
    meta, _ = sample
    rep = json.loads(written[0].read_text())
    assert [p.name for p in written] == ["report.json", "report.md", "report.html"]
    assert rep["schema_version"] == 1
    names = [ly["name"] for ly in meta["layers"]]
    assert [r["name"] for r in rep["layers"]] == names
    after = {c["name"]: c for c in meta["cost"]["layers"]}
    before = {c["name"]: c for c in meta["original_cost"]["layers"]}
    for r in rep["layers"]:
        ex = after[r["name"]]["extra"]
        assert (r["critical"], r["tolerant"], r["r"]) == (ex["critical"], ex["tolerant"], ex["r"])
        assert r["before"]["muls"] == before[r["name"]]["muls"]
        assert r["after"]["adds"] == after[r["name"]]["adds"]
        assert r["median_loss"] is not None and len(r["median_loss"]) == len(BUDGETS)
    assert rep["layers"][-1]["bank_loss_after_ft"] is None  # NaN -> null, strict JSON
    other = rep["other_layers"]
    for key in ("muls", "adds", "bytes"):
        for side, cost in (("before", "original_cost"), ("after", "cost")):
            per = sum(r[side][key] for r in rep["layers"]) + other[side][key]
            assert per == pytest.approx(meta[cost]["totals"][key])
    tot = rep["totals"]
    assert tot["original"]["muls"] == meta["original_cost"]["totals"]["muls"]
    assert tot["compressed"]["muls"] == meta["cost"]["totals"]["muls"]
    assert tot["change"]["muls"] < 0
    assert rep["export"]["verify"]["passed"] is True
    assert rep["conventions"]["energy_source"].startswith("Horowitz")
    assert any("non-zeros" in c for c in rep["conventions"]["counting"])


def test_markdown_and_html_content(sample, written):
    meta, _ = sample
    md, page = written[1].read_text(), written[2].read_text()
    for ly in meta["layers"]:
        assert ly["name"] in md and ly["name"] in page
    assert "n/a" in md and "Horowitz" in md and "other (14 layers" in md
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert page.count("data:image/png;base64,") == 4  # costs, sensitivity, stages, finetune


def test_deterministic_bytes(sample, tmp_path):
    meta, info = sample
    outs = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        outs.append(write_reports(meta, info, tmp_path / sub))
    for pa, pb in zip(*outs):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_missing_optional_keys():
    """Only the plan and costs: every optional section degrades to n/a / no plot."""
    meta, info = fake_meta()
    for k in ("sensitivity", "fragility", "layer_errors", "finetune_log", "stages",
              "calibration", "final_agreement", "reconstruction", "versions", "layers"):
        meta.pop(k, None)
    rep = build_report(meta, None)
    assert len(rep["layers"]) == len(meta["plan"]["layers"])
    assert rep["layers"][0]["output_rel_err"] is None
    assert "n/a" in render_markdown(rep)
    assert build_report({}, None)["layers"] == []


@pytest.mark.parametrize("act_bits", [32, 8])
def test_size_and_energy_caps_are_reported(act_bits):
    """The summary names each cap and how much of it the model uses; the energy cap is
    measured against the original at the compressed model's activation bits."""
    from hfbconvert.costs import ENERGY_PJ

    meta, info = fake_meta()
    comp, orig = meta["cost"]["totals"], meta["original_cost"]["totals"]
    comp["activation_bits"] = act_bits
    ref = (orig["muls"] * ENERGY_PJ["int8_mul"] + orig["adds"] * ENERGY_PJ["int32_add"]
           if act_bits == 8 else orig["energy_pj"])
    meta["config"].update(size_budget=0.9, energy_budget=0.01)
    rep = build_report(meta, info)
    bud = rep["totals"]["budget"]
    assert bud["size_fraction_used"] == pytest.approx(comp["bytes"] / orig["bytes"])
    assert bud["energy_fraction_used"] == pytest.approx(comp["energy_pj"] / ref)
    md = render_markdown(rep)
    assert "size budget 90.0% (stored bytes" in md
    assert re.search(r"energy budget 1\.0% .*used \d+\.\d%.*\(OVER BUDGET\)", md)
    meta["config"].pop("size_budget")
    assert "size budget" not in render_markdown(build_report(meta, info))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium not on PATH: cannot render the HTML "
                    "(apt-get install chromium to run this check)")
def test_html_renders_in_chromium(written, tmp_path):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
           "--v=0", "--dump-dom", written[2].resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert '<table id="layers">' in dom and '<table id="totals">' in dom
    assert dom.count("<img") == 4
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
