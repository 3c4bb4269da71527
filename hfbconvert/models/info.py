"""ModelInfo: everything about a model besides its tensors (arch, preprocessing, labels).

It is plain data (str/int/float/list/dict) so it can be stored inside ``weights_only``
checkpoints and JSON reports, and used to rebuild the architecture later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    arch: str  # a family in models.loading.ARCHS ("mobilenet_v2", "resnet", ...)
    config: dict[str, Any]  # constructor kwargs of the architecture (rebuilds the skeleton)
    resolution: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: float = 0.875  # central crop fraction of the shorter side
    # "resize_then_crop": torchvision (resize shorter side to res/crop, center-crop res);
    # "crop_then_resize": TF/slim (central crop fraction, then resize to res).
    resize_mode: str = "resize_then_crop"
    label_offset: int = 0  # logit index of class 0 (1 for 1001-way TF ImageNet models)
    num_classes: int = 1000
    classes: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        d = dict(d)
        d["mean"] = tuple(d.get("mean", (0.485, 0.456, 0.406)))
        d["std"] = tuple(d.get("std", (0.229, 0.224, 0.225)))
        return cls(**d)
