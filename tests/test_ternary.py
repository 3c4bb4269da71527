"""Ternary packing: round trips, sizes, and the ONNX unpack functions match ``ternary``."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from hfbconvert.export.onnx import PACKINGS, _unpack_float, unpack_function
from hfbconvert.ternary import pack_2bit, pack_base3, unpack_2bit, unpack_base3

PACKERS = {"2bit": (pack_2bit, unpack_2bit, 4), "base3": (pack_base3, unpack_base3, 5)}

ternary_lists = st.one_of(
    st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=17),
    st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=300),
)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@given(values=ternary_lists)
@settings(max_examples=150, deadline=None)
def test_round_trip(packing: str, values: list[int]) -> None:
    pack, unpack, per_byte = PACKERS[packing]
    t = torch.tensor(values, dtype=torch.int8)
    p = pack(t)
    assert p.dtype == torch.uint8
    assert p.numel() == math.ceil(len(values) / per_byte)
    assert torch.equal(unpack(p, len(values)), t)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@given(values=st.lists(st.sampled_from([-1, 0, 1]), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_padding_codes_are_one(packing: str, values: list[int]) -> None:
    """Trailing padding decodes to 0 (code 1), so a reader may ignore n and still be exact."""
    pack, unpack, per_byte = PACKERS[packing]
    p = pack(torch.tensor(values, dtype=torch.int8))
    full = unpack(p, p.numel() * per_byte)
    assert torch.all(full[len(values):] == 0)


def test_documented_bit_order() -> None:
    # 2-bit: element i of a group of four in bits [2i, 2i+1], code = v + 1
    assert pack_2bit(torch.tensor([-1, 0, 1, 1])).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6]
    assert pack_2bit(torch.tensor([1])).tolist() == [2 | 1 << 2 | 1 << 4 | 1 << 6]
    # base-3: byte = sum code_i * 3**i
    assert pack_base3(torch.tensor([1, 0, -1, 1, 0])).tolist() == [2 + 3 + 0 + 2 * 27 + 81]
    assert pack_base3(torch.tensor([1, 1, 1, 1, 1])).tolist() == [242]


def test_docs_examples() -> None:
    """The worked examples in docs/onnx_ops.md."""
    assert pack_2bit(torch.tensor([-1, 0, 1, 1])).tolist() == [164]
    assert pack_2bit(torch.tensor([1])).tolist() == [86]
    assert pack_base3(torch.tensor([1, 0, -1, 1, 0])).tolist() == [140]


def test_rejects_non_ternary() -> None:
    with pytest.raises(ValueError):
        pack_2bit(torch.tensor([2]))


def _unpack_model(packing: str, rows: int, cols: int) -> onnx.ModelProto:
    """A graph whose only node calls the model-local unpack function on a graph *input*
    (not an initializer), so the runtime executes the body instead of folding it."""
    name = PACKINGS[packing][0]
    node = helper.make_node(name, ["packed"], ["W"], domain="hfb", rows=rows, cols=cols)
    graph = helper.make_graph(
        [node], "unpack",
        [helper.make_tensor_value_info("packed", TensorProto.UINT8, [None])],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [rows, cols])],
    )
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                 helper.make_opsetid("hfb", 1)],
                           functions=[unpack_function(packing, 17)])
    mp.ir_version = 8
    onnx.checker.check_model(mp, full_check=True)
    return mp


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@given(rows=st.integers(1, 6), cols=st.integers(1, 7), data=st.data())
@settings(max_examples=25, deadline=None)
def test_onnx_unpack_matches(packing: str, rows: int, cols: int, data: st.DataObject) -> None:
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    pack, unpack, _ = PACKERS[packing]
    values = data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=rows * cols,
                                max_size=rows * cols))
    packed = pack(torch.tensor(values, dtype=torch.int8))
    want = unpack(packed, rows * cols).reshape(rows, cols).float().numpy()
    mp = _unpack_model(packing, rows, cols)
    feed = {"packed": packed.numpy()}
    got_ref = ReferenceEvaluator(mp).run(None, feed)[0]
    sess = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
    got_ort = sess.run(None, feed)[0]
    np.testing.assert_array_equal(got_ref, want)
    np.testing.assert_array_equal(got_ort, want)
    assert got_ort.dtype == np.float32
    torch.testing.assert_close(_unpack_float(packed, rows, cols, packing),
                               torch.from_numpy(want), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [
    torch.tensor([-128, 0, 1], dtype=torch.int8),   # abs(-128) overflows to -128 in int8
    torch.tensor([0.5, 0.0, -1.0]),                 # a fraction is not a ternary value
    torch.tensor([float("nan"), 1.0]),              # NaN compares false with everything
    torch.tensor([2, 0], dtype=torch.int8),
])
@pytest.mark.parametrize("pack", [pack_2bit, pack_base3])
def test_packers_refuse_non_ternary_values(bad: torch.Tensor, pack) -> None:
    with pytest.raises(ValueError, match="outside"):
        pack(bad)
