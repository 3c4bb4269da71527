"""Accuracy and agreement of a model on preprocessed images.

Agreement (same top-1 as a reference model) needs no labels, so it works on any
calibration folder; it is the check that a converted model still behaves like the
original one, while top-1/top-5 need labelled data.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calib.readers import CalibData

from .errors import InputError
from .models.info import ModelInfo


def evaluate(
    model: nn.Module,
    data: CalibData,
    label_offset: int = 0,
    reference: nn.Module | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Return ``{"n", "top1", "top5", "agreement"}``; a metric is None when it cannot be
    computed (no labels, no reference). Logit index of label ``y`` is ``y + label_offset``
    (1 for 1001-way TF ImageNet models whose logit 0 is "background"). ``device``: where
    PyTorch models run (copies; the caller's modules stay where they are); an
    :class:`OnnxClassifier` always runs in onnxruntime on the CPU."""
    n = len(data)
    if n == 0:
        raise ValueError("evaluate: no images")
    dev = torch.device(device)
    if dev.type != "cpu":
        model, reference = (_on(m, dev) for m in (model, reference))
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    correct1 = correct5 = agree = 0
    try:
        with torch.inference_mode():
            for x, y in data.batches(batch_size):
                x = x.to(dev)
                logits = model(x).cpu()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                if y is not None:
                    target = (y + label_offset).unsqueeze(1)
                    correct1 += int((top[:, :1] == target).sum())
                    correct5 += int((top == target).any(dim=1).sum())
                if reference is not None:
                    agree += int((reference(x).cpu().argmax(dim=1) == top[:, 0]).sum())
    finally:
        for m, was_training in modes:
            m.train(was_training)
    labelled = data.labels is not None
    return {
        "n": n,
        "top1": correct1 / n if labelled else None,
        "top5": correct5 / n if labelled else None,
        "agreement": agree / n if reference is not None else None,
    }


def _on(m: nn.Module | None, dev: torch.device) -> nn.Module | None:
    """A copy of ``m`` on ``dev`` (onnxruntime models stay as they are)."""
    if m is None or isinstance(m, OnnxClassifier):
        return m
    return copy.deepcopy(m).to(dev)


class OnnxClassifier(nn.Module):
    """An exported ``.onnx`` file run by onnxruntime (CPU, stock: the hfb ops are ONNX
    functions), called like the PyTorch model: float NCHW in, logits out."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        from .verify import ort_session

        self.path = str(path)
        self.session = ort_session(path, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])
        outs = []  # a file exported with a fixed batch: run it in padded slices
        for i in range(0, len(arr), self.batch):
            part = arr[i:i + self.batch]
            pad = np.zeros((self.batch - len(part), *arr.shape[1:]), dtype=np.float32)
            out = self.session.run(None, {self.input_name: np.concatenate([part, pad])})[0]
            outs.append(out[: len(part)])
        return torch.from_numpy(np.concatenate(outs))


def load_onnx_for_eval(path: str | Path, threads: int = 0) -> tuple[OnnxClassifier, ModelInfo]:
    """The ``.onnx`` file as a module plus the ModelInfo its hfbconvert metadata describes
    (preprocessing, label offset, classes; see ``export.onnx.onnx_metadata``)."""
    import onnx

    from .export.onnx import read_metadata

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        mp = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{p}: not a readable ONNX model ({msg[:100]})") from None
    meta = read_metadata(mp)
    if "preprocess" not in meta:
        raise InputError(f"{p}: no hfbconvert preprocessing metadata (exported by another "
                         "tool or an older hfbconvert); re-export it with `hfbconvert export "
                         "onnx`")
    try:
        pre = json.loads(meta["preprocess"])
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        info = ModelInfo(
            arch="onnx", config={}, resolution=int(pre["resolution"]),
            mean=tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
            crop=float(pre["crop"]), resize_mode=str(pre["resize_mode"]),
            label_offset=int(meta.get("label_offset", 0)),
            num_classes=int(meta["num_classes"]),
            classes=[str(c) for c in classes] if classes is not None else None,
            source=str(p), extra={"onnx_metadata": meta},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{p}: malformed hfbconvert metadata ({exc})") from None
    return OnnxClassifier(p, threads), info
