"""Accuracy and agreement of a model on preprocessed images.

Agreement (same top-1 as a reference model) needs no labels, so it works on any
calibration folder; it is the check that a converted model still behaves like the
original one, while top-1/top-5 need labelled data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calib.readers import CalibData


def evaluate(
    model: nn.Module,
    data: CalibData,
    label_offset: int = 0,
    reference: nn.Module | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Return ``{"n", "top1", "top5", "agreement"}``; a metric is None when it cannot be
    computed (no labels, no reference). Logit index of label ``y`` is ``y + label_offset``
    (1 for 1001-way TF ImageNet models whose logit 0 is "background")."""
    n = len(data)
    if n == 0:
        raise ValueError("evaluate: no images")
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    correct1 = correct5 = agree = 0
    try:
        with torch.inference_mode():
            for x, y in data.batches(batch_size):
                logits = model(x)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                if y is not None:
                    target = (y + label_offset).unsqueeze(1)
                    correct1 += int((top[:, :1] == target).sum())
                    correct5 += int((top == target).any(dim=1).sum())
                if reference is not None:
                    agree += int((reference(x).argmax(dim=1) == top[:, 0]).sum())
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
