"""Wilson interval, McNemar's exact test and the bootstrap intervals against textbook
values, enumeration and their basic properties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfbconvert.metrics import (
    bootstrap_mean_interval,
    bootstrap_means,
    decode_bits,
    decode_classes,
    decode_floats,
    discordant,
    encode_bits,
    encode_classes,
    encode_floats,
    mcnemar_exact,
    paired_difference_interval,
    percentile_interval,
    verdict,
    wilson_interval,
)


def test_known_values() -> None:
    # Wilson 95% for 81/100 (Newcombe 1998 method 3 gives 0.7222-0.8749)
    lo, hi = wilson_interval(81, 100)
    assert lo == pytest.approx(0.7222, abs=5e-4) and hi == pytest.approx(0.8749, abs=5e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


@given(st.integers(1, 5000), st.data())
def test_contains_the_estimate_and_narrows_with_n(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = wilson_interval(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo + 1e-12


def test_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


# ------------------------------------------------------------------------ McNemar

def _brute_mcnemar(b: int, c: int) -> Fraction:
    """Two-sided exact test by enumeration: the probability, under Binomial(b + c, 1/2),
    of every outcome no more likely than the observed one."""
    n = b + c
    pmf = [Fraction(math.comb(n, k), 2 ** n) for k in range(n + 1)]
    return min(Fraction(1), sum((p for p in pmf if p <= pmf[b]), Fraction(0)))


def test_mcnemar_textbook_values() -> None:
    # 1 vs 9 discordant pairs: 2 * (1 + 10) / 2^10
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, rel=1e-15)
    # 10 vs 3: 2 * (1 + 13 + 78 + 286) / 2^13
    assert mcnemar_exact(10, 3) == pytest.approx(756 / 8192, rel=1e-15)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(7, 7) == 1.0
    # the figure: +1.31 points on 1,300 images at p = 0.04 is b - c = 17
    assert 0.01 < mcnemar_exact(45, 28) < 0.07


@given(st.integers(0, 80), st.integers(0, 80))
def test_mcnemar_matches_enumeration(b: int, c: int) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(float(_brute_mcnemar(b, c)), rel=1e-12)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_against_scipy() -> None:
    from scipy import stats  # a hard dependency (setup.cfg): this test never skips
    for b, c in [(3, 12), (40, 61), (0, 9), (150, 100), (1, 1)]:
        ref = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9)


def test_mcnemar_large_counts_and_bad_input() -> None:
    p = mcnemar_exact(5000, 5300)
    assert 0.0 < p < 0.01
    assert mcnemar_exact(20000, 20000) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_discordant_counts() -> None:
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 1, 0, 0], bool)
    assert discordant(a, b) == (2, 1)
    with pytest.raises(ValueError):
        discordant(a, b[:3])


# ------------------------------------------------------------------------ bootstrap

@settings(max_examples=40, deadline=None)
@given(st.integers(5, 400), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_bootstrap_interval_contains_estimate_and_is_seeded(n: int, p: float, seed: int) -> None:
    x = np.random.default_rng(seed).random(n) < p
    est, (lo, hi) = bootstrap_mean_interval(x, resamples=500, seed=seed)
    assert est == pytest.approx(x.mean()) and 0.0 <= lo <= est <= hi <= 1.0
    assert bootstrap_mean_interval(x, resamples=500, seed=seed) == (est, (lo, hi))


def test_bootstrap_interval_shrinks_with_n() -> None:
    x = np.random.default_rng(0).random(300) < 0.7
    _, (lo, hi) = bootstrap_mean_interval(x, seed=1)
    _, (lo4, hi4) = bootstrap_mean_interval(np.tile(x, 4), seed=1)
    assert hi4 - lo4 < 0.6 * (hi - lo)
    # close to the Wilson interval at this size (same question, another method)
    wl, wh = wilson_interval(int(x.sum()), x.size)
    assert abs(lo - wl) < 0.015 and abs(hi - wh) < 0.015


def test_bootstrap_seed_changes_draws_and_constant_is_degenerate() -> None:
    x = np.random.default_rng(0).random(200) < 0.5
    assert bootstrap_mean_interval(x, seed=1) != bootstrap_mean_interval(x, seed=2)
    assert bootstrap_mean_interval(np.ones(50), seed=0) == (1.0, (1.0, 1.0))
    with pytest.raises(ValueError):
        bootstrap_means(np.zeros(0))


def test_paired_interval_is_narrower_than_either_top1() -> None:
    """Two models right on mostly the same images: the paired difference is known far
    better than either top-1 (the reason to pair)."""
    rng = np.random.default_rng(3)
    a = rng.random(1300) < 0.72
    b = a.copy()
    flip = rng.choice(1300, 80, replace=False)
    b[flip] = ~b[flip]
    d, (lo, hi) = paired_difference_interval(a, b, seed=0)
    _, (la, ha) = bootstrap_mean_interval(a, seed=0)
    assert d == pytest.approx(a.mean() - b.mean()) and lo <= d <= hi
    assert hi - lo < 0.6 * (ha - la)
    # a normal-theory check of the width: sd of a paired difference = sqrt((b+c)/n^2 - d^2/n)
    bb, cc = discordant(a, b)
    se = math.sqrt((bb + cc) / 1300**2 - d * d / 1300)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError):
        paired_difference_interval(a, b[:-1])


def test_bootstrap_columns_share_resamples() -> None:
    x = np.random.default_rng(0).random((100, 2))
    draws = bootstrap_means(np.column_stack([x, x[:, 0] - x[:, 1]]), resamples=300, seed=5)
    assert np.allclose(draws[:, 0] - draws[:, 1], draws[:, 2])


def test_percentile_interval_widens_to_the_estimate() -> None:
    assert percentile_interval(0.5, np.array([0.6, 0.7, 0.8])) == (0.5, pytest.approx(0.795))


def test_verdict_wording() -> None:
    assert verdict(0.02, 0.005, 0.03) == "better than"
    assert verdict(-0.02, -0.03, -0.001, worse="A worse than B") == "A worse than B"
    assert verdict(0.01, -0.002, 0.022) == "within noise (±1.20 points)"
    assert verdict(0.0, 0.0, 0.0) == "within noise (±0.00 points)"


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_bits_round_trip(bits: list[bool]) -> None:
    arr = np.array(bits)
    text = encode_bits(arr)
    assert len(text) == 2 * ((arr.size + 7) // 8)
    assert decode_bits(text, arr.size).tolist() == bits


@given(st.lists(st.integers(0, 65535), max_size=200))
def test_classes_round_trip(pred: list[int]) -> None:
    assert decode_classes(encode_classes(np.array(pred, dtype=np.int64))).tolist() == pred


def test_encoders_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(ValueError):
        encode_classes(np.array([70000]))
    with pytest.raises(ValueError):
        decode_bits("ff", 9)


def _plain_paired_interval(a: np.ndarray, b: np.ndarray, resamples: int,
                           seed: int) -> tuple[float, tuple[float, float]]:
    """The textbook paired percentile bootstrap, one resample at a time, with the same
    random draws as bootstrap_means (one (resamples, n) block of row indices)."""
    n = a.size
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = sorted(sum(a[i] - b[i] for i in row) / n for row in idx.tolist())
    est = sum(a[i] - b[i] for i in range(n)) / n
    lo = float(np.quantile(means, 0.025))
    hi = float(np.quantile(means, 0.975))
    return est, (min(lo, est), max(hi, est))


def test_paired_kl_interval_matches_the_plain_bootstrap() -> None:
    """Per-image KL of two models against one original (real-valued, skewed): the paired
    interval is the plain resample-by-resample bootstrap of the per-image differences."""
    rng = np.random.default_rng(7)
    base = rng.gamma(0.5, 0.02, size=120)
    kl_a = base * rng.uniform(0.6, 1.0, size=120)
    kl_b = base * rng.uniform(0.9, 1.4, size=120)
    d, (lo, hi) = paired_difference_interval(kl_a, kl_b, resamples=400, seed=3)
    pd, (plo, phi) = _plain_paired_interval(kl_a, kl_b, 400, 3)
    assert d == pytest.approx(pd, rel=1e-12)
    assert (lo, hi) == (pytest.approx(plo, rel=1e-9), pytest.approx(phi, rel=1e-9))
    assert hi < 0  # A is closer to the original on these images, and it shows
    assert verdict(d, lo, hi, "higher", "lower", scale=1, unit="nats",
                   digits=4) == "lower"


def test_paired_agreement_interval_matches_the_plain_bootstrap() -> None:
    rng = np.random.default_rng(11)
    a = rng.random(90) < 0.95
    b = rng.random(90) < 0.9
    d, (lo, hi) = paired_difference_interval(a, b, resamples=300, seed=1)
    pd, (plo, phi) = _plain_paired_interval(a.astype(float), b.astype(float), 300, 1)
    assert d == pytest.approx(pd) and (lo, hi) == (pytest.approx(plo), pytest.approx(phi))


def test_verdict_in_other_units() -> None:
    assert verdict(0.001, -0.002, 0.004, scale=1, unit="nats",
                   digits=4) == "within noise (±0.0030 nats)"


@given(st.lists(st.floats(0, 10, width=32), max_size=200))
def test_floats_round_trip(values: list[float]) -> None:
    arr = np.array(values, dtype=np.float64)
    assert decode_floats(encode_floats(arr), arr.size).tolist() == values


def test_float_encoder_refuses_nan_and_bad_lengths() -> None:
    with pytest.raises(ValueError):
        encode_floats(np.array([0.1, float("nan")]))
    with pytest.raises(ValueError):
        decode_floats(encode_floats(np.zeros(3)), 4)
