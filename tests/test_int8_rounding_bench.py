"""bench/int8_rounding.py's error feedback against quantized inputs: the paired moments
pair the same positions of the two networks, and the least-squares correction is the
identity when nothing is quantized and lowers the output error when something is."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.int8_rounding import DAMP, corrected_weight, paired_moments
from hfbconvert import actquant
from hfbconvert import weightquant as WQ
from hfbconvert.bnfold import fold_batchnorms

from .tiny import tiny_v1

pytestmark = pytest.mark.usefixtures("one_thread")


def _nets():
    torch.manual_seed(0)
    f = tiny_v1().eval()
    fold_batchnorms(f)
    x = torch.randn(16, 3, 32, 32)
    q = copy.deepcopy(f)
    actquant.attach(q, 32)
    actquant.calibrate(q, x, seed=0)
    return f, q, x


def test_without_quantizers_both_moments_are_one_and_the_weight_is_kept() -> None:
    f, _, x = _nets()
    mom = paired_moments(f, copy.deepcopy(f), x, seed=3)
    assert set(mom) == {n for n, _, _ in WQ.weight_params(f)}
    for n, mod, attr in WQ.weight_params(f):
        h, c = mom[n]
        assert torch.equal(h, c), n  # same positions of the same activations
        w = getattr(mod, attr).data
        torch.testing.assert_close(corrected_weight(w, h, c), w, rtol=1e-5, atol=1e-6)


def test_correction_lowers_the_error_against_the_float_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    xf = torch.randn(4000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    xq = torch.round(xf.clamp(-2, 2) * 4) / 4  # clipped to a coarse activation grid
    w = torch.randn(6, 12, generator=g)
    h = (xq.T @ xq / len(xq)).double()[None]
    c = (xf.T @ xq / len(xq)).double()[None]
    w2 = corrected_weight(w, h, c)

    def err(q: torch.Tensor) -> float:
        return float((xf @ w.T - xq @ q.T).pow(2).mean())

    assert err(w2) < 0.8 * err(w)
    # the ridged least-squares solution, written out
    lam = DAMP * float(torch.diagonal(h[0]).mean())
    eye = torch.eye(12, dtype=torch.float64)
    want = w.double() @ (c[0] + lam * eye) @ torch.linalg.inv(h[0] + lam * eye)
    torch.testing.assert_close(w2.double(), want, rtol=1e-4, atol=1e-5)
    # with quantized inputs the moments differ, so the correction moves the weight
    assert not torch.allclose(w2, w)
