"""Per-filter sensitivity: loss of the best r-term ternary approximation, L_j(r).

For each filter w (a row of the layer's weight) and budget r, find ŵ = Σ_k α_k t_k with
ternary t_k and real α_k, minimizing the activation-aware relative loss

    L(r) = (w - ŵ)ᵀ Σ (w - ŵ) / wᵀ Σ w.

Greedy, vectorized over all filters of a layer: each step picks the ternary direction
with the largest loss reduction for the current residual (two candidate families,
scored exactly in the Σ metric), then all α are re-solved jointly by least squares.
For Σ = I a single step is the exact optimum (sorted-prefix rule); nested spans make
the curve non-increasing in r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import make_psd, solve

DEFAULT_BUDGETS = (1, 2, 4, 8, 16)


@dataclass
class TermFit:
    terms: torch.Tensor  # (n, k, c) ternary directions in {-1,0,1}
    alphas: torch.Tensor  # (n, k)
    losses: torch.Tensor  # (n, k) relative loss after 1..k terms


def _prefix_candidate(score: torch.Tensor, sign: torch.Tensor, gain_num: torch.Tensor,
                      gain_den: torch.Tensor) -> torch.Tensor:
    """Ternary t = sign on the best prefix of positions sorted by ``score`` (desc)."""
    order = torch.argsort(score, dim=1, descending=True)
    num = torch.cumsum(torch.gather(gain_num, 1, order), 1)
    den = torch.cumsum(torch.gather(gain_den, 1, order), 1).clamp_min(1e-30)
    m = torch.argmax(num * num / den, dim=1)  # (n,) best prefix length - 1
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep = ranks <= m[:, None]
    return torch.where(keep, sign, torch.zeros_like(sign))


def _best_direction(e: torch.Tensor, g: torch.Tensor, sigma: torch.Tensor,
                    d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ternary direction per residual row maximizing (tᵀΣe)²/(tᵀΣt), with g = Σe.

    Two sorted-prefix candidates (by |g|/diag Σ and by |e|) are scored exactly in the Σ
    metric and the better kept; returns (t, tΣ)."""
    ag, ae = g.abs(), e.abs()
    cands = (
        _prefix_candidate(ag / d, torch.sign(g), ag, d.expand_as(g)),
        _prefix_candidate(ae, torch.sign(e), d * ae, d.expand_as(e)),
    )
    best = best_ts = best_gain = None
    for t in cands:
        ts = t @ sigma
        num = (t * g).sum(1)
        gain = num * num / (ts * t).sum(1).clamp_min(1e-30)
        if best is None:
            best, best_ts, best_gain = t, ts, gain
        else:
            better = (gain > best_gain)[:, None]
            best = torch.where(better, t, best)
            best_ts = torch.where(better, ts, best_ts)
            best_gain = torch.maximum(gain, best_gain)
    return best, best_ts


