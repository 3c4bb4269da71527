"""The BatchNorm stage (bnadjust.py): after ``match`` the compressed network's BN outputs
have the original's per-channel mean and variance on the calibration images (compounding
included); ``reestimate`` normalizes them to mean 0 / variance 1; a BN-folded model is
skipped with a reason; the CLI flag reaches the pipeline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hfbconvert.bnadjust import bn_targets, match_bn, reestimate_bn
from hfbconvert.calib import preset_for
from hfbconvert.calib.readers import CalibData, load_images
from hfbconvert.cli import main
from hfbconvert.distill import FinetuneConfig
from hfbconvert.errors import InputError
from hfbconvert.models.mobilenet_v1 import MobileNetV1
from hfbconvert.pipeline import CompressConfig, compress

from .tiny import TINY_CONFIG, tiny_info, tiny_v1, write_npz, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
PREP = preset_for(tiny_info())
PW_BNS = [f"blocks.{i}.bn_pw" for i in range(13)]
FIT_ONLY = {"weight_bits": 32, "budget": 0.5, "ratios": (1.0, 2.0), "budgets": (1, 2),
            "finetune": FinetuneConfig(steps=0)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CalibData:
    return load_images(write_npz(tmp_path_factory.mktemp("bn") / "c.npz", n=80), PREP,
                       cache=False)


@pytest.fixture(scope="module")
def model(data: CalibData) -> nn.Module:
    """tiny_v1 with BN statistics from its own images, as in a trained net."""
    m = tiny_v1()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(data.normalized())
    return m.eval()


@pytest.fixture(scope="module")
def fitted(model: nn.Module, data: CalibData) -> nn.Module:
    """One-shot fit only (no BN stage): the starting point of every adjustment."""
    hybrid, _ = compress(model, tiny_info(), data, CompressConfig(**FIT_ONLY))
    return hybrid


def bn_output_moments(net: nn.Module, names: list[str], batches: list[torch.Tensor],
                      affine: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean/variance of each named BN's output (or of its normalized,
    pre-affine value when ``affine`` is False), eval mode."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for n in names:
        bn = net.get_submodule(n)

        def hook(m, inp, out, _n=n):
            if not affine:
                out = (inp[0] - m.running_mean[:, None, None]) / (
                    m.running_var[:, None, None] + m.eps).sqrt()
            outs[_n].append(out.double().transpose(0, 1).reshape(out.shape[1], -1))
        hooks.append(bn.register_forward_hook(hook))
    net.eval()
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    res = {}
    for n, parts in outs.items():
        y = torch.cat(parts, 1)
        res[n] = (y.mean(1), y.var(1, unbiased=False))
    return res


def moment_gap(a: dict, b: dict) -> float:
    """Largest per-channel difference of means or variances, relative to the channel's
    original standard deviation."""
    worst = 0.0
    for n, (ma, va) in a.items():
        mb, vb = b[n]
        sd = va.sqrt().clamp_min(1e-3)
        worst = max(worst, float(((ma - mb).abs() / sd).max()),
                    float(((va - vb).abs() / va.clamp_min(1e-6)).max()))
    return worst


def test_targets_are_the_bns_fed_by_pointwise_layers(model: nn.Module,
                                                      data: CalibData) -> None:
    x = data.normalized(slice(0, 2))
    pw = [f"blocks.{i}.conv_pw" for i in range(13)]
    assert bn_targets(model, x, pw) == PW_BNS
    every = bn_targets(model, x, pw, scope="all")
    assert every[0] == "bn_stem" and set(PW_BNS) < set(every) and len(every) == 27


@pytest.mark.parametrize(("scope", "max_bytes"), [("pointwise", 1 << 30), ("all", 1 << 30),
                                                  ("pointwise", 0)],
                         ids=["pointwise-one-pass", "all-one-pass", "pointwise-per-bn"])
def test_match_gives_original_bn_output_moments(model, fitted, data, scope,
                                                max_bytes) -> None:
    """One-pass (all images fit) and BN-by-BN passes (``max_bytes=0``) alike."""
    batches = [x for x, _ in data.batches(32)]
    names = bn_targets(model, batches[0][:2], [f"blocks.{i}.conv_pw" for i in range(13)],
                       scope)
    ref = bn_output_moments(model, names, batches)
    before = moment_gap(ref, bn_output_moments(fitted, names, batches))
    hybrid = copy.deepcopy(fitted)
    match_bn(model, hybrid, names, batches, max_bytes=max_bytes)
    after = moment_gap(ref, bn_output_moments(hybrid, names, batches))
    assert before > 0.05, before  # the fit alone leaves visible moment errors
    assert after < 1e-3, (before, after)


def test_reestimate_normalizes_to_zero_mean_unit_variance(model, fitted, data) -> None:
    batches = [data.normalized()]  # one batch: train-mode and eval-mode BN agree
    hybrid = copy.deepcopy(fitted)
    reestimate_bn(hybrid, PW_BNS, batches)
    assert not any(m.training for m in hybrid.modules())
    assert all(hybrid.get_submodule(n).momentum == fitted.get_submodule(n).momentum
               for n in PW_BNS)  # restored
    # the first target sees exactly the batch it was estimated on (later ones see
    # upstream outputs normalized by the unbiased running variance instead: close)
    for i, (n, (m, v)) in enumerate(bn_output_moments(hybrid, PW_BNS, batches,
                                                      affine=False).items()):
        tol = 0.02 if i == 0 else 0.1
        assert float(m.abs().max()) < tol, n
        assert float((v - 1).abs().max()) < tol + 0.02, n  # unbiased vs biased variance


def test_compress_records_the_stage(model: nn.Module, data: CalibData) -> None:
    _, meta = compress(model, tiny_info(), data, CompressConfig(**FIT_ONLY, bn_adjust="match"))
    names = [s["stage"] for s in meta["stages"]]
    assert names == ["fit", "bn_match"]
    assert meta["stages"][1]["agreement"] is not None and meta["stages"][1]["seconds"] >= 0
    assert meta["bn_adjust"]["layers"] == PW_BNS and "bn_adjust_skipped" not in meta


def test_bn_folded_model_is_skipped_with_a_reason(data: CalibData) -> None:
    torch.manual_seed(0)
    folded = MobileNetV1(**{**TINY_CONFIG, "batchnorm": "folded"}).eval()
    _, meta = compress(folded, tiny_info(), data, CompressConfig(**FIT_ONLY, bn_adjust="match"))
    assert [s["stage"] for s in meta["stages"]] == ["fit"]
    assert "folded" in meta["bn_adjust_skipped"] and "bn_adjust" not in meta


def test_unknown_mode_is_an_input_error(model: nn.Module, data: CalibData) -> None:
    with pytest.raises(InputError, match="bn_adjust"):
        compress(model, tiny_info(), data, CompressConfig(bn_adjust="yes"))


def test_cli_flag_help_and_bad_value() -> None:
    runner = CliRunner()
    help_text = runner.invoke(main, ["compress", "--help"]).output
    assert "--bn-adjust" in help_text and "reestimate" in help_text
    bad = runner.invoke(main, ["compress", "m.pt", "--bn-adjust", "maybe"])
    assert bad.exit_code == 2 and "maybe" in bad.output


def test_cli_flag_reaches_the_pipeline(tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt = write_reference_checkpoint(tmp_path / "tiny.pt")
    npz = write_npz(tmp_path / "c.npz", n=40)
    res = runner.invoke(main, ["compress", str(ckpt), "--calib", str(npz), "-o",
                               str(tmp_path / "o.pt"), "--bn-adjust", "reestimate", "--json",
                               "-q", "--min-agreement", "0", "--steps", "0"])
    assert res.exit_code == 0, res.output
    stages = [s["stage"] for s in json.loads(res.stdout)["stages"]]
    assert stages == ["fit", "bn_reestimate", "weights_16bit"]


def test_linear_bn1d_and_a_one_image_last_batch() -> None:
    """No MobileNet assumed: a Linear + BatchNorm1d pair is found and matched, and a
    trailing 1-image batch (which train-mode BN cannot normalize) does not break
    ``reestimate``."""
    torch.manual_seed(0)
    orig = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    batches = [torch.randn(5, 4), torch.randn(1, 4)]
    assert bn_targets(orig, batches[0][:2], ["0"]) == ["1"]
    hyb = copy.deepcopy(orig)
    with torch.no_grad():
        hyb[0].weight.mul_(1.5)
        hyb[0].bias.add_(0.3)
    match_bn(orig, hyb, ["1"], batches)
    x = torch.cat(batches)
    with torch.no_grad():
        assert torch.allclose(hyb(x).mean(0), orig(x).mean(0), atol=1e-5)
        assert torch.allclose(hyb(x).var(0), orig(x).var(0), rtol=1e-4)
    reestimate_bn(hyb, ["1"], batches)
    assert int(hyb[1].num_batches_tracked) == 1  # the 1-image batch joined the one before
