"""Intervals for the proportions the CLI reports and gates on (agreement, top-1).

A held-apart agreement of 0.83 on 100 images and on 2,000 images are different claims:
the interval says which one was made.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (well-behaved near 0
    and 1, unlike the normal approximation). ``n`` 0 gives the uninformative (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact at the ends and around p, whatever the float rounding of mid +- half
    lo = 0.0 if k == 0 else min(p, max(0.0, mid - half))
    hi = 1.0 if k == n else max(p, min(1.0, mid + half))
    return lo, hi