def _solve_alphas(t: torch.Tensor, ts: torch.Tensor, sw: torch.Tensor, wsw: torch.Tensor,
                  ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint least-squares α for fixed directions; returns (α, relative loss)."""
    k = t.shape[1]
    gram = (ts @ t.transpose(1, 2)).double()
    gram = 0.5 * (gram + gram.transpose(1, 2))
    rhs = (t * sw[:, None, :]).sum(2).double()
    eye = torch.eye(k, dtype=torch.float64, device=t.device)
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    alpha = solve(gram + ridge * scale[:, None, None] * eye, rhs[..., None])[..., 0]
    # loss = eᵀΣe = wᵀΣw - 2αᵀ(TΣw) + αᵀGα, exact from the small quantities
    quad = (alpha[:, None, :] @ gram @ alpha[:, :, None])[:, 0, 0]
    return alpha, ((wsw - 2 * (alpha * rhs).sum(1) + quad) / wsw).clamp_min(0)


def fit_terms(w: torch.Tensor, sigma: torch.Tensor | None, k_max: int,
              ridge: float = 1e-7, refine_upto: int = 0, sweeps: int = 1) -> TermFit:
    """Greedy k_max-term ternary approximation of every row of ``w`` (n, c).

    After adding term k (for k ≤ ``refine_upto``), ``sweeps`` alternating passes re-pick
    each direction against the residual of the others and keep the change only where the
    loss drops, which fixes most greedy mistakes at the small budgets the planner uses.
    Heavy products run in float32 (tΣ cached per term); the k×k solves in float64."""
    w = w.float()
    n, c = w.shape
    dev = w.device
    if sigma is None:
        sig = torch.eye(c, device=dev)
    else:  # PSD, scale-free (better conditioned), then float32 for the heavy products
        sig = make_psd(sigma.to(dev))
        sig = (sig / torch.diagonal(sig).mean()).float()
    d = torch.diagonal(sig).clamp_min(1e-6)
    sw = w @ sig
    wsw = (sw * w).sum(1).double().clamp_min(1e-30)
    terms = torch.zeros(n, k_max, c, device=dev)
    tsig = torch.zeros(n, k_max, c, device=dev)
    alphas = torch.zeros(n, k_max, dtype=torch.float64, device=dev)
    losses = torch.zeros(n, k_max, dtype=torch.float64, device=dev)
    e, g = w.clone(), sw.clone()
    for k in range(k_max):
        terms[:, k], tsig[:, k] = _best_direction(e, g, sig, d)
        alpha, loss = _solve_alphas(terms[:, : k + 1], tsig[:, : k + 1], sw, wsw, ridge)
        if k < refine_upto and k > 0:
            for _ in range(sweeps):
                for j in range(k + 1):
                    af = alpha.float()[:, :, None]
                    others = torch.ones(k + 1, dtype=torch.bool, device=dev)
                    others[j] = False
                    ej = w - (af[:, others] * terms[:, : k + 1][:, others]).sum(1)
                    gj = sw - (af[:, others] * tsig[:, : k + 1][:, others]).sum(1)
                    tj, tsj = _best_direction(ej, gj, sig, d)
                    t_new, ts_new = terms[:, : k + 1].clone(), tsig[:, : k + 1].clone()
                    t_new[:, j], ts_new[:, j] = tj, tsj
                    a_new, l_new = _solve_alphas(t_new, ts_new, sw, wsw, ridge)
                    better = l_new < loss - 1e-12
                    if bool(better.any()):
                        terms[better, j], tsig[better, j] = tj[better], tsj[better]
                        alpha = torch.where(better[:, None], a_new, alpha)
                        loss = torch.where(better, l_new, loss)
        alphas[:, : k + 1] = alpha
        losses[:, k] = loss
        af = alpha.float()[:, :, None]
        e = w - (af * terms[:, : k + 1]).sum(1)
        g = sw - (af * tsig[:, : k + 1]).sum(1)
    losses = torch.cummin(losses.clamp(0, 1), dim=1).values
    return TermFit(terms, alphas, losses)


def loss_curves(w: torch.Tensor, sigma: torch.Tensor | None,
                budgets: tuple[int, ...] = DEFAULT_BUDGETS, chunk: int = 256,
                with_density: bool = False):
    """L_j(r) for every filter j (rows of ``w``) and every r in ``budgets``: (n, len).

    ``with_density`` also returns the mean non-zero fraction of the first r terms (n, len):
    the ADDs a bank will cost, which the planner needs instead of a guessed density."""
    k_max = max(budgets)
    cols = [b - 1 for b in budgets]
    out, dens = [], []
    for s in range(0, w.shape[0], chunk):
        fit = fit_terms(w[s:s + chunk], sigma, k_max)
        out.append(fit.losses[:, cols])
        if with_density:
            nz = (fit.terms != 0).float().mean(2).cumsum(1)  # (n, k): summed density 1..k
            dens.append(nz[:, cols] / torch.tensor(budgets, dtype=nz.dtype, device=nz.device))
    curves = torch.cat(out).float()
    return (curves, torch.cat(dens).float()) if with_density else curves


def parse_budgets(text: str) -> tuple[int, ...]:
    """Parse "1,2,4,8" into sorted unique positive ints; ValueError with a reason."""
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"budgets must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError("budgets list is empty")
    if any(v < 1 for v in vals):
        raise ValueError(f"budgets must be >= 1, got {text!r}")
    if max(vals) > 256:
        raise ValueError(f"budgets above 256 hidden units per filter are not supported: {text!r}")
    return tuple(sorted(set(vals)))
