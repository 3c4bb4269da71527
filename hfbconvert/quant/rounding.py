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
BLOCK = 128  # columns per lazy batch update


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
               damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """Codes (float64, integers in [qmin, qmax]) of the rows of ``w`` (R, K) on the grid
    ``scale`` (R,), rounded column by column with error feedback.

    ``h``: (G, K, K) input second moments; row ``r`` uses ``h[group[r]]`` (``group``
    None: G must be 1, shared by all rows -- a dense layer; per-row groups serve grouped
    and depthwise convolutions, whose output channels read different inputs). Columns go
    in blocks of ``block``: the feedback inside a block column by column, onto the later
    columns as one product per block (GPTQ's lazy batch update; same arithmetic)."""
    wk = w.detach().to(torch.float64).clone()
    s = scale.detach().to(torch.float64)
    u = inverse_factor(h, damp)
    if group is None and u.shape[0] != 1:
        raise ValueError(f"{u.shape[0]} Hessians for rows without a group index")
    codes = torch.empty_like(wk)
    k = wk.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        # this block's factor per row: a view of the shared one, or one per row's group
        ub = u[0, i1:i2, i1:i2].expand(wk.shape[0], -1, -1) if group is None \
            else u[group, i1:i2, i1:i2]
        wb, err = wk[:, i1:i2], torch.empty(wk.shape[0], i2 - i1, dtype=torch.float64)
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(wb[:, j] / s), qmin, qmax)
            codes[:, i1 + j] = q
            err[:, j] = (wb[:, j] - q * s) / ub[:, j, j]
            wb[:, j + 1:] -= err[:, j:j + 1] * ub[:, j, j + 1:]
        if i2 < k:
            if group is None:
                wk[:, i2:] -= err @ u[0, i1:i2, i2:]
            else:
                wk[:, i2:] -= torch.einsum("rb,rbk->rk", err, u[group, i1:i2, i2:])
    return codes
