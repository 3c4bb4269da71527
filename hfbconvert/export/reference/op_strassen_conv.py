"""``hfb::StrassenConv`` (version 1): a ternary StrassenNets k×k conv layer on NCHW.

    H  = W_b ∗ X                  a k×k conv with the node's strides/pads/dilations,
                                   W_b [r, c_in = C·kh·kw] in {-1, 0, 1} (row-major: channel,
                                   then kernel row, then kernel column) as [r, C, kh, kw]
    Ha = a ⊙ H                    a [r], the only multiplications
    Ha = DQ(Q(Ha; h_scale, h_zp)) only with h_scale/h_zero_point (as StrassenPointwise)
    Y  = (W_c · Ha) ⊙ s           W_c [c_out, r] in {-1, 0, 1} per pixel; s [c_out] if given
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .op_strassen_pointwise import strassen_pointwise


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
           pads: tuple[int, int, int, int], dilations: tuple[int, int]) -> np.ndarray:
    """[N, C, H, W] -> [N, C·kh·kw, Ho, Wo]: what each output pixel's kernel reads."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh,
                                  j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(n, c * kh * kw, ho, wo)


def strassen_conv(x: np.ndarray, wb_packed: np.ndarray, wc_packed: np.ndarray, a: np.ndarray,
                  s: np.ndarray | None, h_scale: np.ndarray | None,
                  h_zero_point: np.ndarray | None, c_in: int, r: int, c_out: int,
                  packing: str, kernel_shape, strides, pads, dilations) -> np.ndarray:
    """The contract in plain numpy (float32 inputs, float64 accumulation)."""
    kh, kw = (int(v) for v in kernel_shape)
    if x.ndim != 4 or x.shape[1] * kh * kw != c_in:
        raise ValueError(f"X must be [N, {c_in}/({kh}·{kw}), H, W], got {list(x.shape)}")
    # a k×k bank is the pointwise contract over im2col rows: one copy of the rule
    cols = im2col(x.astype(np.float64), (kh, kw), tuple(strides), tuple(pads),
                  tuple(dilations))
    return strassen_pointwise(cols, wb_packed, wc_packed, a, s, h_scale, h_zero_point,
                              c_in, r, c_out, packing)


class StrassenConv(OpRun):
    op_domain = "hfb"

    def _run(self, x, wb, wc, a, *rest, c_in=None, r=None, c_out=None,  # type: ignore[override]
             packing=None, kernel_shape=None, strides=None, pads=None, dilations=None):
        s = rest[0] if rest else None
        h_scale, h_zp = (rest[1], rest[2]) if len(rest) == 3 else (None, None)
        pk = packing.decode() if isinstance(packing, bytes) else packing
        return (strassen_conv(x, wb, wc, a, s, h_scale, h_zp, int(c_in), int(r), int(c_out),
                              pk, kernel_shape, strides, pads, dilations),)
