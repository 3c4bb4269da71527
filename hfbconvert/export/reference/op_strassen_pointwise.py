"""``hfb::StrassenPointwise`` (version 1): a ternary StrassenNets 1x1 layer on NCHW.

    H  = W_b · X                  per pixel, W_b [r, c_in] in {-1, 0, 1}
    Ha = a ⊙ H                    a [r], the only multiplications
    Ha = DQ(Q(Ha; h_scale, h_zp)) only with h_scale/h_zero_point (uint8, per hidden unit,
                                   round half to even, clip [0, 255])
    Y  = (W_c · Ha) ⊙ s           W_c [c_out, r] in {-1, 0, 1}; s [c_out] when given
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .op_unpack_ternary import unpack


def strassen_pointwise(x: np.ndarray, wb_packed: np.ndarray, wc_packed: np.ndarray,
                       a: np.ndarray, s: np.ndarray | None, h_scale: np.ndarray | None,
                       h_zero_point: np.ndarray | None, c_in: int, r: int, c_out: int,
                       packing: str) -> np.ndarray:
    """The contract in plain numpy (float32 inputs, float64 accumulation)."""
    if x.ndim != 4 or x.shape[1] != c_in:
        raise ValueError(f"X must be [N, {c_in}, H, W], got {list(x.shape)}")
    wb = unpack(wb_packed, r, c_in, packing).astype(np.float64)
    wc = unpack(wc_packed, c_out, r, packing).astype(np.float64)
    h = np.einsum("rc,nchw->nrhw", wb, x.astype(np.float64))
    ha = a.astype(np.float64)[None, :, None, None] * h
    if h_scale is not None:
        sc = h_scale.astype(np.float64)[None, :, None, None]
        zp = h_zero_point.astype(np.float64)[None, :, None, None]
        q = np.clip(np.round(ha / sc) + zp, 0, 255)  # np.round: half to even
        ha = (q - zp) * sc
    y = np.einsum("or,nrhw->nohw", wc, ha)
    if s is not None:
        y = y * s.astype(np.float64)[None, :, None, None]
    return y.astype(np.float32)


class StrassenPointwise(OpRun):
    op_domain = "hfb"

    def _run(self, x, wb, wc, a, *rest, c_in=None, r=None, c_out=None,  # type: ignore[override]
             packing=None):
        s = rest[0] if rest else None
        h_scale, h_zp = (rest[1], rest[2]) if len(rest) == 3 else (None, None)
        pk = packing.decode() if isinstance(packing, bytes) else packing
        return (strassen_pointwise(x, wb, wc, a, s, h_scale, h_zp, int(c_in), int(r),
                                   int(c_out), pk),)
