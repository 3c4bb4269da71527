"""k×k conv kind (opt-in: ``--layers pointwise,linear,conv``): a ``Conv2d`` with a square
k×k kernel (k > 1), groups 1, square stride and dilation, the same zero padding on every
side, and nn.Conv2d's own forward (a subclass that pads or reshapes in its forward is
left alone: its attributes do not say what it computes). As a matrix it reads im2col
rows of in_channels·k·k values (``F.unfold`` order: channel-major, then kernel row, then
column: the order of ``weight.reshape(c_out, -1)``), so Σ, fitting and planning are those
of a pointwise layer with that fan-in.

The hybrid bank (StrassenNets for convolutions): W_b is a ternary k×k conv with the
original stride/padding/dilation producing r hidden units, ``a`` scales them, W_c is a
ternary 1x1 conv to the tolerant outputs; critical filters stay a full-precision k×k conv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._convlike import ConvLike, geometry_of, square
from .base import PointwiseLayer

if TYPE_CHECKING:
    from ..hybrid import HybridPointwise


class ConvHandler(ConvLike):
    kind = "conv"
    cost_kind = "conv"
    default = False
    description = "k×k Conv2d (k > 1), groups 1: hybrid banks over im2col rows"

    def matches(self, m: nn.Module) -> bool:
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.padding_mode != "zeros":
            return False
        if type(m).forward is not nn.Conv2d.forward:
            # a subclass that pads in its own forward (TF "same" convs): the geometry the
            # attributes state is not what it computes, so it is not replaced
            return False
        k = square(tuple(m.kernel_size))
        pad = m.padding if not isinstance(m.padding, str) else (
            (0, 0) if m.padding == "valid" else None)
        return (k is not None and k > 1 and square(tuple(m.stride)) is not None
                and square(tuple(m.dilation)) is not None
                and pad is not None and square(tuple(pad)) is not None)

    def matches_hybrid(self, h: HybridPointwise) -> bool:
        return h.kind == self.record_kind and h.kernel_size > 1

    def record(self, name: str, m: nn.Module, in_shape: tuple) -> PointwiseLayer:
        k, s, p, d = geometry_of(m)
        h, w = ((int(n) + 2 * p - d * (k - 1) - 1) // s + 1 for n in in_shape[2:4])
        return PointwiseLayer(name, "conv", m.in_channels * k * k, m.out_channels, h, w,
                              m.bias is not None, s, k, p, d)

    def layer_input(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """im2col as an NCHW tensor: channel c·k·k+i·k+j at output pixel (y, x) holds the
        input the kernel tap (i, j) of channel c reads there (vectorised ``F.unfold``)."""
        k, s, p, d = geometry_of(m)
        n, _, hh, ww = x.shape
        ho, wo = ((v + 2 * p - d * (k - 1) - 1) // s + 1 for v in (hh, ww))
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
        return cols.reshape(n, cols.shape[1], ho, wo)

    def apply(self, h: HybridPointwise, x: torch.Tensor, w: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        k = h.kernel_size
        return F.conv2d(x, w.reshape(w.shape[0], h.c_in // (k * k), k, k), bias, h.stride,
                        h.padding, h.dilation)

    def export_weight(self, s: nn.Module, w: torch.Tensor) -> torch.Tensor:
        k = s.kernel_size
        return w.reshape(w.shape[0], s.c_in // (k * k), k, k)

    def export_critical(self, s: nn.Module, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, s.stride, s.padding, s.dilation)

    def export_bank(self, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from ..export.bridge import strassen_conv_bank

        return strassen_conv_bank(s, x)

    def geometry_ok(self, layer: PointwiseLayer) -> bool:
        return layer.kernel > 1 and layer.c_in % (layer.kernel ** 2) == 0

    def geometry(self, h: HybridPointwise) -> dict[str, int]:
        return {"stride": h.stride, "kernel": h.kernel_size, "padding": h.padding,
                "dilation": h.dilation}
