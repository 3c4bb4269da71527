"""Ternary primitives: TWN ternarization, a straight-through estimator, and packers.

Pure functions over tensors. Packing formats are the on-disk/ONNX contract documented
in ``docs/onnx_ops.md``; change them only together with that document.
"""

from __future__ import annotations

import torch

TWN_DELTA = 0.7  # Li & Liu, "Ternary Weight Networks": threshold = 0.7 * mean|W|


def twn_threshold(w: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """TWN threshold Δ = 0.7·mean|W| (per row when ``dim`` is given)."""
    if dim is None:
        return TWN_DELTA * w.abs().mean()
    return TWN_DELTA * w.abs().mean(dim=dim, keepdim=True)


def twn_ternarize(w: torch.Tensor, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes in {-1,0,1}, scale) with scale = mean|W| over |W| > Δ (TWN rule)."""
    delta = twn_threshold(w, dim)
    codes = torch.where(w.abs() > delta, torch.sign(w), torch.zeros_like(w))
    mag = (w.abs() * codes.abs())
    if dim is None:
        scale = mag.sum() / codes.abs().sum().clamp_min(1)
    else:
        scale = mag.sum(dim=dim, keepdim=True) / codes.abs().sum(dim=dim, keepdim=True).clamp_min(1)
    return codes, scale


class _SignSTE(torch.autograd.Function):
    """Forward: round-to-ternary of a code tensor already near {-1,0,1}; backward: identity."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, thr: float) -> torch.Tensor:  # type: ignore[override]
        return torch.where(w.abs() > thr, torch.sign(w), torch.zeros_like(w))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def round_ternary_ste(w: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    """Round latent codes to {-1,0,1} at ±thr, straight-through gradient."""
    return _SignSTE.apply(w, thr)


# ---------------------------------------------------------------------------- packing
# 2-bit: value v in {-1,0,1} -> code (v + 1) in {0,1,2}; four codes per byte, element i of
# each group of four goes to bits [2i, 2i+1] (little end first). Padding codes are 1 (= 0).
# base-3: five codes per byte, byte = sum_i code_i * 3**i (i = 0..4), max 242.

def _flat_codes(t: torch.Tensor) -> torch.Tensor:
    """Codes v+1 in {0,1,2}. Membership is tested exactly: ``abs() > 1`` let through
    int8 -128 (its abs overflows to -128), NaN and fractions such as 0.5."""
    if t.numel() and not ((t == -1) | (t == 0) | (t == 1)).all():
        raise ValueError("ternary tensor holds values outside {-1, 0, 1}")
    return (t.reshape(-1).to(torch.int16) + 1).to(torch.uint8)


def pack_2bit(t: torch.Tensor) -> torch.Tensor:
    """Pack ternary values four per byte (uint8, length ceil(n/4))."""
    c = _flat_codes(t)
    pad = (-c.numel()) % 4
    if pad:
        c = torch.cat([c, torch.ones(pad, dtype=torch.uint8)])
    c = c.view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`; returns int8 values in {-1,0,1} of length ``n``."""
    p = packed.to(torch.uint8).reshape(-1, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    codes = (p >> shifts) & 3
    return codes.reshape(-1)[:n].to(torch.int8) - 1


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_base3(t: torch.Tensor) -> torch.Tensor:
    """Pack ternary values five per byte (1.6 bits each; the limit is log2(3)≈1.585)."""
    c = _flat_codes(t).to(torch.int32)
    pad = (-c.numel()) % 5
    if pad:
        c = torch.cat([c, torch.ones(pad, dtype=torch.int32)])
    return (c.view(-1, 5) * _POW3).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`; returns int8 values in {-1,0,1} of length ``n``."""
    p = packed.to(torch.int32).reshape(-1, 1)
    codes = (p // _POW3) % 3
    return codes.reshape(-1)[:n].to(torch.int8) - 1
