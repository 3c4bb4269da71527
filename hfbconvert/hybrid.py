"""The hybrid layer: a full-precision critical bank plus a ternary SPN bank.

    y[critical] = W_crit x
    y[tolerant] = W_c · (a ⊙ (W_b · x))          (StrassenNets, r hidden units)
    y           = concat(y_crit, y_tol)[:, perm] + bias

Training form: latent full-precision ``wb_latent``/``wc_latent`` rounded to {-1,0,1} at
±0.5 in the forward pass with a straight-through estimator. The threshold is fixed (not
TWN's 0.7·mean|W|, which re-derives itself from the latents and lets a sparse W_c fill up
with non-zeros, i.e. ADDs, during training); magnitudes live in ``a``, the only
multiplication. Deploy form (after :meth:`freeze`): int8 codes and ``a``. Both forms run
the *same* ops in the same order, so freezing changes nothing in the output.

Everything is held in matrix form (``c_in`` is the fan-in: in_channels·k·k for a k×k
conv); the products that apply a matrix to the input with the layer's geometry come
from the layer kind's handler (``hfbconvert.handlers``), so this module knows no kind.
"""

from __future__ import annotations

import torch
from torch import nn

from .ternary import round_ternary_ste


class HybridPointwise(nn.Module):
    """Drop-in replacement for a ``Conv2d`` (groups 1; 1x1 or square k×k) or a ``Linear``.

    ``kernel_size``/``padding``/``dilation`` (conv only; defaults: a 1x1 conv) describe a
    k×k conv: the critical rows and W_b are k×k convs with the original geometry, W_c a
    1x1 conv. ``c_in`` counts matrix columns (in_channels·k·k)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        critical_idx: torch.Tensor,
        r: int,
        kind: str = "conv",
        channel_scale: bool = False,
        stride: int = 1,
        kernel_size: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        from .handlers import handler_for

        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear', not {kind!r}")
        self.kind = kind
        self.stride, self.kernel_size = int(stride), int(kernel_size)
        self.padding, self.dilation = int(padding), int(dilation)
        geometry = (self.stride, self.kernel_size, self.padding, self.dilation)
        if min(geometry) < 0 or min(self.stride, self.kernel_size, self.dilation) < 1:
            raise ValueError(f"stride/kernel/padding/dilation {geometry} must be >= (1, 1, 0, 1)")
        if c_in % (self.kernel_size ** 2):
            raise ValueError(f"c_in {c_in} is not in_channels·{self.kernel_size}²")
        ops = handler_for(self)
        if ops is None:
            raise ValueError(f"no layer kind builds a {kind} hybrid with stride/kernel/"
                             f"padding/dilation {geometry}")
        self._ops = ops
        crit = torch.as_tensor(critical_idx, dtype=torch.long).unique(sorted=True)
        mask = torch.ones(c_out, dtype=torch.bool)
        mask[crit] = False
        tol = torch.arange(c_out)[mask]
        if tol.numel() == 0:
            r = 0
        if tol.numel() > 0 and r < 1:
            raise ValueError("a non-empty tolerant bank needs r >= 1 hidden units")
        self.c_in, self.c_out, self.r = c_in, c_out, int(r)
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
    def in_channels(self) -> int:
        return self.c_in // (self.kernel_size ** 2)

    @property
    def n_critical(self) -> int:
        return int(self.critical_idx.numel())

    @property
    def n_tolerant(self) -> int:
        return int(self.tolerant_idx.numel())

    def ternary_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_b codes, effective a, W_c codes) as float tensors of ``a``'s dtype (float64
        in a ``.double()`` copy: verification's rounding reference); gradients flow in
        training."""
        if self.frozen:
            return self.wb_codes.to(self.a.dtype), self.a, self.wc_codes.to(self.a.dtype)
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
        ops = self._ops
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = ops.read(self, x)
        if self.training and self.hidden_quant is None:
            # Fine-tuning: one product with the dense effective weight. Same function (up
            # to float rounding) at the original layer's cost, instead of a W_b product
            # with up to 4x as many outputs plus a W_c product; gradients reach the latents
            # through the small W_c·diag(a)·W_b product. Eval runs the deploy form below.
            return ops.apply(self, x, self.effective_weight(), self.bias)
        parts = []
        if self.n_critical:
            parts.append(ops.apply(self, x, self.w_crit))
        if self.n_tolerant:
            tb, a, tc = self.ternary_factors()
            h = ops.apply(self, x, tb)
            # in place when nothing records gradients: the hidden units are the largest
            # tensor of the model (up to 4x the layer's outputs); a second copy of them
            # was about 420 MB at MobileNetV1's first layer for 64 images
            inplace = not (torch.is_grad_enabled() or torch.jit.is_tracing()
                           or torch.onnx.is_in_onnx_export())
            h = h.mul_(ops.per_channel(a)) if inplace else h * ops.per_channel(a)
            if self.hidden_quant is not None:
                h = self.hidden_quant(h)
            yt = ops.apply_hidden(h, tc)
            del h
            if self.channel_scale is not None:
                s = ops.per_channel(self.channel_scale)
                yt = yt.mul_(s) if inplace else yt * s
            parts.append(yt)
        ch = ops.channel_dim  # channels: dim 1 of NCHW, the last dim of a Linear input
        y = torch.cat(parts, dim=ch) if len(parts) > 1 else parts[0]
        if self.n_critical and self.n_tolerant:
            y = y.index_select(ch, self.perm)
        return y + ops.per_channel(self.bias)

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
            f"r={self.r}, kind={self.kind}, stride={self.stride}"
            + (f", kernel={self.kernel_size}, padding={self.padding}, dilation={self.dilation}"
               if self.kernel_size > 1 else "") + f", frozen={self.frozen}"
        )
