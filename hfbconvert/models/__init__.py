"""Architectures and checkpoint loading: ``load_model(spec) -> (nn.Module, ModelInfo)``."""

from __future__ import annotations

from .efficientnet import EfficientNet
from .efficientnet_lite import EfficientNetLite
from .info import ModelInfo
from .loading import ARCH_CHOICES, ARCHS, build_model, load_model
from .mnasnet import MNASNet
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2
from .mobilenet_v3 import MobileNetV3
from .resnet import ResNet
from .shufflenet_v2 import ShuffleNetV2

__all__ = [
    "ARCHS",
    "ARCH_CHOICES",
    "EfficientNet",
    "EfficientNetLite",
    "MNASNet",
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3",
    "ModelInfo",
    "ResNet",
    "ShuffleNetV2",
    "build_model",
    "load_model",
]
