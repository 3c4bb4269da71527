"""Per-layer energy rows of the report add up to the model totals, at the precision each
side was costed at (an int8 model's rows are int8-priced, the original's fp32)."""

from __future__ import annotations

import pytest

from hfbconvert.costs import LayerCost, ModelCost
from hfbconvert.report import build_report

from .test_report import fake_meta


def _recost(cost: dict, act_bits: int) -> dict:
    """The same layers costed at ``act_bits`` (what model_cost returns for such a model)."""
    tot = cost["totals"]
    return ModelCost([LayerCost(**c) for c in cost["layers"]], fp_bits=tot["fp_bits"],
                     weight_bits=tot["weight_bits"], act_bits=act_bits).to_dict()


@pytest.mark.parametrize("act_bits", [32, 8])
def test_layer_energy_plus_other_equals_totals(act_bits):
    meta, info = fake_meta()
    meta["cost"] = _recost(meta["cost"], act_bits)
    rep = build_report(meta, info)
    other = rep["other_layers"]
    for side, cost in (("before", "original_cost"), ("after", "cost")):
        per = sum(r[side]["energy_pj"] for r in rep["layers"]) + other[side]["energy_pj"]
        assert per == pytest.approx(meta[cost]["totals"]["energy_pj"], rel=1e-9), side
    if act_bits == 8:  # the hybrid's scale MULs (a) are int32: priced apart from the MACs
        assert any(c["scale_muls"] for c in meta["cost"]["layers"])
