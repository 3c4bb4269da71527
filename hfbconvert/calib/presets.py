"""Preprocessing presets per model family, and CLI overrides on top of them.

A model's accuracy depends on getting its preprocessing exactly right (resize order,
crop fraction, normalisation), so each family's recipe is named once here; the
preprocessing of a loaded model comes from its ModelInfo and the user may override
single fields from the command line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hfbconvert.errors import InputError

RESIZE_MODES = ("resize_then_crop", "crop_then_resize")


@dataclass(frozen=True)
class Preprocess:
    """How images become model input.

    ``resize_then_crop`` (torchvision): resize the shorter side to ``round(resolution /
    crop)`` with antialiased bilinear, then center-crop ``resolution`` square.
    ``crop_then_resize`` (TF-slim): keep the central ``crop`` fraction of height and
    width, then bilinear-resize (no antialias, half-pixel centers) to ``resolution``.
    Pixels are RGB scaled to [0, 1], then ``(x - mean) / std`` per channel.
    """

    resolution: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: float = 0.875
    resize_mode: str = "resize_then_crop"

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop": self.crop,
            "resize_mode": self.resize_mode,
        }


def validate(prep: Preprocess) -> None:
    """Refuse values that would silently produce garbage input (exit 2, not a crash)."""
    if not isinstance(prep.resolution, int) or not 8 <= prep.resolution <= 4096:
        raise InputError(f"resolution must be an integer in [8, 4096], got {prep.resolution}")
    if not (isinstance(prep.crop, int | float) and 0.05 <= prep.crop <= 1.0):
        raise InputError(f"crop must be a fraction in [0.05, 1], got {prep.crop}")
    if prep.resize_mode not in RESIZE_MODES:
        raise InputError(f"resize mode must be one of {RESIZE_MODES}, got {prep.resize_mode!r}")
    for name, vals in (("mean", prep.mean), ("std", prep.std)):
        if len(vals) != 3 or not all(math.isfinite(float(v)) for v in vals):
            raise InputError(f"{name} needs 3 finite values (R,G,B), got {list(vals)}")
    if any(float(v) <= 0 for v in prep.std):
        raise InputError(f"std values must be > 0, got {list(prep.std)}")


PRESETS: dict[str, Preprocess] = {
    # torchvision ImageNet models: Resize(256) + CenterCrop(224), ImageNet statistics.
    "torchvision-imagenet": Preprocess(
        224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "resize_then_crop"
    ),
    # TF-slim / Inception preprocessing (MobileNet V1/V2 TF checkpoints): [-1, 1].
    "tf-inception": Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875, "crop_then_resize"),
    # CIFAR-10 at its native 32 px, no crop.
    "cifar10": Preprocess(
        32, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616), 1.0, "crop_then_resize"
    ),
}


def get_preset(name: str) -> Preprocess:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown preprocessing preset {name!r}; choose from {', '.join(sorted(PRESETS))}"
        ) from None


def preset_for(info: Any) -> Preprocess:
    """The preprocessing a loaded model expects (its ModelInfo is the source of truth)."""
    return Preprocess(
        resolution=int(info.resolution),
        mean=_triple(info.mean, "mean"),
        std=_triple(info.std, "std"),
        crop=float(info.crop),
        resize_mode=str(info.resize_mode),
    )


def preset_name(prep: Preprocess) -> str | None:
    """Name of the preset ``prep`` equals up to resolution (ONNX metadata), if any."""
    for name, p in PRESETS.items():
        if replace(p, resolution=prep.resolution) == prep:
            return name
    return None


def apply_overrides(
    prep: Preprocess,
    *,
    preset: str | None = None,
    resolution: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop: float | None = None,
    resize_mode: str | None = None,
) -> Preprocess:
    """Apply CLI flags: a named preset first (keeping the model's resolution unless
    given), then single fields. ``None`` means "keep"."""
    if preset is not None:
        prep = replace(get_preset(preset), resolution=prep.resolution)
    changes: dict[str, Any] = {}
    if resolution is not None:
        changes["resolution"] = int(resolution)
    if mean is not None:
        changes["mean"] = _triple(mean, "mean")
    if std is not None:
        changes["std"] = _triple(std, "std")
    if crop is not None:
        changes["crop"] = float(crop)
    if resize_mode is not None:
        changes["resize_mode"] = resize_mode
    return replace(prep, **changes) if changes else prep


def _triple(vals: Sequence[float] | float, name: str) -> tuple[float, float, float]:
    """Accept 3 values, or 1 value meaning the same for all channels."""
    if isinstance(vals, int | float):
        vals = [vals]
    try:
        t = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers, got {vals!r}") from None
    if len(t) == 1:
        t = t * 3
    if len(t) != 3:
        raise InputError(f"{name} needs 1 or 3 values (R,G,B), got {len(t)}")
    return t  # type: ignore[return-value]
