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
from hfbconvert import compress as compress_mod
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.compress import CompressConfig, compress
from hfbconvert.finetune import FinetuneConfig
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import find_pointwise, layer_bias, layer_weight
from hfbconvert.stats import collect_input_stats

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


# ---------------------------------------------------------------- 2. mean-shift correction
def test_bias_correction_uses_the_input_mean() -> None:
    """The one-shot fit matches each layer's output mean on the calibration inputs: the
    bias moves by (W_orig - W_hybrid) @ E[x], E[x] the mean of the layer's real input
    (on ReLU6 activations far from zero)."""
    model = _folded()
    data = _data()
    cfg = CompressConfig(**FIT_ONLY)
    hybrid, _ = compress(model, tiny_info(), data, cfg)
    # the statistics compress gathers: same split, same sample, same pixel positions
    train, _ = data.split(cfg.held_fraction, seed=cfg.seed,
                          count=compress_mod.held_count(len(data), cfg))
    names = [ly.name for ly in find_pointwise(model, tiny_info().resolution)]
    st = collect_input_stats(model, names, compress_mod._batches(train, cfg.stats_images,
                                                                 seed=cfg.seed), seed=cfg.seed)
    hs = _hybrids(hybrid)
    nontrivial = 0
    for name, h in hs.items():
        w = layer_weight(model, name).double()
        wh = h.effective_weight().detach().double()
        mean = st[name].mean.double()
        assert mean.norm() > 0.1, name
        expected = (w - wh) @ mean
        nontrivial += h.n_tolerant > 0 and bool(expected.norm() > 1e-3)
        shift = h.bias.detach().double() - layer_bias(model, name).double()
        assert torch.allclose(shift, expected, rtol=1e-4, atol=1e-5), (
            name, float((shift - expected).norm()), float(expected.norm()))
    assert nontrivial >= 3  # banks whose rounding error the correction must absorb


def test_make_psd_survives_eigh_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The centered covariance of a (nearly) constant input is rounding noise, ~1e-17 and
    indefinite; LAPACK's eigh failed to converge on one (one thread) and took compress
    down. make_psd then shifts the spectrum instead."""
    from hfbconvert import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64) * 1e-17
    noise = 0.5 * (a + a.T)  # indefinite, no Cholesky factor with the usual jitter

    def fails(_m):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    out = linalg.make_psd(noise)
    assert int(torch.linalg.cholesky_ex(out)[1]) == 0
    assert torch.allclose(out - torch.diagonal(out - noise).mean() * torch.eye(64), noise)
