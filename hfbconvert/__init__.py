"""hfbconvert: per-layer hybrid ternary filter banks for pretrained CNNs.

The Python API (:mod:`hfbconvert.api`, re-exported here) is what the CLI calls::

    import hfbconvert as hfb
    model, info = hfb.load_model("model.pt")
    result = hfb.compress(model, hfb.load_images("images/", info), info=info)
    hfb.export_onnx(result, "model.onnx")

Names are imported lazily, so ``import hfbconvert`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Compressed", "CompressConfig", "describe", "load_model", "load_images", "analyze",
        "compress", "save_compressed", "load_compressed", "export_onnx", "evaluate", "finetune")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hfbconvert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
