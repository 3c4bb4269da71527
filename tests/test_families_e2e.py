"""Every family a user deploys, through analyze -> compress -> eval -> export -> verify
(issue #15), on small random-weight instances loaded from plain state_dicts with
torchvision's key names: no pickle, family detected from the keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hfbconvert.artifact import load_compressed_meta
from hfbconvert.models import families

from .test_cli import ok, run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

RES = "64"
# ResNet-18's 3x3 convs hold 99% of its MULs: only its 1x1 downsamples and fc convert
CASES = {"mobilenet_v3_small": "0.536", "efficientnet_b0": "0.536", "mnasnet0_5": "0.536",
         "shufflenet_v2_x0_5": "0.536", "resnet18": "0.995"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(48, 8, 8, 3)).astype(np.float32)
    img = np.kron(base, np.ones((1, 8, 8, 1), np.float32)) + rng.normal(0, 12, (48, 64, 64, 3))
    path = tmp_path_factory.mktemp("fam") / "c.npz"
    np.savez(path, images=np.clip(img, 0, 255).astype(np.uint8),
             labels=rng.integers(0, 10, 48))
    return path


def _state_dict(name: str, path: Path) -> Path:
    fam, cfg = families.resolve(name)
    torch.manual_seed(0)
    m = families.FAMILIES[fam](**cfg, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():  # non-trivial statistics: a net whose logits depend on the input
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
    torch.save(m.state_dict(), path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_family_end_to_end(name: str, images: Path, tmp_path: Path) -> None:
    model = _state_dict(name, tmp_path / f"{name}.pt")
    sens = json.loads(ok(run("analyze", model, "--resolution", RES, "--calib", images,
                             "--budgets", "1,2", "--json", "-q")).stdout)
    fam = families.resolve(name)[0]
    assert sens["model"]["arch"] == fam and sens["layers"]
    out = tmp_path / "m.hfb.pt"
    res = json.loads(ok(run("compress", model, "--resolution", RES, "--calib", images,
                            "--steps", "0", "--budget", CASES[name], "-o", out, "--json",
                            "-q")).stdout)
    assert res["cost"]["muls"] <= float(CASES[name]) * res["original_cost"]["muls"] + 1
    ev = json.loads(ok(run("eval", out, "--data", images, "--original", model, "--json",
                           "-q")).stdout)
    assert ev["n"] == 48 and ev["agreement"] is not None
    exp = json.loads(ok(run("export", "onnx", out, "-o", tmp_path / "m.onnx", "--calib",
                            images, "--calib-size", "8", "--json", "-q")).stdout)
    assert exp["verify"]["passed"] and exp["verify"]["max_rel_diff"] < 1e-3
    assert exp["export"]["custom_ops"] > 0
    rep = json.loads(ok(run("report", out, "--json", "-q")).stdout)
    _, meta = load_compressed_meta(out)
    planned = {lp["name"] for lp in meta["plan"]["layers"]}
    assert planned and planned <= {ly["name"] for ly in rep["layers"]}


def test_int8_through_se_and_hardswish(images: Path, tmp_path: Path) -> None:
    """MobileNetV3: squeeze-excitation, hardswish and residual adds with int8 activations
    compress and export, and onnxruntime matches PyTorch."""
    model = _state_dict("mobilenet_v3_small", tmp_path / "v3.pt")
    out = tmp_path / "v3.hfb.pt"
    ok(run("compress", model, "--resolution", RES, "--calib", images, "--steps", "0",
           "--activation-bits", "8", "--min-agreement", "0", "-o", out, "-q"))
    exp = json.loads(ok(run("export", "onnx", out, "-o", tmp_path / "v3.onnx", "--calib",
                            images, "--json", "-q", "--no-report")).stdout)
    assert exp["verify"]["passed"]
