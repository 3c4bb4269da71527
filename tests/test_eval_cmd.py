"""``eval``: labels follow the model's class names, mismatched originals are refused, and
an exported ``.onnx`` (with its preprocessing metadata) scores like its ``.hfb.pt``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from torch import nn

from hfbconvert import __version__
from hfbconvert.calib.imagenet import imagenet_wnids
from hfbconvert.cli import main
from hfbconvert.export.onnx import build_onnx
from hfbconvert.models.mobilenet_v1 import MobileNetV1

from .tiny import TINY_CONFIG, write_npz

pytestmark = pytest.mark.usefixtures("one_thread")

# class names whose sorted order is not the class order
NAMES = ["zebra", "yak", "wolf", "vole", "tiger", "stoat", "rhino", "puma", "otter", "newt"]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(res: Result) -> Result:
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    return res


def one_error(res: Result, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and res.stdout == ""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _checkpoint(path: Path, images: np.ndarray, num_classes: int = 10, label_offset: int = 0,
                classes: list[str] | None = None) -> nn.Module:
    """A tiny reference checkpoint whose BatchNorm statistics are measured on ``images``
    (random statistics give every image the same top-1); returns the model."""
    torch.manual_seed(0)
    model = MobileNetV1(**dict(TINY_CONFIG, num_classes=num_classes))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    ckpt = {"format": "mobilenet-reference-checkpoint/1", "arch": "mobilenet_v1",
            "width_mult": 0.25, "resolution": 32, "num_classes": num_classes,
            "label_offset": label_offset, "padding": "pytorch", "stem_stride": 1,
            "activation": "relu6", "batchnorm": "unfolded",
            "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}, "eval_crop": 1.0,
            "state_dict": model.state_dict()}
    if classes is not None:
        ckpt["classes"] = classes
    torch.save(ckpt, path)
    return model


def _predictions(model: nn.Module, images: np.ndarray) -> list[int]:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    with torch.no_grad():
        return model(x).argmax(1).tolist()


def _folder(root: Path, images: np.ndarray, names: list[str | None]) -> Path:
    """``root/<name>/i.png`` per image (lossless: the folder reads as the npz does)."""
    for i, (img, name) in enumerate(zip(images, names, strict=True)):
        if name is None:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("eval")
    npz = write_npz(d / "calib.npz", n=48)
    images = np.load(npz)["images"]
    model = _checkpoint(d / "named.pt", images, classes=NAMES)
    preds = _predictions(model, images)
    assert len(set(preds)) > 1, "degenerate test model"
    # every image in the folder of the class the model predicts: correct mapping = 1.0
    folder = _folder(d / "named", images, [NAMES[p] for p in preds])
    return {"dir": d, "npz": npz, "images": images, "model": d / "named.pt", "folder": folder,
            "preds": preds}


def _eval_json(*args: str | Path) -> dict:
    return json.loads(ok(run("eval", *args, "--json")).stdout)


def test_folder_labels_follow_the_models_class_names(setup) -> None:
    res = ok(run("eval", setup["model"], "--data", setup["folder"], "--json"))
    assert json.loads(res.stdout)["top1"] == 1.0
    assert res.stderr == ""


def test_class_names_match_case_insensitively(setup, tmp_path) -> None:
    folder = _folder(tmp_path / "f", setup["images"], [NAMES[p].upper() for p in setup["preds"]])
    assert _eval_json(setup["model"], "--data", folder)["top1"] == 1.0


def test_unknown_class_folders_exit_2(setup, tmp_path) -> None:
    folder = _folder(tmp_path / "cd", setup["images"][:4], ["cat", "dog", "cat", "yak"])
    one_error(run("eval", setup["model"], "--data", folder), str(folder), "cat, dog",
              "10 class names")


def test_model_without_class_names_warns(setup, tmp_path) -> None:
    _checkpoint(tmp_path / "plain.pt", setup["images"])
    res = ok(run("eval", tmp_path / "plain.pt", "--data", setup["folder"]))
    assert "warning:" in res.stderr and "no class names" in res.stderr
    assert "sorted order" in res.stderr


def test_npz_labels_are_used_as_is(setup) -> None:
    res = ok(run("eval", setup["model"], "--data", setup["npz"], "--json"))
    labels = np.load(setup["npz"])["labels"]
    top1 = float(np.mean(np.array(setup["preds"]) == labels))
    assert json.loads(res.stdout)["top1"] == pytest.approx(top1) and res.stderr == ""


def test_imagenet_wnid_folders_with_label_offset(setup, tmp_path) -> None:
    """A 1001-way model without names (logit 0 = background): wnid folders map to the
    ImageNet class index, whatever subset of classes the folder holds."""
    model = _checkpoint(tmp_path / "in.pt", setup["images"], num_classes=1001, label_offset=1)
    wnids = imagenet_wnids()
    preds = _predictions(model, setup["images"])
    names = [wnids[p - 1] if p > 0 else None for p in preds]
    assert sum(n is not None for n in names) > 4 and len(set(names)) > 2
    folder = _folder(tmp_path / "val", setup["images"], names)
    res = ok(run("eval", tmp_path / "in.pt", "--data", folder, "--json"))
    assert json.loads(res.stdout)["top1"] == 1.0 and res.stderr == ""
    bad = _folder(tmp_path / "bad", setup["images"][:2], ["n01440764", "kitten"])
    one_error(run("eval", tmp_path / "in.pt", "--data", bad), str(bad), "kitten", "wnids")


def test_original_with_another_class_count_exits_2(setup, tmp_path) -> None:
    other = tmp_path / "other.pt"
    _checkpoint(other, setup["images"], num_classes=1001, label_offset=1)
    one_error(run("eval", setup["model"], "--data", setup["npz"], "--original", other),
              str(other), str(setup["model"]), "1001", "10")


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(setup) -> dict:
    d = setup["dir"]
    hfb = d / "named.hfb.pt"
    ok(run("compress", setup["model"], "--calib", setup["npz"], "--steps", "0",
           "--no-reconstruct", "-o", hfb, "--min-agreement", "0", "-q"))
    out = d / "named.onnx"
    ok(run("export", "onnx", hfb, "-o", out, "--no-verify", "--no-report", "-q"))
    return {"hfb": hfb, "onnx": out}


def test_onnx_carries_metadata(setup, exported) -> None:
    from hfbconvert.export.onnx import read_metadata

    meta = read_metadata(onnx.load(str(exported["onnx"])))
    assert meta["version"] == __version__
    pre = json.loads(meta["preprocess"])
    assert pre["resolution"] == 32 and pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    assert pre["crop"] == 1.0 and pre["resize_mode"] == "crop_then_resize"
    assert "bilinear" in pre["interpolation"] and "preset" in pre
    assert meta["label_offset"] == "0" and meta["num_classes"] == "10"
    assert json.loads(meta["classes"]) == NAMES
    assert meta["source_name"] == exported["hfb"].name
    assert meta["source_sha256"] == hashlib.sha256(exported["hfb"].read_bytes()).hexdigest()


def test_eval_onnx_matches_the_hfb_model(setup, exported, tmp_path) -> None:
    folder = _folder(tmp_path / "f", setup["images"], [NAMES[p] for p in setup["preds"]])
    (folder / NAMES[setup["preds"][0]] / "broken.png").write_bytes(b"not an image")
    on_hfb = ok(run("eval", exported["hfb"], "--data", folder, "--json"))
    on_onnx = ok(run("eval", exported["onnx"], "--data", folder, "--json", "--original",
                     setup["model"]))
    a, b = json.loads(on_hfb.stdout), json.loads(on_onnx.stdout)
    assert a["n"] == b["n"] == len(setup["images"])
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert b["agreement"] == a["agreement"]  # the hfb's original is the same checkpoint
    for res in (on_hfb, on_onnx):
        assert "skipped 1 unreadable image" in res.stderr and "broken.png" in res.stderr


def test_eval_onnx_refuses_another_class_count(setup, exported, tmp_path) -> None:
    other = tmp_path / "other.pt"
    _checkpoint(other, setup["images"], num_classes=1001, label_offset=1)
    one_error(run("eval", exported["onnx"], "--data", setup["npz"], "--original", other),
              str(other), str(exported["onnx"]), "1001", "10")


def test_eval_onnx_without_metadata_exits_2(setup, tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "bare.onnx"
    path.write_bytes(build_onnx(MobileNetV1(**TINY_CONFIG).eval(), 32).SerializeToString())
    one_error(run("eval", path, "--data", setup["npz"]), str(path), "metadata")


def test_eval_onnx_unreadable_file_exits_2(setup, tmp_path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00garbage" * 10)
    one_error(run("eval", path, "--data", setup["npz"]), str(path))
    one_error(run("eval", tmp_path / "missing.onnx", "--data", setup["npz"]), "missing.onnx")
