"""Small numerically robust linear-algebra helpers shared by the fitters.

Calibration statistics of real networks are often rank-deficient (dead ReLU channels,
saturated ReLU6 outputs) and a centered covariance formed as E[xxᵀ] − μμᵀ can come out
slightly indefinite from cancellation; the fitters must neither crash nor chase a
negative-curvature direction in that case.
"""

from __future__ import annotations

import torch


def make_psd(sigma: torch.Tensor, rel_jitter: float = 1e-6) -> torch.Tensor:
    """Symmetric positive-definite float64 version of ``sigma``.

    Adds ``rel_jitter`` × mean diagonal; if the result still has no Cholesky factor
    (indefinite from cancellation) negative eigenvalues are clipped first. Cheap in the
    common case: one Cholesky, no eigendecomposition."""
    s = sigma.double()
    s = 0.5 * (s + s.T)
    c = s.shape[0]
    eye = torch.eye(c, dtype=s.dtype, device=s.device)
    scale = float(torch.diagonal(s).abs().mean()) if c else 0.0
    jitter = rel_jitter * scale if scale > 0 else 1.0
    out = s + jitter * eye
    _, info = torch.linalg.cholesky_ex(out)
    if int(info) != 0:
        try:
            vals, vecs = torch.linalg.eigh(s)
        except torch.linalg.LinAlgError:
            # LAPACK fails to converge on some all-noise matrices (the centered covariance
            # of a constant input, entries ~1e-17; seen with one thread): shift the
            # spectrum up instead, by at most the Gershgorin bound that makes it PSD
            return _shift_to_pd(s, jitter)
        out = (vecs * vals.clamp_min(0)) @ vecs.T + jitter * eye
        out = 0.5 * (out + out.T)
    return out


def _shift_to_pd(s: torch.Tensor, jitter: float) -> torch.Tensor:
    """``s + t·I`` with the smallest t in jitter·10^k (k >= 0) that has a Cholesky factor,
    at most the Gershgorin bound (max row sum of |s|) plus ``jitter``."""
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    bound = float(s.abs().sum(1).max()) + jitter
    t = jitter
    while t < bound:
        if int(torch.linalg.cholesky_ex(s + t * eye)[1]) == 0:
            return s + t * eye
        t *= 10
    return s + bound * eye


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a x = b``; rows whose system is singular fall back to the least-norm
    least-squares solution instead of raising."""
    x, info = torch.linalg.solve_ex(a, b)
    bad = info != 0
    if bool(bad.any()):
        if a.dim() == 2:
            return torch.linalg.pinv(a) @ b
        x = x.clone()
        x[bad] = torch.linalg.pinv(a[bad]) @ b[bad]
    return x
