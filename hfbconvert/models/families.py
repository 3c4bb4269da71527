"""The torchvision-layout families (and EfficientNet-Lite): their named variants,
default preprocessing, and how a state_dict's keys and shapes identify them.

A family is one class (``ModelInfo.arch`` = the family name, ``ModelInfo.config`` its
constructor kwargs); a variant (``resnet50``, ``mobilenet_v3_small``...) is a family with
some kwargs fixed. ``--arch`` takes either: a family lets shapes decide the variant, a
variant name also fixes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import efficientnet as _eff
from . import efficientnet_lite as _lite
from . import mnasnet as _mnas
from . import resnet as _res
from . import shufflenet_v2 as _shuf
from .efficientnet import EfficientNet
from .efficientnet_lite import EfficientNetLite
from .mnasnet import MNASNet
from .mobilenet_v3 import MobileNetV3
from .resnet import ResNet
from .shufflenet_v2 import ShuffleNetV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FAMILIES: dict[str, type[nn.Module]] = {
    "mobilenet_v3": MobileNetV3,
    "efficientnet": EfficientNet,
    "efficientnet_lite": EfficientNetLite,
    "mnasnet": MNASNet,
    "shufflenet_v2": ShuffleNetV2,
    "resnet": ResNet,
}

CLASSIFIER_KEYS = {
    "mobilenet_v3": "classifier.3.weight",
    "efficientnet": "classifier.1.weight",
    "efficientnet_lite": "_fc.weight",
    "mnasnet": "classifier.1.weight",
    "shufflenet_v2": "fc.weight",
    "resnet": "fc.weight",
}

# What each family's state_dict looks like (named in "fits no known architecture" errors).
SIGNATURES = {
    "mobilenet_v1": "blocks.N.conv_pw.*",
    "mobilenet_v2": "features.N.conv.*",
    "mobilenet_v3": "features.N.block.* + classifier.3",
    "efficientnet": "features.N.M.block.* (torchvision B0-B7)",
    "efficientnet_lite": "_conv_stem/_blocks.N._depthwise_conv/_fc",
    "mnasnet": "layers.N.* + classifier.1",
    "shufflenet_v2": "conv1/stage2..4/conv5/fc",
    "resnet": "conv1/layer1..4/fc",
}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    config: dict[str, Any]  # the kwargs that make this variant (num_classes excluded)
    resolution: int = 224
    crop: float = 0.875  # resolution / torchvision's resize_size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "resize_then_crop"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _variants() -> dict[str, Variant]:
    out: list[Variant] = []
    for mode in ("small", "large"):
        out.append(Variant(f"mobilenet_v3_{mode}", "mobilenet_v3",
                           {"mode": mode, "width_mult": 1.0, "reduced_tail": False}))
    for name, (w, d, p, eps, res, crop) in _eff.VARIANTS.items():
        out.append(Variant(name, "efficientnet",
                           {"width_mult": w, "depth_mult": d, "dropout": p, "norm_eps": eps},
                           resolution=res, crop=crop,
                           note="torchvision resizes with bicubic; hfbconvert uses bilinear"))
    for name, (w, d, res, p) in _lite.VARIANTS.items():
        # The weights are a TF port and expect TF-Lite's normalisation (x - 127) / 128
        # with the TF eval crop 0.875, not the ImageNet mean/std of the package's demo:
        # on the shared 1,300 val images Lite0 scores 82.38 this way, 74.31 the demo's way.
        out.append(Variant(name, "efficientnet_lite",
                           {"width_mult": w, "depth_mult": d, "dropout": p},
                           resolution=res, crop=0.875, mean=(127 / 255,) * 3,
                           std=(128 / 255,) * 3,
                           note="package demo: ImageNet mean/std, Resize(res): 8 points lower"))
    for name, alpha in _mnas.ALPHAS.items():
        out.append(Variant(name, "mnasnet", {"alpha": alpha}))
    for name, w in _shuf.VARIANTS.items():
        out.append(Variant(name, "shufflenet_v2", {"width_mult": w}))
    for name, (depth, groups, wpg) in _res.VARIANTS.items():
        out.append(Variant(name, "resnet",
                           {"depth": depth, "groups": groups, "width_per_group": wpg}))
    return {v.name: v for v in out}


VARIANTS: dict[str, Variant] = _variants()


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(family, fixed kwargs)`` for a family or variant name."""
    if name in VARIANTS:
        v = VARIANTS[name]
        return v.family, dict(v.config)
    return name, {}


