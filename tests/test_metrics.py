"""Wilson interval against the textbook values and its basic properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hfbconvert.metrics import wilson_interval


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
