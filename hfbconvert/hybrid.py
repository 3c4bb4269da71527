"""The hybrid pointwise layer: a full-precision critical bank plus a ternary SPN bank.

    y[critical] = W_crit x
    y[tolerant] = W_c · (a ⊙ (W_b · x))          (StrassenNets, r hidden units)
    y           = concat(y_crit, y_tol)[:, perm] + bias

Training form: latent full-precision ``wb_latent``/``wc_latent`` rounded to {-1,0,1} at
±0.5 in the forward pass with a straight-through estimator. The threshold is fixed (not
TWN's 0.7·mean|W|, which re-derives itself from the latents and lets a sparse W_c fill up
with non-zeros, i.e. ADDs, during training); magnitudes live in ``a``, the only
multiplication. Deploy form (after :meth:`freeze`): int8 codes and ``a``. Both forms run
the *same* ops in the same order, so freezing changes nothing in the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ternary import round_ternary_ste


class HybridPointwise(nn.Module):
    """Drop-in replacement for a 1x1 ``Conv2d`` (groups 1) or a ``Linear`` layer."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        critical_idx: torch.Tensor,
        r: int,
        kind: str = "conv",
        channel_scale: bool = False,
        stride: int = 1,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear', not {kind!r}")
        if int(stride) < 1 or (kind == "linear" and int(stride) != 1):
            raise ValueError(f"stride must be >= 1 (1 for linear), not {stride!r}")
        self.stride = int(stride)
        crit = torch.as_tensor(critical_idx, dtype=torch.long).unique(sorted=True)
        mask = torch.ones(c_out, dtype=torch.bool)
        mask[crit] = False
        tol = torch.arange(c_out)[mask]
        if tol.numel() == 0:
            r = 0
        if tol.numel() > 0 and r < 1:
            raise ValueError("a non-empty tolerant bank needs r >= 1 hidden units")
        self.c_in, self.c_out, self.r, self.kind = c_in, c_out, int(r), kind
        self.register_buffer("critical_idx", crit)
        self.register_buffer("tolerant_idx", tol)
        perm = torch.empty(c_out, dtype=torch.long)
        perm[torch.cat([crit, tol])] = torch.arange(c_out)
        self.register_buffer("perm", perm)  # output channel j = concat[:, perm[j]]
        n_c, n_t = crit.numel(), tol.numel()
        self.w_crit = nn.Parameter(torch.zeros(n_c, c_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.wb_latent: nn.Parameter | None = nn.Parameter(torch.zeros(self.r, c_in))
        self.wc_latent: nn.Parameter | None = nn.Parameter(torch.zeros(n_t, self.r))
        self.a = nn.Parameter(torch.ones(self.r))
        self.channel_scale = nn.Parameter(torch.ones(n_t)) if channel_scale else None
        self.register_buffer("wb_codes", torch.zeros(self.r, c_in, dtype=torch.int8))
        self.register_buffer("wc_codes", torch.zeros(n_t, self.r, dtype=torch.int8))
        self.frozen = False
        # int8 activations (actquant.attach): the layer input; the hidden units a ⊙ W_b x
        # only with hidden_bits 8 (requantized to uint8 once each). By default (hidden_bits
        # 32) hidden_quant stays None: the hidden units are exact int32 and W_c adds them
        self.input_quant: nn.Module | None = None
        self.hidden_quant: nn.Module | None = None

    # ------------------------------------------------------------------ structure
    @property
    def n_critical(self) -> int:
        return int(self.critical_idx.numel())

    @property
    def n_tolerant(self) -> int:
        return int(self.tolerant_idx.numel())

    def ternary_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_b codes, effective a, W_c codes) as float tensors; gradients flow in training."""
        if self.frozen:
            return self.wb_codes.float(), self.a, self.wc_codes.float()
        assert self.wb_latent is not None and self.wc_latent is not None
        return round_ternary_ste(self.wb_latent), self.a, round_ternary_ste(self.wc_latent)

    def effective_weight(self) -> torch.Tensor:
        """Dense c_out x c_in weight this layer computes (for analysis and tests)."""
        w = torch.zeros(self.c_out, self.c_in, dtype=self.w_crit.dtype, device=self.w_crit.device)
        w[self.critical_idx] = self.w_crit
        if self.n_tolerant:
            tb, a, tc = self.ternary_factors()
            wt = tc @ (a[:, None] * tb)
            if self.channel_scale is not None:
                wt = wt * self.channel_scale[:, None]
            w[self.tolerant_idx] = wt
        return w

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.kind == "conv"
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.stride > 1:  # a strided 1x1 conv reads every stride-th pixel
            x = x[:, :, ::self.stride, ::self.stride]
        if self.training and self.hidden_quant is None:
            # Fine-tuning: one conv with the dense effective weight. Same function (up to
            # float rounding) at the original layer's cost, instead of a W_b conv with up
            # to 4x as many output channels plus a W_c conv; gradients reach the latents
            # through the small W_c·diag(a)·W_b product. Eval runs the deploy form below.
            w = self.effective_weight()
            return F.conv2d(x, w[:, :, None, None], self.bias) if conv else F.linear(
                x, w, self.bias)
        parts = []
        if self.n_critical:
            parts.append(
                F.conv2d(x, self.w_crit[:, :, None, None]) if conv else F.linear(x, self.w_crit)
            )
        if self.n_tolerant:
            tb, a, tc = self.ternary_factors()
            if conv:
                h = F.conv2d(x, tb[:, :, None, None]) * a[None, :, None, None]
                if self.hidden_quant is not None:
                    h = self.hidden_quant(h)
                yt = F.conv2d(h, tc[:, :, None, None])
                if self.channel_scale is not None:
                    yt = yt * self.channel_scale[None, :, None, None]
            else:
                h = F.linear(x, tb) * a
                if self.hidden_quant is not None:
                    h = self.hidden_quant(h)
                yt = F.linear(h, tc)
                if self.channel_scale is not None:
                    yt = yt * self.channel_scale
            parts.append(yt)
        ch = 1 if conv else -1  # channels: dim 1 of NCHW, the last dim of a Linear input
        y = torch.cat(parts, dim=ch) if len(parts) > 1 else parts[0]
        if self.n_critical and self.n_tolerant:
            y = y.index_select(ch, self.perm)
        b = self.bias[None, :, None, None] if conv else self.bias
        return y + b

    # ------------------------------------------------------------------ forms
    @torch.no_grad()
    def set_factors(self, tb: torch.Tensor, a: torch.Tensor, tc: torch.Tensor) -> None:
        """Load codes and hidden-unit scales (training form: latents start at the codes)."""
        self.wb_codes.copy_(tb.to(torch.int8))
        self.wc_codes.copy_(tc.to(torch.int8))
        if self.frozen:
            self.a.copy_(a)
            return
        assert self.wb_latent is not None and self.wc_latent is not None
        self.wb_latent.copy_(tb.float())
        self.wc_latent.copy_(tc.float())
        self.a.copy_(a)

    @torch.no_grad()
    def freeze(self) -> None:
        """Training form -> deploy form: int8 codes + folded ``a``; latents dropped."""
        if self.frozen:
            return
        if self.n_tolerant:
            tb, a, tc = self.ternary_factors()
            self.wb_codes.copy_(tb.to(torch.int8))
            self.wc_codes.copy_(tc.to(torch.int8))
            self.a.data = a.detach().clone()
        self.wb_latent = None
        self.wc_latent = None
        self.frozen = True

    def extra_repr(self) -> str:
        return (
            f"{self.c_in}->{self.c_out}, critical={self.n_critical}, tolerant={self.n_tolerant}, "
            f"r={self.r}, kind={self.kind}, stride={self.stride}, frozen={self.frozen}"
        )