def variant_of(family: str, config: Mapping[str, Any]) -> Variant | None:
    """The named variant ``config`` is (every kwarg that makes the variant agrees)."""
    for v in VARIANTS.values():
        if v.family == family and all(
            k in ("dropout",) or config.get(k) == val for k, val in v.config.items()
        ):
            return v
    return None


# --------------------------------------------------------------------------- detection


def detect(keys: list[str]) -> str | None:
    """The family whose characteristic key names ``keys`` carry, or None. Each test looks
    at names only the family produces, so two families never both match."""
    ks = set(keys)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.match(k) for k in keys)

    if has(r"features\.\d+\.\d+\.block\.") and "classifier.1.weight" in ks:
        return "efficientnet"
    if has(r"features\.\d+\.block\.") and "classifier.3.weight" in ks:
        return "mobilenet_v3"
    if "_conv_stem.weight" in ks and has(r"_blocks\.\d+\._depthwise_conv\.weight"):
        return "efficientnet_lite"
    if has(r"layers\.\d+\.\d+\.layers\.") and "layers.0.weight" in ks:
        return "mnasnet"
    if has(r"stage2\.\d+\.branch2\.") and "conv1.0.weight" in ks:
        return "shufflenet_v2"
    if has(r"layer1\.\d+\.conv1\.weight") and "conv1.weight" in ks:
        return "resnet"
    return None


def _num_blocks(state: Mapping[str, Any], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def candidates(family: str, state: Mapping[str, torch.Tensor],
               fixed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Constructor kwargs worth trying for ``state`` (most likely first); ``fixed`` (from a
    variant name) restricts them. ``num_classes`` is added by the caller."""
    cands: list[dict[str, Any]] = []
    named = [dict(v.config) for v in VARIANTS.values() if v.family == family]
    if family == "resnet":
        layers = tuple(_num_blocks(state, f"layer{i}.") for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        for depth, (kind, reps) in _res.DEPTHS.items():
            if reps == layers and (kind == "bottleneck") == bottleneck:
                conv2 = state.get("layer1.0.conv2.weight")
                groups, wpg = 1, 64
                if bottleneck and isinstance(conv2, torch.Tensor) and conv2.ndim == 4:
                    wpg = int(conv2.shape[1])
                    groups = max(1, int(conv2.shape[0]) // max(1, wpg))
                cands.append({"depth": depth, "groups": groups, "width_per_group": wpg})
    elif family == "mobilenet_v3":
        n = _num_blocks(state, "features.")
        modes = {13: ["small"], 17: ["large"]}.get(n, ["small", "large"])
        widths = (1.0, 0.75, 0.5, 0.35, 1.25, 1.5, 0.25, 2.0)
        for mode in modes:
            for rt in (False, True):
                cands += [{"mode": mode, "width_mult": w, "reduced_tail": rt} for w in widths]
    elif family == "efficientnet":  # the blocks per stage single out the depth multiplier
        depths = tuple(_num_blocks(state, f"features.{i}.") for i in range(1, 8))
        named = [c for c in named if tuple(
            int(math.ceil(n * c["depth_mult"])) for *_, n in _eff.STAGES) == depths] or named
    elif family == "efficientnet_lite":
        total = _num_blocks(state, "_blocks.")
        named = [c for c in named if _lite.num_blocks(c["depth_mult"]) == total] or named
    cands += named
    out: list[dict[str, Any]] = []
    for c in cands:
        c = {**c, **fixed}
        if c not in out:
            out.append(c)
    return out
