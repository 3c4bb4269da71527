"""Calibrators: collect → compute, each range rule checked on data where the right answer
is known."""

from __future__ import annotations

import copy

import pytest
import torch

from hfbconvert import actquant
from hfbconvert.quant import calibrators as C
from hfbconvert.quant import primitives as P


def _sq_err(x: torch.Tensor, r: C.Range) -> float:
    q = P.fake_quantize(x, torch.tensor(r.scale), torch.tensor(r.zero_point), *P.UINT8)
    return float((q - x).pow(2).sum())


def _heavy_tailed(n: int = 50_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 50.0, 60.0, -45.0])  # a few far outliers
    return x


def test_minmax_covers_the_union_of_all_batches():
    c = C.MinMaxCalibrator()
    c.collect(torch.tensor([0.5, 2.0]))
    c.collect(torch.tensor([[-1.0, 0.0]]))
    r = c.compute()
    s, z = P.choose_qparams(-1.0, 2.0, *P.UINT8)
    assert (r.lo, r.hi, r.clip_ratio) == (-1.0, 2.0, 1.0)
    assert r.scale == float(s) and r.zero_point == int(z)


def test_mse_clip_clips_heavy_tails_and_never_loses_to_minmax():
    x = _heavy_tailed()
    mse, mm = C.MSEClipCalibrator(), C.MinMaxCalibrator()
    for c in (mse, mm):
        c.collect(x)
    r_mse, r_mm = mse.compute(), mm.compute()
    assert r_mse.clip_ratio < 1.0  # the outliers are not worth their share of 256 levels
    assert _sq_err(x, r_mse) < _sq_err(x, r_mm)
    u = torch.rand(50_000, generator=torch.Generator().manual_seed(1))
    c = C.MSEClipCalibrator()
    c.collect(u)
    assert c.compute().clip_ratio == 1.0  # uniform values: clipping only hurts


def test_mse_clip_samples_reproducibly_from_the_shared_generator():
    x = _heavy_tailed(300_000)
    runs = []
    for _ in range(2):
        c = C.MSEClipCalibrator(generator=torch.Generator().manual_seed(7),
                                sample_values=1000)
        c.collect(x)
        assert c.samples[0].numel() == 1000
        runs.append(c.compute())
    assert runs[0] == runs[1]
    assert (runs[0].lo, runs[0].hi) == (float(x.min()), float(x.max()))  # not the sample's


def test_percentile_ignores_outliers():
    c = C.PercentileCalibrator(percentile=0.1)
    c.collect(_heavy_tailed())
    r = c.compute()
    assert r.scale * 255 < 10 and r.hi == 60.0  # range ≈ ±3.3σ, observed max kept


def test_nothing_collected_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        C.MinMaxCalibrator().compute()


def test_calibrate_takes_a_calibrator_and_minmax_equals_ratio_one():
    from tests.test_int8_activations import _with_hybrid
    from tests.tiny import TINY_RES

    net = _with_hybrid()
    actquant.attach(net)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(4, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(3))
    ra = actquant.calibrate(a, x, clip_ratios=(1.0,))
    rb = actquant.calibrate(b, x, calibrator=lambda: C.MinMaxCalibrator())
    assert ra == rb
    assert all(v["clip_ratio"] == 1.0 for v in ra.values())
    rc = actquant.calibrate(net, x * 0 + x, calibrator=lambda: C.PercentileCalibrator(5.0))
    assert any(rc[k]["scale"] < ra[k]["scale"] for k in ra)
