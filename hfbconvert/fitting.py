"""Fitting hybrid layers to data: bank initialization and least-squares reconstruction.

Every fit here works from second-moment statistics of (input, target) pairs, so one pass
over the calibration images per layer is all the data access a layer needs:

    loss(Ŵ, b) = E‖Ŵ x + b − y‖²  =  tr((Ŵ − W*) Σ_c (Ŵ − W*)ᵀ) + const,
    W* = C_cᵀ Σ_c⁻¹ (the dense least-squares optimum),   b = E[y] − Ŵ E[x],

with Σ_c the centered input covariance and C_c the centered input/target
cross-covariance. ``x`` are the inputs the *compressed* network produces and ``y`` the
*original* network's outputs, which is what stops error from compounding (sequential
reconstruction); the bias formula is the mean-shift (bias) correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hybrid import HybridPointwise
from .linalg import solve
from .sensitivity import fit_terms


@dataclass
class PairStats:
    """E[x xᵀ], E[x yᵀ], E[x], E[y] over sampled positions (float64)."""

    sxx: torch.Tensor
    sxy: torch.Tensor
    mx: torch.Tensor
    my: torch.Tensor
    count: int

    def centered(self) -> tuple[torch.Tensor, torch.Tensor]:
        cov = self.sxx - torch.outer(self.mx, self.mx)
        cross = self.sxy - torch.outer(self.mx, self.my)
        return cov, cross

    @staticmethod
    def identity(w: torch.Tensor, b: torch.Tensor | None = None) -> PairStats:
        """Weight-space stats (x ~ N(0, I), y = W x): fitting then matches weights."""
        c = w.shape[1]
        w = w.double()
        my = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return PairStats(torch.eye(c, dtype=torch.float64), w.T.clone(),
                         torch.zeros(c, dtype=torch.float64), my, 1)


def _ridge_solve(cov: torch.Tensor, rhs: torch.Tensor, ridge: float,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
    """(cov + λI)⁻¹(rhs + λ·prior): ridge that shrinks toward ``prior`` (c_in, c_out), the
    original weights, not toward zero. Directions the calibration data barely excites
    (dead or near-constant channels) then keep the original weights instead of being
    zeroed, and with uncompressed inputs the original layer is recovered exactly."""
    c = cov.shape[0]
    lam = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    if prior is not None:
        rhs = rhs + lam * prior.to(rhs.dtype)
    return solve(cov + lam * torch.eye(c, dtype=cov.dtype), rhs)


def init_bank(w_tol: torch.Tensor, sigma: torch.Tensor | None, r: int) -> tuple[torch.Tensor, ...]:
    """Initial SPN factors for the tolerant rows: each filter gets ⌊r/n⌋ private ternary
    terms from the greedy fitter, and the filters with the largest remaining loss get one
    more, until r hidden units are used. Returns (W_b codes, a, W_c codes)."""
    n, c = w_tol.shape
    if n == 0:
        return torch.zeros(0, c), torch.zeros(0), torch.zeros(0, 0)
    if r < n:
        raise ValueError(f"bank needs at least one hidden unit per tolerant filter (r={r} < {n})")
    k = r // n
    extra = r - k * n
    fit = fit_terms(w_tol, sigma, k + (1 if extra else 0), refine_upto=3)
    counts = torch.full((n,), k, dtype=torch.long)
    if extra:
        gain = fit.losses[:, k - 1] - fit.losses[:, k]  # loss removed by one more term
        counts[torch.argsort(gain, descending=True, stable=True)[:extra]] += 1
    # hidden unit list: for each filter its first counts[j] terms, in filter order
    owner = torch.repeat_interleave(torch.arange(n), counts)
    # position of each hidden unit within its filter's terms: 0..counts[j]-1
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    slot = torch.arange(int(counts.sum())) - starts
    tb = fit.terms[owner, slot]
    # re-solve α of filters that did not take the extra term (their LS used k+1 terms)
    alphas = fit.alphas.clone()
    if extra:
        refit = fit_terms(w_tol[counts == k], sigma, k, refine_upto=3) if k > 0 else None
        if refit is not None:
            alphas[counts == k, :k] = refit.alphas
    a = alphas[owner, slot].float()
    tc = torch.zeros(n, r)
    tc[owner, torch.arange(r)] = 1.0
    return tb.float(), a, tc


@torch.no_grad()
def fit_a_ls(layer: HybridPointwise, target_w: torch.Tensor, cov: torch.Tensor,
             ridge: float = 1e-6) -> None:
    """Re-solve the hidden-unit scales ``a`` for fixed codes, in the Σ metric.

    Ŵ = W_c diag(a) W_b is linear in a: vec(Ŵ) = Σ_k a_k vec(c_k b_kᵀ), so the optimum is
    a small r×r system G a = h with G_kl = (c_kᵀc_l)(b_kᵀ Σ b_l), h_k = c_kᵀ W* Σ b_k."""
    if layer.n_tolerant == 0:
        return
    tb, _, tc = layer.ternary_factors()
    tb, tc = tb.double(), tc.double()
    bs = tb @ cov  # (r, c)
    gram = (tc.T @ tc) * (bs @ tb.T)
    h = ((tc.T @ target_w.double()) * bs).sum(1)
    lam = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    a = solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), h)
    layer.a.data.copy_(a.float())


@torch.no_grad()
def fit_layer(layer: HybridPointwise, stats: PairStats, ridge: float = 1e-4,
              bias_correction: bool = True, reinit_codes: bool = True,
              prior: torch.Tensor | None = None) -> dict:
    """Fit a hybrid layer to (compressed input, original output) statistics.

    Critical rows: least squares. Tolerant bank: W* projected onto the bank (codes from
    the greedy fitter in the Σ metric, then ``a`` by least squares). Bias: mean-shift
    correction. Returns the relative output errors before/after, in the Σ metric."""
    cov, cross = stats.centered()
    w_prior = None if prior is None else prior.double().T
    w_star = _ridge_solve(cov, cross, ridge, w_prior).T  # (c_out, c_in)
    crit, tol = layer.critical_idx, layer.tolerant_idx
    layer.w_crit.data.copy_(w_star[crit].float())
    if layer.n_tolerant:
        if reinit_codes:
            tb, a, tc = init_bank(w_star[tol], cov, layer.r)
            layer.set_factors(tb, a, tc)
        fit_a_ls(layer, w_star[tol], cov)
    w_hat = layer.effective_weight().double()
    if bias_correction:
        layer.bias.data.copy_((stats.my - w_hat @ stats.mx).float())
    # relative error of the centered output (what the bank cannot represent)
    diff = w_hat - w_star
    num = ((diff @ cov) * diff).sum(1)
    den = ((w_star @ cov) * w_star).sum(1).clamp_min(1e-30)
    tol_err = float(num[tol].sum() / den[tol].sum()) if layer.n_tolerant else 0.0
    return {"rel_err": float(num.sum() / den.sum()), "tolerant_rel_err": tol_err}
