"""Error-feedback rounding of weight rows to a fixed grid (GPTQ / Optimal Brain Quantizer).

Round-to-nearest makes each weight's error as small as possible on its own; what the
network sees is the layer's output error ``(w − q)ᵀ x``, whose expected square is
``(w − q)ᵀ H (w − q)`` with ``H = E[x xᵀ]`` of the layer's inputs. Rounding the columns
one at a time and spreading each column's rounding error over the columns not yet
rounded (weighted by the inverse Hessian's Cholesky factor) lowers that output error,
at the same grid and the same codes' range (Frantar et al., "GPTQ", 2022).

Pure functions over tensors: the model-level collection of ``H`` lives in
:mod:`hfbconvert.weightquant`.
"""

from __future__ import annotations

import torch

DAMP = 0.01  # Tikhonov damping, as a fraction of the mean diagonal of H (GPTQ's default)


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` for a batch ``h`` (G, K, K), float64.

    Inputs that are always zero (zero diagonal) get a unit diagonal: no error flows
    from or to them. ``λ = damp · mean(diag H)`` keeps the factorisation stable."""
    h = h.detach().to(torch.float64).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    lam = damp * diag.mean(-1, keepdim=True)
    diag += lam
    low = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(low)
    return torch.linalg.cholesky(inv, upper=True)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor,
                 group: torch.Tensor | None = None) -> torch.Tensor:
    """``(w − q)ᵀ H (w − q)`` per row (float64): the expected squared output error."""
    e = (w.double() - q.double())
    hh = h.double()[group] if group is not None else h.double().expand(e.shape[0], -1, -1)
    return torch.einsum("rk,rkl,rl->r", e, hh, e)


def gptq_codes(w: torch.Tensor, scale: torch.Tensor, h: torch.Tensor,
               group: torch.Tensor | None = None, qmin: int = -127, qmax: int = 127,
               damp: float = DAMP) -> torch.Tensor:
    """Codes (float64, integers in [qmin, qmax]) of the rows of ``w`` (R, K) on the grid
    ``scale`` (R,), rounded column by column with error feedback.

    ``h``: (G, K, K) input second moments; row ``r`` uses ``h[group[r]]`` (``group``
    None: G must be 1, shared by all rows -- a dense layer; per-row groups serve grouped
    and depthwise convolutions, whose output channels read different inputs)."""
    wk = w.detach().to(torch.float64).clone()
    s = scale.detach().to(torch.float64)[:, None]
    u = inverse_factor(h, damp)
    if group is None:
        if u.shape[0] != 1:
            raise ValueError(f"{u.shape[0]} Hessians for rows without a group index")
        u = u.expand(wk.shape[0], -1, -1)
    else:
        u = u[group]
    codes = torch.empty_like(wk)
    for j in range(wk.shape[1]):
        q = torch.clamp(torch.round(wk[:, j:j + 1] / s), qmin, qmax)
        codes[:, j:j + 1] = q
        err = (wk[:, j] - q[:, 0] * s[:, 0]) / u[:, j, j]
        wk[:, j + 1:] -= err[:, None] * u[:, j, j + 1:]
    return codes
