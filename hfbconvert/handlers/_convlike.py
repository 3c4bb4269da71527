"""What every Conv2d kind shares: the dense cost, BatchNorm folding, the hybrid's
NCHW products."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler

if TYPE_CHECKING:
    from ..costs import LayerCost


def square(v: object) -> int | None:
    """``v`` (an int or a pair) as one int when square, else None."""
    if isinstance(v, tuple):
        return int(v[0]) if len(v) == 2 and v[0] == v[1] else None
    return int(v)  # type: ignore[call-overload]


def geometry_of(m: nn.Module) -> tuple[int, int, int, int]:
    """(kernel, stride, padding, dilation) of a square Conv2d or of a conv hybrid layer
    (whose attributes are already ints)."""
    k, s, d = (v if isinstance(v, int) else int(v[0])
               for v in (m.kernel_size, m.stride, m.dilation))
    p = m.padding
    p = p if isinstance(p, int) else (0 if isinstance(p, str) else int(p[0]))
    return k, s, p, d


class ConvLike(LayerHandler):
    """A ``Conv2d`` family member (pointwise, k×k, grouped/depthwise)."""

    record_kind = "conv"
    cost_kind = "conv"

    def dense_cost(self, name: str, m: nn.Module, out: torch.Tensor, fp_bits: int,
                   weight_bits: int, count_bias: bool = True) -> LayerCost:
        from ..costs import LayerCost, weight_bytes

        pix = self.pixels(out)
        fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        c_out = m.out_channels
        has_b = m.bias is not None and count_bias
        params = fan_in * c_out + (c_out if has_b else 0)
        byts = weight_bytes(fan_in * c_out, c_out, weight_bits) + (
            c_out * fp_bits / 8 if has_b else 0)
        return LayerCost(name, self.cost_kind, pix * fan_in * c_out, pix * c_out * (fan_in - 1),
                         params, byts, pix, {"weight_bits": weight_bits})

    def weight_inputs(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A ``Conv2d`` of any kernel, padding mode and groups: its im2col patches split
        by group (a depthwise conv: one group of k·k taps per channel); a hybrid layer
        reads as its kind's :meth:`layer_input`."""
        if not isinstance(m, nn.Conv2d):
            return super().weight_inputs(m, x)
        # the padding Conv2d itself applies (any mode, 'same'), then unpadded patches
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
        n, fan, pos = cols.shape
        g = m.groups
        return cols.reshape(n, g, fan // g, pos).permute(1, 0, 3, 2).reshape(g, n * pos, fan // g)

    def folds_bn(self, m: nn.Module) -> bool:
        return True

    def apply_hidden(self, hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(hidden, w[:, :, None, None])

    def check_site(self, m: nn.Module, spec: dict) -> bool:
        return self.matches(m) and (m.in_channels * m.kernel_size[0] * m.kernel_size[1],
                                    m.out_channels) == (spec["c_in"], spec["c_out"]) and (
            tuple(m.stride) == (spec.get("stride", 1),) * 2
            and m.kernel_size[0] == spec.get("kernel", 1)
            and square(m.padding) == spec.get("padding", 0)
            and square(m.dilation) == spec.get("dilation", 1))

