"""MNASNet (B1) in plain PyTorch with torchvision's exact state_dict keys.

Layout (torchvision ``mnasnet.py``, state_dict version 2): ``layers`` is one Sequential:
0-7 stem (conv-BN-ReLU, depthwise conv-BN-ReLU, 1x1 conv-BN), 8-13 stacks of inverted
residuals (each with a ``layers`` Sequential: 1x1-BN-ReLU, depthwise-BN-ReLU, 1x1-BN),
14-16 the 1x1 head conv to 1280, BN, ReLU; ``classifier`` = ``Sequential(Dropout,
Linear)``. Old version-1 checkpoints of alpha != 1.0 (a different stem) are not read.
"""

from __future__ import annotations

import torch
from torch import nn

ALPHAS = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}
_BN_MOMENTUM = 1 - 0.9997
# kernel, stride, expansion, repeats of the six stacks
_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


def round_to_multiple_of(val: float, divisor: int, round_up_bias: float = 0.9) -> int:
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


def get_depths(alpha: float) -> list[int]:
    return [round_to_multiple_of(d * alpha, 8) for d in (32, 16, 24, 40, 80, 96, 192, 320)]


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, mid, k, padding=k // 2, stride=stride, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_residual:
            return self.layers(x) + x
        return self.layers(x)


class MNASNet(nn.Module):
    """MNASNet (Tan et al. 2018), torchvision-compatible state_dict."""

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha should be greater than 0.0 instead of {alpha}")
        self.alpha = float(alpha)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        d = get_depths(self.alpha)
        layers: list[nn.Module] = [
            nn.Conv2d(3, d[0], 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=False),
            nn.Conv2d(d[0], d[0], 3, padding=1, stride=1, groups=d[0], bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=False),
            nn.Conv2d(d[0], d[1], 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(d[1], momentum=_BN_MOMENTUM),
        ]
        for i, (k, s, e, n) in enumerate(_STACKS):
            cin, cout = d[i + 1], d[i + 2]
            layers.append(nn.Sequential(
                _InvertedResidual(cin, cout, k, s, e),
                *[_InvertedResidual(cout, cout, k, 1, e) for _ in range(n - 1)],
            ))
        layers += [
            nn.Conv2d(d[7], 1280, 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(1280, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=False),
        ]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=self.dropout),
                                        nn.Linear(1280, self.num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
                nn.init.zeros_(m.bias)

    @property
    def config(self) -> dict:
        return {"alpha": self.alpha, "num_classes": self.num_classes, "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x).mean([2, 3])
        return self.classifier(x)
