"""Intervals for the proportions the CLI reports and gates on (agreement, top-1), and
paired comparisons of two models on the same images (bootstrap, McNemar's exact test).

A held-apart agreement of 0.83 on 100 images and on 2,000 images are different claims:
the interval says which one was made.
"""

from __future__ import annotations

import base64
import math

import numpy as np

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


# ------------------------------------------------------------------------ bootstrap
#
# Two models evaluated on the same images are paired: most images are right (or wrong)
# for both, so the difference of their top-1 varies much less than either top-1. The
# intervals below resample *images* (rows), keeping each image's pair of outcomes
# together, which is what makes a 0.7-point difference measurable on 1,300 images.

RESAMPLES = 4000  # percentile-interval endpoints move by ~0.1 of a standard error
_CHUNK = 2_000_000  # indices drawn per chunk (bounds memory on large eval sets)


def bootstrap_means(columns: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = 0) -> np.ndarray:
    """Means of each column of ``columns`` (n images x k) over ``resamples`` resamples
    of the n rows with replacement, as a ``(resamples, k)`` array. All columns share
    the same resampled rows, so differences between columns stay paired. Same seed,
    same numbers."""
    x = np.asarray(columns, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap of no images")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, x.shape[1]))
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        m = min(step, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start:start + m] = x[idx].mean(axis=1)
    return out


def percentile_interval(estimate: float, draws: np.ndarray,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``draws``, widened to contain ``estimate`` (a
    skewed handful of draws must not give an interval that excludes what was measured)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(draws, dtype=np.float64), [a, 1.0 - a])
    return min(float(lo), estimate), max(float(hi), estimate)


def bootstrap_mean_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                            level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """``(mean, (lo, hi))`` of per-image ``values`` (correctness bits for a top-1 or an
    agreement, per-image KL, ...) with a percentile bootstrap interval over images."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    est = float(v.mean()) if v.size else float("nan")
    draws = bootstrap_means(v, resamples, seed)[:, 0]
    return est, percentile_interval(est, draws, level)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                               seed: int = 0, level: float = 0.95
                               ) -> tuple[float, tuple[float, float]]:
    """``(mean(a) - mean(b), (lo, hi))`` for per-image outcomes of two models on the
    same images (e.g. correct-top-1 bits): the images are resampled, the pairs kept."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    return bootstrap_mean_interval(a - b, resamples, seed, level)


# ------------------------------------------------------------------------ McNemar


def discordant(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int]:
    """``(b, c)``: images only A gets right, images only B gets right."""
    a = np.asarray(a_correct, dtype=bool).reshape(-1)
    b = np.asarray(b_correct, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under "both models equally good" each of the
    ``b + c`` discordant images is A's or B's with probability 1/2, so ``min(b, c)`` is
    Binomial(b + c, 1/2) and p = min(1, 2 P(X <= min(b, c))). Exact integer arithmetic
    (no scipy; the chi-square approximation is poor at the small counts that matter)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0 or b == c:
        return 1.0
    term = total = 1  # comb(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # comb(n, i + 1), exact
        total += term
    return min(1.0, 2 * total / (1 << n))  # int / int: correctly rounded


# ------------------------------------------------------------------------ wording


def verdict(diff: float, lo: float, hi: float, better: str = "better than",
            worse: str = "worse than", *, scale: float = 100.0, unit: str = "points",
            digits: int = 2) -> str:
    """The wording rule: "better"/"worse" only when the interval excludes zero, else
    "within noise (±x)" with x the interval's half-width (the differences this
    comparison cannot tell from zero), in points for proportions (``scale`` 100) or in
    ``unit`` for other measures (KL: ``scale=1, unit="nats", digits=4``)."""
    if lo > 0:
        return better
    if hi < 0:
        return worse
    return f"within noise (±{scale / 2 * (hi - lo):.{digits}f} {unit})"


# ------------------------------------------------------------------------ compact vectors
#
# Per-image results stored in results files, so two runs can later be compared paired.


def encode_bits(bits: np.ndarray) -> str:
    """Boolean vector as hex (numpy bit order, big-endian within a byte); 1,300 images
    take 326 characters."""
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1)).tobytes().hex()


def decode_bits(text: str, n: int) -> np.ndarray:
    """Inverse of :func:`encode_bits` for ``n`` images."""
    raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"{raw.size} bytes do not hold {n} bits")
    return np.unpackbits(raw)[:n].astype(bool)


def encode_classes(pred: np.ndarray) -> str:
    """Predicted class indices as base64 of little-endian uint16 (fits any class count
    up to 65,535)."""
    p = np.asarray(pred).reshape(-1)
    if p.size and (p.min() < 0 or p.max() > 65535):
        raise ValueError("class index outside uint16")
    return base64.b64encode(p.astype("<u2").tobytes()).decode("ascii")


def decode_classes(text: str) -> np.ndarray:
    """Inverse of :func:`encode_classes` (int64)."""
    return np.frombuffer(base64.b64decode(text), dtype="<u2").astype(np.int64)


def encode_floats(values: np.ndarray) -> str:
    """Per-image real values (KL divergences) as base64 of little-endian float32: 1,300
    images take 6,936 characters; float32 keeps 7 digits, far below any interval's width."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size and not np.isfinite(v).all():
        raise ValueError("non-finite value")
    return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")


def decode_floats(text: str, n: int) -> np.ndarray:
    """Inverse of :func:`encode_floats` for ``n`` images (float64)."""
    raw = base64.b64decode(text)
    if len(raw) != 4 * n:
        raise ValueError(f"{len(raw)} bytes do not hold {n} float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)
