"""A user's own architecture for end-to-end tests: none of it is a MobileNet.

ResNet-style stride-2 1x1 downsample, BatchNorm after every conv, a residual add, and a
Linear applied to a (batch, tokens, channels) tensor. Lives in an importable module so
that a pickled instance loads in another process.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenMixNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(16))
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                        nn.BatchNorm2d(16))
        self.expand = nn.Conv2d(16, 32, 1)
        self.token_mlp = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv_a(x) + self.downsample(x))
        x = torch.relu(self.expand(x))
        t = x.flatten(2).transpose(1, 2)  # (B, tokens, C)
        t = nn.functional.gelu(self.token_mlp(t))
        return self.head(t.mean(1))


def token_mix_net(seed: int = 0) -> TokenMixNet:
    torch.manual_seed(seed)
    net = TokenMixNet()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return net.eval()
