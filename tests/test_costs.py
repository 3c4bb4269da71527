"""The cost model reproduces METHOD.md's MobileNetV1 table (Howard et al., Tables 6-7)."""

from __future__ import annotations

import pytest
import torch

from hfbconvert.costs import ENERGY_PJ, hybrid_cost, model_cost
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.models.mobilenet_v1 import MobileNetV1

# (width, resolution, mult-adds, params) exactly as METHOD.md §4 prints them
TABLE = [
    (1.0, 224, "568.7e6", "4.210e6"),
    (0.75, 224, "325.4e6", "2.569e6"),
    (0.5, 224, "149.5e6", "1.321e6"),
    (0.25, 224, "41.0e6", "0.465e6"),
    (1.0, 192, "418.1e6", "4.210e6"),
    (1.0, 160, "290.7e6", "4.210e6"),
    (1.0, 128, "186.4e6", "4.210e6"),
]


def printed(value: str) -> object:
    """``value`` as printed, to its printed precision: within half a unit of its last
    digit (568.7e6: ±0.05e6, 0.0088%; at most 0.12% for 41.0e6), i.e. the count rounds
    to exactly what the table shows."""
    mant, _, exp = value.partition("e")
    decimals = len(mant.partition(".")[2])
    half = 0.5 * 10.0 ** (-decimals + int(exp or 0))
    return pytest.approx(float(value), abs=half * (1 + 1e-9), rel=0)


def _v1(width: float, classes: int = 1000, folded: bool = False) -> MobileNetV1:
    return MobileNetV1(width_mult=width, num_classes=classes, padding="pytorch",
                       batchnorm="folded" if folded else "unfolded").eval()


@pytest.mark.parametrize("width,res,madds,params", TABLE)
def test_mobilenet_v1_table(width, res, madds, params):
    cost = model_cost(_v1(width), res, count_conv_bias=False)
    assert cost.muls == printed(madds)
    assert cost.params == printed(params)


def test_shared_model_row():
    """0.5 MobileNet-160, 1001 classes: 76.5M mult-adds, 1.321M params + 5.5K conv biases."""
    net = _v1(0.5, classes=1001, folded=True)
    with_bias = model_cost(net, 160)
    no_bias = model_cost(net, 160, count_conv_bias=False)
    assert with_bias.muls == printed("76.5e6")
    assert no_bias.params == printed("1.321e6")
    assert with_bias.params - no_bias.params == printed("5.5e3")


def test_pointwise_share():
    """Pointwise layers plus the FC hold 90.6% of the mult-adds at width 0.5, 95% at 1.0."""
    for width, share in ((0.5, "90.6e-2"), (1.0, "95e-2")):
        cost = model_cost(_v1(width), 224)
        pw = sum(c.muls for c in cost.layers if c.kind in ("pointwise", "linear"))
        assert pw / cost.muls == printed(share)


def test_dense_adds_and_energy():
    cost = model_cost(_v1(0.25), 128)
    for c in cost.layers:
        assert c.adds < c.muls  # (fan_in - 1) ADDs per fan_in MULs
    e = cost.energy_pj
    assert e == pytest.approx(cost.muls * ENERGY_PJ["fp32_mul"] + cost.adds * ENERGY_PJ["fp32_add"])


def test_hybrid_cost_counts_real_nonzeros():
    h = HybridPointwise(8, 6, torch.tensor([0, 3]), r=5)
    tb = torch.tensor([[1, 0, -1, 0, 0, 0, 0, 1],   # nnz 3 -> 2 adds
                       [0, 0, 0, 0, 0, 0, 0, 0],    # nnz 0 -> 0 adds (not -1)
                       [1, 1, 1, 1, 1, 1, 1, 1],    # nnz 8 -> 7
                       [0, 0, 0, 1, 0, 0, 0, 0],    # nnz 1 -> 0
                       [-1, -1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)  # nnz 2 -> 1
    tc = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]],
                      dtype=torch.float)  # adds 1 + 1 + 0 + 4
    h.set_factors(tb, torch.ones(5), tc)
    c = hybrid_cost("x", h, pixels=10)
    assert c.muls == 10 * (2 * 8 + 5)
    assert c.adds == 10 * (2 * 7 + (2 + 0 + 7 + 0 + 1) + (1 + 1 + 0 + 4))
    assert c.extra["critical"] == 2 and c.extra["tolerant"] == 4
    # bytes: FP critical rows + bias + a at 4 bytes; ternary at 2 bits, packed per matrix
    assert c.bytes == (2 * 8 + 6 + 5) * 4 + 10 + 5
