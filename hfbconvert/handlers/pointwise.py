"""Pointwise kind: ``Conv2d`` 1x1, groups 1, no padding, any square stride (a stride-s 1x1
conv is a 1x1 conv on every s-th pixel: ResNet's downsample), any bias, and ``Conv2d``
subclasses (static-same-padding convs and the like) that are geometrically the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._convlike import ConvLike, geometry_of
from .base import PointwiseLayer

if TYPE_CHECKING:
    from ..hybrid import HybridPointwise


class PointwiseHandler(ConvLike):
    kind = "pointwise"
    cost_kind = "pointwise"
    description = "1x1 Conv2d, groups 1 (any stride)"

    def matches(self, m: nn.Module) -> bool:
        return (
            isinstance(m, nn.Conv2d)
            and tuple(m.kernel_size) == (1, 1)
            and m.groups == 1
            and m.stride[0] == m.stride[1]
            and tuple(m.dilation) == (1, 1)
            and (tuple(m.padding) == (0, 0) if not isinstance(m.padding, str)
                 else m.padding == "valid")
            and m.padding_mode == "zeros"
        )

    def matches_hybrid(self, h: HybridPointwise) -> bool:
        return h.kind == self.record_kind and (h.kernel_size, h.padding, h.dilation) == (
            1, 0, 1)

    def record(self, name: str, m: nn.Module, in_shape: tuple) -> PointwiseLayer:
        s = int(m.stride[0])  # output size of a 1x1, unpadded conv
        return PointwiseLayer(name, "conv", m.in_channels, m.out_channels,
                              (int(in_shape[2]) - 1) // s + 1, (int(in_shape[3]) - 1) // s + 1,
                              m.bias is not None, s)

    def layer_input(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        s = geometry_of(m)[1] if x.dim() == 4 else 1
        return x[:, :, ::s, ::s] if s > 1 else x

    def read(self, h: HybridPointwise, x: torch.Tensor) -> torch.Tensor:
        if h.stride > 1:  # a strided 1x1 conv reads every stride-th pixel
            x = x[:, :, ::h.stride, ::h.stride]
        return x

    def apply(self, h: HybridPointwise, x: torch.Tensor, w: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w[:, :, None, None], bias)

    def export_weight(self, s: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return w[:, :, None, None]

    def export_critical(self, s: nn.Module, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias)

    def export_bank(self, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from ..export.bridge import strassen_bank

        return strassen_bank(s, x)

    def geometry_ok(self, layer: PointwiseLayer) -> bool:
        return (layer.kernel, layer.padding, layer.dilation) == (1, 0, 1)

    def geometry(self, h: HybridPointwise) -> dict[str, int]:
        return {"stride": h.stride}
