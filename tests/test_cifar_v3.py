"""A CIFAR MobileNetV3 (stem stride 1, which its weights cannot tell) round-trips through a
reference checkpoint, and bench/train_cifar.py writes one that hfbconvert loads as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hfbconvert.errors import InputError
from hfbconvert.models.loading import REFERENCE_FORMAT, load_model
from hfbconvert.models.mobilenet_v3 import MobileNetV3

CONFIG = {"mode": "small", "width_mult": 0.5, "num_classes": 10, "dropout": 0.2,
          "reduced_tail": False, "dilated": False, "stem_stride": 1}


def _ckpt(model: MobileNetV3, **over) -> dict:
    d = {"format": REFERENCE_FORMAT, "arch": "mobilenet_v3", "config": dict(model.config),
         "resolution": 32, "num_classes": 10, "label_offset": 0,
         "normalize": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]},
         "eval_crop": 1.0, "classes": [f"c{i}" for i in range(10)],
         "state_dict": model.state_dict()}
    d.update(over)
    return d


def test_stem_stride_changes_the_output_size_and_is_recorded() -> None:
    x = torch.randn(1, 3, 32, 32)
    m1, m2 = MobileNetV3(**CONFIG).eval(), MobileNetV3(**{**CONFIG, "stem_stride": 2}).eval()
    assert m1.features[0][0].stride == (1, 1) and m2.features[0][0].stride == (2, 2)
    assert m1.features(x).shape[-1] == 2 * m2.features(x).shape[-1]
    assert m1.config["stem_stride"] == 1
    assert "stem_stride" not in m2.config  # torchvision-layout configs are unchanged
    with pytest.raises(ValueError, match="stem_stride"):
        MobileNetV3(**{**CONFIG, "stem_stride": 3})


def test_reference_checkpoint_of_a_family_loads_with_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = MobileNetV3(**CONFIG).eval()
    path = tmp_path / "v3.pt"
    torch.save(_ckpt(src), path)
    model, info = load_model(str(path))
    assert info.arch == "mobilenet_v3" and info.config["stem_stride"] == 1
    assert info.resolution == 32 and info.crop == 1.0 and info.num_classes == 10
    assert info.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_reference_checkpoint_with_a_bad_config_is_refused(tmp_path: Path) -> None:
    src = MobileNetV3(**CONFIG)
    path = tmp_path / "bad.pt"
    torch.save(_ckpt(src, config=[1, 2]), path)
    with pytest.raises(InputError, match="'config' is not a dict"):
        load_model(str(path))
    torch.save(_ckpt(src, arch="alexnet"), path)
    with pytest.raises(InputError, match="unknown arch 'alexnet'"):
        load_model(str(path))


def test_train_cifar_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from PIL import Image

    from bench.train_cifar import main

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("b", "a"):  # label order must be the sorted folder names
            d = tmp_path / "cifar" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    out = tmp_path / "ckpt.pt"
    args = ["-o", str(out), "--data", str(tmp_path / "cifar"), "--epochs", "1",
            "--batch-size", "2", "--width", "0.25", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert main(args) == 2  # never overwrites without --force
    model, info = load_model(str(out))
    assert info.classes == ["a", "b"] and info.num_classes == 2
    assert info.config["stem_stride"] == 1 and info.resolution == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
