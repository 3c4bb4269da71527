"""EfficientNet-B0..B7 in plain PyTorch with torchvision's exact state_dict keys.

Layout (torchvision ``efficientnet.py``): ``features.0`` conv-BN-SiLU stem,
``features.1..7`` stages (Sequentials of MBConv, each MBConv's ``block`` a Sequential of
[expand 1x1] -> depthwise -> SqueezeExcitation(fc1, fc2; SiLU, sigmoid) -> project 1x1),
``features.8`` the 1x1 head conv (4x the last stage's width) and ``classifier`` =
``Sequential(Dropout, Linear)``. Stochastic depth is the identity in eval mode.
B0..B4 use BatchNorm eps 1e-5, B5..B7 eps 1e-3 (torchvision's choices; eps is not in the
state_dict, so it is part of the config).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ._common import SqueezeExcitation, StochasticDepth, conv_bn_act, init_weights, make_divisible

# expand ratio, kernel, stride, input, output, layers (at width/depth 1.0)
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# variant: (width_mult, depth_mult, dropout, bn eps, resolution, crop)
# (resolution / crop from torchvision's default weights' transforms)
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 1e-5, 224, 224 / 256),
    "efficientnet_b1": (1.0, 1.1, 0.2, 1e-5, 240, 240 / 255),
    "efficientnet_b2": (1.1, 1.2, 0.3, 1e-5, 288, 1.0),
    "efficientnet_b3": (1.2, 1.4, 0.3, 1e-5, 300, 300 / 320),
    "efficientnet_b4": (1.4, 1.8, 0.4, 1e-5, 380, 380 / 384),
    "efficientnet_b5": (1.6, 2.2, 0.4, 1e-3, 456, 1.0),
    "efficientnet_b6": (1.8, 2.6, 0.5, 1e-3, 528, 1.0),
    "efficientnet_b7": (2.0, 3.1, 0.5, 1e-3, 600, 1.0),
}


class MBConv(nn.Module):
    """torchvision's MBConv (EfficientNet V1 block)."""

    def __init__(self, cin: int, cout: int, expand_ratio: float, kernel: int, stride: int,
                 sd_prob: float, eps: float, momentum: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("illegal stride value")
        self.use_res_connect = stride == 1 and cin == cout
        silu = partial(nn.SiLU, inplace=False)
        bn = {"eps": eps, "momentum": momentum}
        expanded = make_divisible(cin * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, activation=silu, **bn))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded,
                                  activation=silu, **bn))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=silu))
        layers.append(conv_bn_act(expanded, cout, 1, activation=None, **bn))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """EfficientNet-B* (Tan & Le 2019), torchvision-compatible state_dict."""

    def __init__(
        self,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        norm_eps: float = 1e-5,
        stochastic_depth_prob: float = 0.2,
    ) -> None:
        super().__init__()
        self.width_mult = float(width_mult)
        self.depth_mult = float(depth_mult)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.norm_eps = float(norm_eps)
        self.stochastic_depth_prob = float(stochastic_depth_prob)
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ValueError("width_mult and depth_mult must be > 0")
        momentum = 0.01 if self.norm_eps == 1e-3 else 0.1

        def adj(c: int) -> int:
            return make_divisible(c * self.width_mult, 8)

        stages = [(e, k, s, adj(i), adj(o), int(math.ceil(n * self.depth_mult)))
                  for e, k, s, i, o, n in STAGES]
        silu = partial(nn.SiLU, inplace=False)
        layers: list[nn.Module] = [
            conv_bn_act(3, stages[0][3], 3, 2, activation=silu, eps=self.norm_eps,
                        momentum=momentum)
        ]
        total = sum(st[5] for st in stages)
        block_id = 0
        for e, k, s, cin, cout, n in stages:
            stage: list[nn.Module] = []
            for j in range(n):
                sd = self.stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(cin if j == 0 else cout, cout, e, k, s if j == 0 else 1,
                                    sd, self.norm_eps, momentum))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = stages[-1][4]
        last_out = 4 * last_in
        layers.append(conv_bn_act(last_in, last_out, 1, activation=silu, eps=self.norm_eps,
                                  momentum=momentum))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=self.dropout),
                                        nn.Linear(last_out, self.num_classes))
        init_weights(self, linear="uniform")

    @property
    def config(self) -> dict:
        return {"width_mult": self.width_mult, "depth_mult": self.depth_mult,
                "num_classes": self.num_classes, "dropout": self.dropout,
                "norm_eps": self.norm_eps, "stochastic_depth_prob": self.stochastic_depth_prob}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
