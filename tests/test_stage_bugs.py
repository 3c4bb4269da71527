"""Bugs of the compress stages found by reading (issue #16), each pinned by a test:

* without bias correction the hybrid keeps the original (BN-folded) bias;
* the one-shot fit's bias correction uses the real input mean, so it moves the bias by
  (W_orig - W_hybrid) @ E[x];
* compress and finetune never change the caller's model (weights, device, training flags,
  attributes, hooks); ``--device cuda`` without CUDA is refused before any work.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calib.readers import CalibData
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.compress import CompressConfig, compress
from hfbconvert.finetune import FinetuneConfig
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import layer_bias

from .tiny import tiny_info, tiny_v1

pytestmark = pytest.mark.usefixtures("one_thread")

FIT_ONLY = {"weight_bits": 32, "budget": 0.5, "ratios": (1.0, 2.0), "budgets": (1, 2),
            "fragility": False, "stats_images": 48, "finetune": FinetuneConfig(steps=0)}


def _folded() -> nn.Module:
    """tiny_v1 with its BatchNorms folded: every pointwise conv carries a non-zero bias."""
    m = tiny_v1()
    fold_batchnorms(m)
    with torch.no_grad():  # the classifier too (initialized at zero)
        m.classifier.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return m.eval()


def _data(n: int = 60, seed: int = 1) -> CalibData:
    imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)
    return CalibData(imgs, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(n)], source="random")


def _hybrids(net: nn.Module) -> dict[str, HybridPointwise]:
    return {n: m for n, m in net.named_modules() if isinstance(m, HybridPointwise)}


# ---------------------------------------------------------------- 1. no bias correction
@pytest.mark.parametrize("with_data", [False, True], ids=["weights", "calib"])
def test_no_bias_correction_keeps_original_bias(with_data: bool) -> None:
    model = _folded()
    hybrid, _ = compress(model, tiny_info(), _data() if with_data else None,
                         CompressConfig(**FIT_ONLY, bias_correction=False))
    hs = _hybrids(hybrid)
    assert hs
    for name, h in hs.items():
        b = layer_bias(model, name)
        assert b.abs().sum() > 0, name  # the test means something
        assert torch.equal(h.bias.detach(), b), name


def test_no_bias_correction_keeps_original_bias_through_reconstruction() -> None:
    model = _folded()
    cfg = CompressConfig(**{**FIT_ONLY, "reconstruct": True, "recon_images": 48,
                            "per_image": 64}, bias_correction=False)
    hybrid, meta = compress(model, tiny_info(), _data(), cfg)
    assert "reconstruction" in meta
    for name, h in _hybrids(hybrid).items():
        assert torch.equal(h.bias.detach(), layer_bias(model, name)), name
