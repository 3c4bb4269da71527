"""bench.measure.accuracy breaks ties in the logits as argmax does, so an int8 cell's top-1
agrees with its own per-image record (int8 logits tie often)."""

from __future__ import annotations

import numpy as np
import torch

from bench.measure import accuracy


def test_tied_logits_count_like_argmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, size=(400, 20)).astype(np.float32)  # many ties
    labels = torch.from_numpy(logits.argmax(1))
    acc = accuracy(logits, labels, 0, ref_logits=logits)
    assert acc["top1"] == 1.0 and acc["agreement"] == 1.0
