"""The layer-kind seam: one registry decides which module is which layer kind, and no
code outside ``hfbconvert/handlers/`` dispatches on layer types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hfbconvert.errors import InputError
from hfbconvert.handlers import (
    default_kinds,
    handler_by_kind,
    handler_for,
    handlers,
    parse_kinds,
    register,
)
from hfbconvert.hybrid import HybridPointwise

PKG = Path(__file__).resolve().parents[1] / "hfbconvert"
DISPATCH = re.compile(r"isinstance\([^)]*\b(Conv2d|Linear|HybridPointwise)\b|\bkind ==")
# files outside handlers/ allowed to match, each with the reason
ALLOWED = {
    # model definitions build and initialise their own layers (not dispatch)
    "models/": "model definitions",
    # the hw report's Layer.kind is its own accelerator description, not a module type
    "hw/report.py": "hw.Layer.kind is a workload string",
}


def test_no_layer_type_dispatch_outside_handlers() -> None:
    hits = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if rel.startswith("handlers/") or any(rel.startswith(a) for a in ALLOWED):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if DISPATCH.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "layer-type dispatch outside hfbconvert/handlers/:\n" + "\n".join(hits)


def test_the_grep_catches_dispatch() -> None:
    assert DISPATCH.search("if isinstance(m, nn.Conv2d):")
    assert DISPATCH.search("x = isinstance(h, (nn.Linear, HybridPointwise))")
    assert DISPATCH.search('if layer.kind == "conv":')
    assert not DISPATCH.search("if is_hybrid(m):")


@pytest.mark.parametrize("module, kind", [
    (nn.Conv2d(8, 16, 1), "pointwise"),
    (nn.Conv2d(8, 16, 1, stride=2, bias=False), "pointwise"),  # ResNet downsample
    (nn.Linear(8, 4), "linear"),
    (nn.Conv2d(8, 16, 3, padding=1), "conv"),
    (nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), "conv"),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), "grouped"),  # depthwise: never converted
    (nn.Conv2d(8, 16, (1, 3)), "grouped"),  # non-square kernel: kept
    (nn.Conv2d(8, 16, 1, padding=1), "grouped"),  # a padded 1x1 is not a matrix product
    (nn.BatchNorm2d(8), None),
])
def test_ordered_matching(module: nn.Module, kind: str | None) -> None:
    h = handler_for(module)
    assert (h.kind if h else None) == kind


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass (as static-same-padding convs are)."""


def test_conv2d_subclass_is_matched_by_geometry() -> None:
    assert handler_for(SamePadConv(4, 4, 1)).kind == "pointwise"
    assert handler_for(SamePadConv(4, 4, 3, padding=1)).kind == "conv"


class PadInForwardConv(nn.Conv2d):
    """A TF-"same" conv: pads in its own forward, so its attributes understate it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_kxk_subclass_with_its_own_forward_is_left_alone() -> None:
    assert handler_for(PadInForwardConv(4, 4, 3, stride=2)).kind == "grouped"


def test_hybrid_layers_are_owned_by_their_kind() -> None:
    crit = torch.tensor([0])
    assert handler_for(HybridPointwise(8, 4, crit, 2)).kind == "pointwise"
    assert handler_for(HybridPointwise(8, 4, crit, 2, "linear")).kind == "linear"
    assert handler_for(HybridPointwise(72, 4, crit, 2, kernel_size=3, padding=1)).kind == "conv"
    with pytest.raises(ValueError):
        HybridPointwise(8, 4, crit, 2, "linear", stride=2)


def test_kinds_parse_and_defaults() -> None:
    assert default_kinds() == ("pointwise", "linear")
    assert parse_kinds("pointwise,linear,conv") == ("pointwise", "linear", "conv")
    with pytest.raises(InputError, match="grouped"):
        parse_kinds("grouped")  # registered, but not convertible
    with pytest.raises(InputError, match="unknown layer kind 'depthwise'"):
        parse_kinds("pointwise,depthwise")
    with pytest.raises(ValueError, match="already registered"):
        register(handler_by_kind("conv"))
    assert [h.kind for h in handlers()] == ["pointwise", "linear", "conv", "grouped"]


class Tokens(nn.Module):
    """(B, T, C) features through a Linear, then pooled to logits."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.mean(1).reshape(x.shape[0], -1, 8)  # (B, T, 8), T = H·W/8
        return self.fc(t).mean(1)


def test_nd_linear_hybrid_counts_every_token() -> None:
    """A hybrid Linear on (B, T, C) costs T positions, as its dense layer does (the cost
    walk once divided by the token count instead of the feature count)."""
    from hfbconvert.costs import model_cost

    dense = model_cost(Tokens(nn.Linear(8, 6)), 16).layers[0]
    hyb = model_cost(Tokens(HybridPointwise(8, 6, torch.tensor([0, 1]), 2, "linear")),
                     16).layers[0]
    assert dense.pixels == hyb.pixels == 16 * 16 // 8
    assert hyb.muls == hyb.pixels * (2 * 8 + 2)
