"""Architectures and checkpoint loading: ``load_model(spec) -> (nn.Module, ModelInfo)``."""

from __future__ import annotations

from .info import ModelInfo
from .loading import ARCHS, build_model, load_model
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2

__all__ = ["ARCHS", "MobileNetV1", "MobileNetV2", "ModelInfo", "build_model", "load_model"]
