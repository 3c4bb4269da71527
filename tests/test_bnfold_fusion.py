"""BN folding of a plain conv is PyTorch's fusion (torch.nn.utils.fusion), bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hfbconvert.bnfold import fold_batchnorms


class _ConvBN(nn.Module):
    def __init__(self, bias: bool, affine: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias,affine", [(False, True), (True, True), (False, False)])
def test_plain_conv_fold_is_torch_fuse_conv_bn_eval(bias, affine):
    torch.manual_seed(0)
    net = _ConvBN(bias, affine).eval()
    g = torch.Generator().manual_seed(1)
    net.bn.running_mean.normal_(0, 0.5, generator=g)
    net.bn.running_var.uniform_(0.2, 3.0, generator=g)
    if affine:
        with torch.no_grad():
            net.bn.weight.normal_(1, 0.3, generator=g)
            net.bn.bias.normal_(0, 0.3, generator=g)
    ref = fuse_conv_bn_eval(net.conv, net.bn)
    conv = net.conv
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorms(net) == [("conv", "bn")]
        after = net(x)
    assert net.conv is conv and isinstance(net.bn, nn.Identity)  # folded in place
    assert torch.equal(net.conv.weight, ref.weight) and torch.equal(net.conv.bias, ref.bias)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
