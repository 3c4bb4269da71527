"""MobileNetV1 in plain PyTorch, with the key names of the reference checkpoints.

The module layout is chosen for the later stages, not for brevity: pointwise convs are
real ``nn.Conv2d(kernel_size=1)`` modules and the classifier a real ``nn.Linear`` (layer
discovery finds them by type), every activation is its own ``nn.ReLU6`` module (so it can
be hooked), and TF "SAME" padding is an explicit ``nn.ZeroPad2d`` (so ONNX export sees a
plain Pad node instead of data-dependent padding logic).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._common import init_weights

# (depthwise stride, pointwise output channels at width 1.0) for the 13 blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)
STEM_CHANNELS = 32
MIN_DEPTH = 8  # TF-slim's min_depth: no layer narrower than this

PADDINGS = ("tf_same", "pytorch")
BATCHNORMS = ("folded", "unfolded")
ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}


def scaled(channels: int, width_mult: float) -> int:
    """Channel count at a width multiplier, as TF-slim computes it (truncate, min 8)."""
    return max(int(channels * width_mult), MIN_DEPTH)


def _conv3x3(
    cin: int, cout: int, stride: int, groups: int, padding: str, bias: bool, prefix: str
) -> list[tuple[str, nn.Module]]:
    """A 3x3 conv, preceded by an explicit asymmetric pad for TF-SAME stride 2."""
    if padding == "tf_same" and stride == 2:
        # TF SAME on even inputs: total pad 1, all of it on the right/bottom.
        pad = nn.ZeroPad2d((0, 1, 0, 1))
        conv = nn.Conv2d(cin, cout, 3, stride, padding=0, groups=groups, bias=bias)
        return [(f"pad_{prefix}", pad), (f"conv_{prefix}", conv)]
    conv = nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=bias)
    return [(f"conv_{prefix}", conv)]


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) with configurable padding, stem stride and BN.

    ``batchnorm="folded"`` means BN was merged into the convs (each conv has a bias);
    ``"unfolded"`` keeps BN modules after every conv and the convs have no bias.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        padding: str = "pytorch",
        stem_stride: int = 2,
        batchnorm: str = "unfolded",
        activation: str = "relu6",
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if batchnorm not in BATCHNORMS:
            raise ValueError(f"batchnorm must be one of {BATCHNORMS}, got {batchnorm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.width_mult = float(width_mult)
        self.num_classes = int(num_classes)
        self.padding = padding
        self.stem_stride = int(stem_stride)
        self.batchnorm = batchnorm
        self.activation = activation
        folded = batchnorm == "folded"
        act = ACTIVATIONS[activation]

        cin = scaled(STEM_CHANNELS, width_mult)
        stem = _conv3x3(3, cin, stem_stride, 1, padding, folded, "stem")
        # Identity when no explicit pad is needed: keeps forward() branch-free.
        self.pad_stem = stem[0][1] if len(stem) == 2 else nn.Identity()
        self.conv_stem = stem[-1][1]
        self.bn_stem = None if folded else nn.BatchNorm2d(cin)
        self.act_stem = act(inplace=False)

        blocks = []
        for stride, cout_base in BLOCKS:
            cout = scaled(cout_base, width_mult)
            layers = _conv3x3(cin, cin, stride, cin, padding, folded, "dw")
            if not folded:
                layers.append(("bn_dw", nn.BatchNorm2d(cin)))
            layers.append(("act_dw", act(inplace=False)))
            layers.append(("conv_pw", nn.Conv2d(cin, cout, 1, 1, 0, bias=folded)))
            if not folded:
                layers.append(("bn_pw", nn.BatchNorm2d(cout)))
            layers.append(("act_pw", act(inplace=False)))
            blocks.append(nn.Sequential(OrderedDict(layers)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)  # torchvision's scheme: an untrained model is well scaled

    @property
    def config(self) -> dict:
        """Constructor kwargs: enough to rebuild the skeleton (stored in ModelInfo)."""
        return {
            "width_mult": self.width_mult,
            "num_classes": self.num_classes,
            "padding": self.padding,
            "stem_stride": self.stem_stride,
            "batchnorm": self.batchnorm,
            "activation": self.activation,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before global pooling (N x C x h x w)."""
        x = self.conv_stem(self.pad_stem(x))
        if self.bn_stem is not None:
            x = self.bn_stem(x)
        x = self.act_stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
