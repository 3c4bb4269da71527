"""Building blocks shared by the torchvision-layout architectures.

Each block reproduces the module tree (and so the state_dict keys) of its torchvision
counterpart, with two deliberate differences that do not change keys or eval outputs:
every activation is its own non-inplace module (so later stages can hook each one), and
residual adds are out of place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SqueezeExcitation", "StochasticDepth", "conv_bn_act", "make_divisible"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going 10% below ``v``
    (the rule torchvision and the TF reference use)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(
    cin: int,
    cout: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    activation: Callable[[], nn.Module] | None = None,
    eps: float = 1e-5,
    momentum: float = 0.1,
    dilation: int = 1,
) -> nn.Sequential:
    """conv (no bias) -> BN [-> activation]: torchvision's Conv2dNormActivation, whose
    children are numbered 0, 1, 2 exactly like this Sequential."""
    padding = (kernel_size - 1) // 2 * dilation
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout, eps=eps, momentum=momentum),
    ]
    if activation is not None:
        layers.append(activation())
    seq = nn.Sequential(*layers)
    seq.out_channels = cout  # type: ignore[assignment]
    return seq


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool -> fc1 (1x1 conv) -> activation -> fc2
    (1x1 conv) -> scale activation, multiplied onto the input."""

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[[], nn.Module] = nn.ReLU,
        scale_activation: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth in "row" mode: identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(keep)
        if keep > 0.0:
            noise = noise.div_(keep)
        return x * noise


def init_weights(model: nn.Module, linear: str = "normal") -> None:
    """torchvision's initialisation for these families (kaiming fan_out convs, BN 1/0;
    linear: ``normal`` N(0, 0.01) or ``uniform`` U(+-1/sqrt(out)))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "uniform":
                r = 1.0 / float(m.out_features) ** 0.5
                nn.init.uniform_(m.weight, -r, r)
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
