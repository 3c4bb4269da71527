"""bench/int8_stages.py's ``--set``: CompressConfig and FinetuneConfig fields, typed."""

from __future__ import annotations

import pytest

from bench.int8_stages import parse_set


def test_set_types_values_and_routes_finetune_fields():
    top, ft = parse_set(["qat=false", "weight_rounding=gptq", "act_calib_images=64",
                         "finetune.trainable=norm", "finetune.lr=1e-5", "bn_adjust=off"])
    assert top == {"qat": False, "weight_rounding": "gptq", "act_calib_images": 64,
                   "bn_adjust": "off"}
    assert ft == {"trainable": "norm", "lr": 1e-5}


@pytest.mark.parametrize("item", ["nope=1", "finetune.nope=1", "finetune=3"])
def test_set_refuses_unknown_fields(item: str):
    with pytest.raises(SystemExit, match="no (CompressConfig|FinetuneConfig) field"):
        parse_set([item])
