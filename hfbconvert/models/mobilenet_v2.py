"""MobileNetV2 in plain PyTorch with torchvision's exact module tree and state_dict keys.

torchvision itself is not a dependency (it would pull a second torch build), so this
re-creates its layout: ``features.0`` is conv-BN-ReLU6, ``features.1..17`` are inverted
residuals whose ``conv`` is a Sequential, ``features.18`` the 1x1 head conv, and
``classifier`` is ``Sequential(Dropout, Linear)``. Torchvision checkpoints therefore load
with ``strict=True``. Expand and project convs are real 1x1 ``nn.Conv2d`` modules and
activations are ``nn.ReLU6`` modules so that later stages can find and hook them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import init_weights, make_divisible  # noqa: F401  (re-exported)

# t (expansion), c (output channels at width 1.0), n (repeats), s (first stride)
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
INPUT_CHANNELS = 32
LAST_CHANNELS = 1280


class ConvBNReLU(nn.Sequential):
    """conv -> BN -> ReLU6 (torchvision's Conv2dNormActivation, same child indices)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision-compatible."""

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        round_nearest: int = 8,
    ) -> None:
        super().__init__()
        self.width_mult = float(width_mult)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.round_nearest = int(round_nearest)
        cin = make_divisible(INPUT_CHANNELS * width_mult, round_nearest)
        self.last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in SETTINGS:
            cout = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        init_weights(self)  # torchvision's scheme: an untrained model is well scaled

    @property
    def config(self) -> dict:
        """Constructor kwargs: enough to rebuild the skeleton (stored in ModelInfo)."""
        return {
            "width_mult": self.width_mult,
            "num_classes": self.num_classes,
            "dropout": self.dropout,
            "round_nearest": self.round_nearest,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))
