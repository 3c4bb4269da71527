"""Linear kind: ``nn.Linear`` on 2-D or N-D inputs (the last dimension holds the
features; every leading position is one row)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, PointwiseLayer

if TYPE_CHECKING:
    from ..costs import LayerCost
    from ..hybrid import HybridPointwise


class LinearHandler(LayerHandler):
    kind = "linear"
    record_kind = "linear"
    description = "Linear (2-D or N-D inputs)"
    channel_dim = -1

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, nn.Linear)

    def matches_hybrid(self, h: HybridPointwise) -> bool:
        return h.kind == self.record_kind and (h.stride, h.kernel_size, h.padding,
                                               h.dilation) == (1, 1, 0, 1)

    def record(self, name: str, m: nn.Module, in_shape: tuple) -> PointwiseLayer:
        pix = 1
        for s in in_shape[1:-1]:
            pix *= int(s)
        return PointwiseLayer(name, "linear", m.in_features, m.out_features, pix, 1,
                              m.bias is not None)

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def apply(self, h: HybridPointwise, x: torch.Tensor, w: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def apply_hidden(self, hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, w)

    def check_site(self, m: nn.Module, spec: dict) -> bool:
        return isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (
            spec["c_in"], spec["c_out"])

    def export_critical(self, s: nn.Module, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def export_bank(self, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Rows of C as a 1x1 image batch through StrassenPointwise, leading dims restored."""
        from ..export.bridge import strassen_bank

        lead = x.shape[:-1]
        yt = strassen_bank(s, x.reshape(-1, s.c_in)[:, :, None, None])
        return yt.reshape(*lead, s.n_t)

    def geometry_ok(self, layer: PointwiseLayer) -> bool:
        return (layer.stride, layer.kernel, layer.padding, layer.dilation) == (1, 1, 0, 1)

    def geometry(self, h: HybridPointwise) -> dict[str, int]:
        return {"stride": 1}

    def pixels(self, out: torch.Tensor) -> int:
        return int(out[0].numel() // out.shape[-1]) if out.dim() > 1 else 1

    def dense_cost(self, name: str, m: nn.Module, out: torch.Tensor, fp_bits: int,
                   weight_bits: int, count_bias: bool = True) -> LayerCost:
        from ..costs import LayerCost, weight_bytes

        pix = self.pixels(out)
        n_b = m.out_features if m.bias is not None else 0
        params = m.in_features * m.out_features + n_b
        byts = weight_bytes(m.in_features * m.out_features, m.out_features,
                            weight_bits) + n_b * fp_bits / 8
        return LayerCost(name, "linear", pix * m.in_features * m.out_features,
                         pix * m.out_features * (m.in_features - 1),
                         params, byts, pix, {"weight_bits": weight_bits})
