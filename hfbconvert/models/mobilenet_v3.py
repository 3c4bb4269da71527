"""MobileNetV3-Small/Large in plain PyTorch with torchvision's exact state_dict keys.

Layout (torchvision ``mobilenetv3.py``): ``features.0`` conv-BN-hardswish stem,
``features.1..N`` inverted residuals whose ``block`` is a Sequential of [expand 1x1]
-> depthwise -> [SqueezeExcitation(fc1, fc2; ReLU, hardsigmoid)] -> project 1x1,
``features.N+1`` the 1x1 head conv (6x the last block's width), then ``classifier`` =
``Sequential(Linear, Hardswish, Dropout, Linear)``. BatchNorm eps 1e-3, momentum 0.01.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ._common import SqueezeExcitation, conv_bn_act, init_weights, make_divisible

MODES = ("small", "large")

# input, kernel, expanded, output, SE, activation ("RE"/"HS"), stride, in dilated tail
# (channels at width 1.0, before reduced_tail; the last three rows form the tail)
_LARGE = (
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
_SMALL = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)
_LAST_CHANNEL = {"large": 1280, "small": 1024}
_BN = {"eps": 0.001, "momentum": 0.01}


def block_settings(mode: str, reduced_tail: bool = False, dilated: bool = False):
    """Rows (in, k, exp, out, se, act, stride, dilation) at width 1.0, as torchvision's
    ``_mobilenet_v3_conf`` lists them (reduced_tail halves the last stage)."""
    if mode not in MODES:
        raise ValueError(f"mode should be one of {MODES}, got {mode!r}")
    rows = _LARGE if mode == "large" else _SMALL
    rd = 2 if reduced_tail else 1
    out = []
    for i, (cin, k, exp, cout, se, act, s) in enumerate(rows):
        tail = i >= len(rows) - 3
        if tail:  # torchvision divides the tail's output; after its first row, all three
            cout = cout // rd
            if i > len(rows) - 3:
                cin, exp = cin // rd, exp // rd
        out.append((cin, k, exp, cout, se, act, s, 2 if (tail and dilated) else 1))
    return out


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual (``block`` Sequential)."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, use_se: bool, act: str,
                 stride: int, dilation: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("illegal stride value")
        self.use_res_connect = stride == 1 and cin == cout
        activation = partial(nn.Hardswish, inplace=False) if act == "HS" else partial(
            nn.ReLU, inplace=False)
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, activation=activation, **_BN))
        layers.append(conv_bn_act(exp, exp, k, 1 if dilation > 1 else stride, groups=exp,
                                  activation=activation, dilation=dilation, **_BN))
        if use_se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4, 8),
                                             scale_activation=nn.Hardsigmoid))
        layers.append(conv_bn_act(exp, cout, 1, activation=None, **_BN))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class MobileNetV3(nn.Module):
    """MobileNetV3 (Howard et al. 2019), torchvision-compatible state_dict."""

    def __init__(
        self,
        mode: str = "large",
        width_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        reduced_tail: bool = False,
        dilated: bool = False,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.mode = str(mode)
        self.width_mult = float(width_mult)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.reduced_tail = bool(reduced_tail)
        self.dilated = bool(dilated)
        # 1 for small inputs (CIFAR's 32 px), as the shared CIFAR MobileNetV1 does; the
        # weights do not record it, so a checkpoint's config must (loading._from_reference)
        self.stem_stride = int(stem_stride)
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if self.width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        rows = block_settings(self.mode, self.reduced_tail, self.dilated)

        def adj(c: int) -> int:
            return make_divisible(c * self.width_mult, 8)

        hs = partial(nn.Hardswish, inplace=False)
        layers: list[nn.Module] = [
            conv_bn_act(3, adj(rows[0][0]), 3, self.stem_stride, activation=hs, **_BN)]
        for cin, k, exp, cout, se, act, s, d in rows:
            layers.append(InvertedResidual(adj(cin), k, adj(exp), adj(cout), se, act, s, d))
        last_in = adj(rows[-1][3])
        last_out = 6 * last_in
        layers.append(conv_bn_act(last_in, last_out, 1, activation=hs, **_BN))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = adj(_LAST_CHANNEL[self.mode] // (2 if self.reduced_tail else 1))
        self.classifier = nn.Sequential(
            nn.Linear(last_out, last_channel),
            nn.Hardswish(inplace=False),
            nn.Dropout(p=self.dropout),
            nn.Linear(last_channel, self.num_classes),
        )
        init_weights(self)

    @property
    def config(self) -> dict:
        cfg = {"mode": self.mode, "width_mult": self.width_mult,
               "num_classes": self.num_classes, "dropout": self.dropout,
               "reduced_tail": self.reduced_tail, "dilated": self.dilated}
        if self.stem_stride != 2:  # torchvision's configs stay as they were
            cfg["stem_stride"] = self.stem_stride
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
