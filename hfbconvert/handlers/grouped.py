"""Grouped/depthwise ``Conv2d`` and every conv the other kinds leave (non-square
kernels, padding modes): never converted (depthwise convs stay full precision or int8),
but costed, BN-folded, weight-rounded and activation-quantized like any conv."""

from __future__ import annotations

from torch import nn

from ._convlike import ConvLike


class GroupedHandler(ConvLike):
    kind = "grouped"
    convertible = False
    default = False
    description = "any other Conv2d (depthwise, grouped): kept as is"

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d)

    def reads_one_channel(self, m: nn.Module) -> bool:
        return m.groups == m.in_channels and m.groups > 1

    def dense_cost(self, name, m, out, fp_bits, weight_bits, count_bias=True):  # type: ignore[no-untyped-def]
        c = super().dense_cost(name, m, out, fp_bits, weight_bits, count_bias)
        if self.reads_one_channel(m):
            c.kind = "depthwise"
        elif tuple(m.kernel_size) == (1, 1) and m.groups == 1:  # padded or dilated 1x1
            c.kind = "pointwise"
        return c
