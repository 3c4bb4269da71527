"""Affine quantization as pure functions (in the manner of torchao's quant primitives).

One copy of each rule the int8 paths use:

* :func:`choose_qparams`: ``(scale, zero_point)`` for a range [lo, hi] ∪ {0}, asymmetric
  (``scale = clip·(hi − lo)/(qmax − qmin)``, zero point rounded into [qmin, qmax]) or
  symmetric (``scale = clip·max(|lo|, |hi|)/((qmax − qmin)/2)``, zero point 0). Zero is
  always exactly representable, so ReLU zeros and zero padding stay exact.
* :func:`quantize`: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` -- ONNX
  QuantizeLinear's arithmetic (true division, round half to even).
* :func:`dequantize`: ``(q − zero_point) · scale``.
* :func:`fake_quantize`: the two composed, with an optional straight-through gradient.

Per-tensor qparams are 0-d tensors; per-axis qparams are 1-d along ``axis`` of ``x``.
Everything is vectorized: :func:`choose_qparams` takes any shape of ``lo``/``hi`` (e.g.
one row per candidate clip ratio) and returns qparams of that shape.
"""

from __future__ import annotations

import torch

UINT8 = (0, 255)        # activations: onnxruntime's QDQ default
INT8_SYMMETRIC = (-127, 127)  # weights: restricted range, zero point 0


def _as_float(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32) if not isinstance(t, torch.Tensor) \
        else t.float()


def choose_qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, qmin: int, qmax: int,
                   *, symmetric: bool = False, clip_ratio: float | torch.Tensor = 1.0,
                   eps: float | None = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero_point int32)`` covering ``clip_ratio · [lo, hi] ∪ {0}``.

    ``eps`` floors the scale (so an all-zero tensor still gets a usable scale); ``None``
    leaves tiny or zero scales to the caller (weights map such channels to code 0).
    ``clip_ratio`` may be a tensor broadcasting against ``lo``/``hi``."""
    lo, hi = _as_float(lo), _as_float(hi)
    if not (isinstance(clip_ratio, (int, float)) and clip_ratio == 1.0):
        ratio = _as_float(clip_ratio)
        lo, hi = ratio * lo, ratio * hi
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return (scale.clamp_min(eps) if eps is not None else scale), zp
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = (hi - lo) / (qmax - qmin)
    if eps is not None:
        scale = scale.clamp_min(eps)
    return scale, zero_point_for(lo, scale, qmin, qmax)


def zero_point_for(lo: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                   ) -> torch.Tensor:
    """The code of 0 when ``lo`` (≤ 0) maps to ``qmin``, rounded and clamped into range."""
    return torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int32)


def _bcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-axis qparams reshaped to broadcast along ``axis`` of ``x``; others as given."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int, axis: int | None = None) -> torch.Tensor:
    """Integer codes (as float32, exact) of ``x``: QuantizeLinear's arithmetic."""
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    """``(q − zero_point) · scale`` in float32."""
    s, z = _bcast(scale, q, axis), _bcast(zero_point, q, axis)
    return (q.float() - z) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, axis: int | None = None, ste: bool = True) -> torch.Tensor:
    """``dequantize(quantize(x))``. With ``ste`` and ``x`` requiring grad the backward is
    the identity (straight-through estimator, also outside the clamp range, so clipped
    values still learn), written as ``x + (q − x).detach()``: the forward then equals q
    up to one float rounding of that sum."""
    q = dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)
    return straight_through(x, q) if ste else q


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward, identity gradient to ``x`` in the backward (only when ``x``
    requires grad; otherwise ``q`` itself, bit for bit)."""
    return x + (q - x).detach() if x.requires_grad else q
