"""Tiny random MobileNets and images for fast end-to-end tests (no shared data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hfbconvert.models.info import ModelInfo
from hfbconvert.models.mobilenet_v1 import MobileNetV1

TINY_CONFIG = {"width_mult": 0.25, "num_classes": 10, "padding": "pytorch", "stem_stride": 1,
               "batchnorm": "unfolded"}
TINY_RES = 32


def tiny_v1(seed: int = 0) -> MobileNetV1:
    torch.manual_seed(seed)
    m = MobileNetV1(**TINY_CONFIG)
    # non-trivial BN statistics so the net is not degenerate
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
    return m.eval()


def tiny_info() -> ModelInfo:
    return ModelInfo(arch="mobilenet_v1", config=dict(TINY_CONFIG), resolution=TINY_RES,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop=1.0,
                     resize_mode="crop_then_resize", num_classes=10)


def write_reference_checkpoint(path: Path, seed: int = 0) -> Path:
    m = tiny_v1(seed)
    torch.save({"format": "mobilenet-reference-checkpoint/1", "arch": "mobilenet_v1",
                "width_mult": 0.25, "resolution": TINY_RES, "num_classes": 10, "label_offset": 0,
                "padding": "pytorch", "stem_stride": 1, "activation": "relu6",
                "batchnorm": "unfolded", "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
                "eval_crop": 1.0, "state_dict": m.state_dict()}, path)
    return path


def write_npz(path: Path, n: int = 64, seed: int = 0, labels: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    # smooth random images (low-frequency), closer to natural statistics than white noise
    base = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
    img = np.kron(base, np.ones((1, 8, 8, 1), dtype=np.float32))
    img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
    arrays = {"images": img}
    if labels:
        arrays["labels"] = rng.integers(0, 10, size=n)
    np.savez(path, **arrays)
    return path
