"""Deployment exports (ONNX)."""

from __future__ import annotations

from .onnx import SUPPORTED_OPSETS, build_onnx, export_onnx, onnx_stats

__all__ = ["SUPPORTED_OPSETS", "build_onnx", "export_onnx", "onnx_stats"]
