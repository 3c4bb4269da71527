"""Calibration data: preprocessing presets per model family and image readers.

Kept apart from ``hfbconvert`` so the data side (decoding, resizing, caching) can be used
and tested without any of the compression code.
"""

from __future__ import annotations

from .presets import PRESETS, Preprocess, apply_overrides, get_preset, preset_for
from .readers import CalibData, load_images

__all__ = [
    "PRESETS",
    "CalibData",
    "Preprocess",
    "apply_overrides",
    "get_preset",
    "load_images",
    "preset_for",
]
