"""The ``hfb`` op contract (numpy reference ops) against the exported function bodies
and against PyTorch's HybridPointwise: three statements of one semantics that must agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from hfbconvert.export import build_onnx
from hfbconvert.export.reference import HFB_OPS, unpack
from hfbconvert.ternary import pack_2bit, pack_base3

from .test_export import RES, SmallNet, rand_hybrid


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 13), st.sampled_from(["2bit", "base3"]), st.data())
def test_unpack_inverts_the_packers(rows: int, cols: int, packing: str, data) -> None:
    vals = data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=rows * cols,
                              max_size=rows * cols))
    t = torch.tensor(vals, dtype=torch.int8).reshape(rows, cols)
    packed = (pack_2bit if packing == "2bit" else pack_base3)(t).numpy()
    np.testing.assert_array_equal(unpack(packed, rows, cols, packing), t.numpy())


def test_unpack_refuses_a_non_ternary_code() -> None:
    with pytest.raises(ValueError, match="outside"):
        unpack(np.array([0b11], dtype=np.uint8), 1, 1, "2bit")  # code 3: value 2


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("scaled,kind", [(False, "conv"), (True, "conv"), (False, "linear")])
def test_contract_matches_function_bodies_and_pytorch(packing, scaled, kind) -> None:
    pw = rand_hybrid(8, 16, 4, 12, "conv", scale=scaled, seed=1)
    fc = rand_hybrid(16, 10, 3, 9, "linear", scale=scaled, seed=2) if kind == "linear" else None
    net = SmallNet(pw, fc).eval()
    mp = build_onnx(net, RES, pack=packing)
    assert {f.name for f in mp.functions} >= {"StrassenPointwise"}
    x = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x).numpy()
    feeds = {mp.graph.input[0].name: x.numpy()}
    bodies = ReferenceEvaluator(mp).run(None, feeds)[0]  # the functions' own nodes
    contract = ReferenceEvaluator(mp, new_ops=HFB_OPS).run(None, feeds)[0]
    np.testing.assert_allclose(contract, bodies, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(contract, want, rtol=1e-4, atol=1e-4)


def test_contract_is_what_runs_when_given() -> None:
    """A broken contract op must change the result: the evaluator really uses new_ops."""
    from hfbconvert.export.reference import StrassenPointwise

    class Broken(StrassenPointwise):
        def _run(self, x, *args, **kw):  # type: ignore[override]
            (y,) = super()._run(x, *args, **kw)
            return (y + 1.0,)

    Broken.__name__ = "StrassenPointwise"
    net = SmallNet(rand_hybrid(8, 16, 4, 12, seed=1)).eval()
    mp = build_onnx(net, RES)
    feeds = {mp.graph.input[0].name: np.zeros((1, 3, RES, RES), np.float32)}
    a = ReferenceEvaluator(mp, new_ops=HFB_OPS).run(None, feeds)[0]
    b = ReferenceEvaluator(mp, new_ops=[Broken, *HFB_OPS[1:]]).run(None, feeds)[0]
    assert not np.allclose(a, b)
    onnx.checker.check_model(mp)
