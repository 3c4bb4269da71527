"""ShuffleNetV2 in plain PyTorch with torchvision's exact state_dict keys.

Layout (torchvision ``shufflenetv2.py``): ``conv1`` (conv-BN-ReLU), max-pool,
``stage2..4`` of InvertedResidual units (``branch1`` for stride 2, empty otherwise;
``branch2`` 1x1-BN-ReLU, depthwise-BN, 1x1-BN-ReLU), channel shuffle with 2 groups,
``conv5`` (1x1-BN-ReLU), global mean, ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

REPEATS = (4, 8, 4)
# width multiplier -> stages_out_channels (torchvision's four variants)
CHANNELS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
VARIANTS = {"shufflenet_v2_x0_5": 0.5, "shufflenet_v2_x1_0": 1.0,
            "shufflenet_v2_x1_5": 1.5, "shufflenet_v2_x2_0": 2.0}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride, 1, bias=False, groups=c)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not 1 <= stride <= 3:
            raise ValueError("illegal stride value")
        self.stride = stride
        bf = oup // 2
        if stride == 1 and inp != bf << 1:
            raise ValueError(f"stride 1 needs inp == oup, got {inp} and {oup}")
        if stride > 1:
            self.branch1 = nn.Sequential(
                _dw(inp, stride), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf),
                nn.ReLU(inplace=False),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else bf, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf),
            nn.ReLU(inplace=False),
            _dw(bf, stride), nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (Ma et al. 2018), torchvision-compatible state_dict."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        self.width_mult = float(width_mult)
        self.num_classes = int(num_classes)
        if self.width_mult not in CHANNELS:
            raise ValueError(f"width_mult must be one of {sorted(CHANNELS)}, got {width_mult}")
        ch = CHANNELS[self.width_mult]
        self.conv1 = nn.Sequential(nn.Conv2d(3, ch[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(ch[0]), nn.ReLU(inplace=False))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = ch[0]
        for name, n, cout in zip(("stage2", "stage3", "stage4"), REPEATS, ch[1:4], strict=True):
            seq = [InvertedResidual(cin, cout, 2)] + [
                InvertedResidual(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, name, nn.Sequential(*seq))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, ch[4], 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(ch[4]), nn.ReLU(inplace=False))
        self.fc = nn.Linear(ch[4], self.num_classes)

    @property
    def config(self) -> dict:
        return {"width_mult": self.width_mult, "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)
