"""The ``hfb`` domain's ONNX functions: model-local FunctionProtos built from standard ops
only (so a runtime without a native kernel still runs a file), one builder per op:
``UnpackTernary2bit``/``UnpackTernaryBase3``, ``StrassenPointwise``, ``StrassenConv``.
Their contract: ``docs/onnx_ops.md`` and the numpy ops in ``export/reference``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper

DOMAIN = "hfb"
DOMAIN_VERSION = 1
OP_NAME = "StrassenPointwise"
CONV_OP_NAME = "StrassenConv"  # the k×k bank: W_b a k×k conv (kernel/strides/pads/dilations)
CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations")
# packing name -> (unpack function name, base, codes per byte)
PACKINGS: dict[str, tuple[str, int, int]] = {
    "2bit": ("UnpackTernary2bit", 4, 4),
    "base3": ("UnpackTernaryBase3", 3, 5),
}


def _ref(name: str, ref: str, type_: int = AttributeProto.INT) -> AttributeProto:
    """An attribute whose value is the calling node's attribute ``ref``."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, type_
    return a


def _const_ref(out: str, attr: str) -> NodeProto:
    """Scalar int64 Constant taking its value from a function attribute."""
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(_ref("value_int", attr))
    return node


def _const(out: str, value: np.ndarray) -> NodeProto:
    return helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(value))


def _opsets(opset: int) -> list:
    return [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


def unpack_function(packing: str, opset: int) -> FunctionProto:
    """``W = Unpack(packed) <rows, cols>``: uint8 bytes -> float [rows, cols] in {-1, 0, 1}.

    code_i = (byte // base**i) % base for i in 0..per_byte-1; value = code - 1. For base 4
    this is exactly the 2-bit layout (bits [2i, 2i+1]); for base 3 the base-3 layout.
    """
    name, base, per_byte = PACKINGS[packing]
    pows = np.array([base**i for i in range(per_byte)], dtype=np.int32)
    nodes = [
        helper.make_node("Cast", ["packed"], ["p32"], to=TensorProto.INT32),
        _const("ax1", np.array([1], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["p32", "ax1"], ["col"]),
        _const("pows", pows),
        helper.make_node("Div", ["col", "pows"], ["shifted"]),
        _const("base", np.array(base, dtype=np.int32)),
        helper.make_node("Mod", ["shifted", "base"], ["codes"]),
        _const("flat_shape", np.array([-1], dtype=np.int64)),
        helper.make_node("Reshape", ["codes", "flat_shape"], ["flat"]),
        _const_ref("rows", "rows"),
        _const_ref("cols", "cols"),
        _const("ax0", np.array([0], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["rows", "ax0"], ["rows1"]),
        helper.make_node("Unsqueeze", ["cols", "ax0"], ["cols1"]),
        helper.make_node("Mul", ["rows1", "cols1"], ["count"]),
        _const("zero1", np.array([0], dtype=np.int64)),
        helper.make_node("Slice", ["flat", "zero1", "count"], ["head"]),  # drop padding codes
        helper.make_node("Cast", ["head"], ["head_f"], to=TensorProto.FLOAT),
        _const("one", np.array(1.0, dtype=np.float32)),
        helper.make_node("Sub", ["head_f", "one"], ["values"]),
        helper.make_node("Concat", ["rows1", "cols1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["values", "shape"], ["W"]),
    ]
    return helper.make_function(
        DOMAIN, name, ["packed"], ["W"], nodes, _opsets(opset), attributes=["rows", "cols"],
        doc_string=f"Unpack {packing} ternary codes to a float [rows, cols] matrix (row-major).",
    )


def _unpack_call(packing: str, src: str, out: str, rows: str, cols: str) -> NodeProto:
    node = helper.make_node(PACKINGS[packing][0], [src], [out], domain=DOMAIN)
    node.attribute.extend([_ref("rows", rows), _ref("cols", cols)])
    return node


def strassen_function(packing: str, opset: int, scaled: bool,
                      hidden_quant: bool = False, conv: bool = False) -> FunctionProto:
    """``Y = StrassenPointwise(X, Wb, Wc, a[, s][, h_scale, h_zero_point])
    <c_in, r, c_out, packing>`` on NCHW X.

    Y = W_c * (a ⊙ (W_b * X)) (⊙ s), both products 1x1 Convs. Conv rather than MatMul so
    that, once the weights are folded, onnxruntime keeps its blocked (NCHWc) conv layout
    through the layer; linear layers reach it as [N, C, 1, 1]. With int8 activations
    (``hidden_quant``; ``s`` is then always present) the hidden units ``a ⊙ (W_b * X)`` pass
    through uint8 quantization with h_scale [r], h_zero_point: uint8 [r] (QuantizeLinear +
    DequantizeLinear semantics along axis 1, written out in arithmetic ops) before W_c; the
    r pairs differ by powers of two (docs/onnx_ops.md). That is ``compress --hidden-bits
    8`` only: by default (int32 hidden units, exact) int8 models use the function without
    ``h_scale``/``h_zero_point``.

    ``conv``: ``hfb::StrassenConv`` <c_in, r, c_out, packing, kernel_shape, strides, pads,
    dilations>, the k×k bank: W_b [r, c_in = C·kh·kw] is reshaped to [r, C, kh, kw] and
    applied as a Conv with the node's geometry; the rest is the same.
    """
    inputs = ["X", "Wb", "Wc", "a"] + (["s"] if scaled else []) + (
        ["h_scale", "h_zero_point"] if hidden_quant else [])
    y_c = "Yu" if scaled else "Y"
    ha = "Ha_f" if hidden_quant else "Ha"
    nodes = [
        _unpack_call(packing, "Wb", "Wb_f", "r", "c_in"),
        _unpack_call(packing, "Wc", "Wc_f", "c_out", "r"),
        _const("hw", np.array([2, 3], dtype=np.int64)),
        _const("chw", np.array([1, 2], dtype=np.int64)),
    ]
    nodes += _wb_product_nodes(conv)
    nodes += [
        helper.make_node("Unsqueeze", ["a", "chw"], ["a_k"]),  # [r, 1, 1]
        # a first: onnxruntime folds a Conv -> Mul(X, constant) into the conv weights, which
        # reorders the float products and moves hidden-unit rounding boundaries
        helper.make_node("Mul", ["a_k", "H"], [ha]),
    ]
    if hidden_quant:
        nodes += _hidden_quant_nodes(ha)
    nodes += [
        helper.make_node("Conv", ["Ha", "Wc_k"], [y_c], kernel_shape=[1, 1]),
    ]
    if scaled:
        nodes += [
            helper.make_node("Unsqueeze", ["s", "chw"], ["s_k"]),  # [c_out, 1, 1]
            helper.make_node("Mul", ["Yu", "s_k"], ["Y"]),
        ]
    if conv:
        return helper.make_function(
            DOMAIN, CONV_OP_NAME, inputs, ["Y"], nodes, _opsets(opset),
            attributes=["c_in", "r", "c_out", "packing", *CONV_ATTRS],
            doc_string="Ternary StrassenNets k×k conv layer (NCHW); see docs/onnx_ops.md.",
        )
    return helper.make_function(
        DOMAIN, OP_NAME, inputs, ["Y"], nodes, _opsets(opset),
        attributes=["c_in", "r", "c_out", "packing"],
        doc_string="Ternary StrassenNets 1x1 conv layer (NCHW); see docs/onnx_ops.md.",
    )


def _wb_product_nodes(conv: bool) -> list[NodeProto]:
    """H = W_b * X from the unpacked Wb_f (1x1, or the k×k bank reshaped to [r, C, kh, kw]
    with the node's geometry), and Wc_f as a [c_out, r, 1, 1] conv weight Wc_k."""
    if not conv:
        return [
            helper.make_node("Unsqueeze", ["Wb_f", "hw"], ["Wb_k"]),  # [r, c_in, 1, 1]
            helper.make_node("Unsqueeze", ["Wc_f", "hw"], ["Wc_k"]),  # [c_out, r, 1, 1]
            helper.make_node("Conv", ["X", "Wb_k"], ["H"], kernel_shape=[1, 1]),
        ]
    ks = helper.make_node("Constant", [], ["ks"])
    ks.attribute.append(_ref("value_ints", "kernel_shape", AttributeProto.INTS))
    wb_conv = helper.make_node("Conv", ["X", "Wb_k"], ["H"])
    wb_conv.attribute.extend(_ref(a, a, AttributeProto.INTS) for a in CONV_ATTRS)
    return [
        _const_ref("r_s", "r"),
        _const("ax0c", np.array([0], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["r_s", "ax0c"], ["r_1"]),
        _const("minus1", np.array([-1], dtype=np.int64)),
        ks,
        helper.make_node("Concat", ["r_1", "minus1", "ks"], ["wb_shape"], axis=0),
        helper.make_node("Reshape", ["Wb_f", "wb_shape"], ["Wb_k"]),  # [r, C, kh, kw]
        helper.make_node("Unsqueeze", ["Wc_f", "hw"], ["Wc_k"]),  # [c_out, r, 1, 1]
        wb_conv,
    ]


def _hidden_quant_nodes(ha: str) -> list[NodeProto]:
    """uint8 hidden units: ``ha`` -> Ha through QuantizeLinear/DequantizeLinear (axis 1)
    arithmetic written out: onnxruntime would otherwise fuse W_b's conv and this
    per-channel Q into a QLinearConv, which takes a single output zero point only (it
    fails at run time)."""
    return [
        helper.make_node("Unsqueeze", ["h_scale", "chw"], ["hs_k"]),  # [r, 1, 1]
        helper.make_node("Cast", ["h_zero_point"], ["hz_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["hz_f", "chw"], ["hz_k"]),
        helper.make_node("Div", [ha, "hs_k"], ["Ha_s"]),
        helper.make_node("Round", ["Ha_s"], ["Ha_r"]),  # half to even, as QuantizeLinear
        helper.make_node("Add", ["Ha_r", "hz_k"], ["Ha_z"]),
        _const("qmin", np.array(0.0, dtype=np.float32)),
        _const("qmax", np.array(255.0, dtype=np.float32)),
        helper.make_node("Clip", ["Ha_z", "qmin", "qmax"], ["Ha_q"]),
        helper.make_node("Sub", ["Ha_q", "hz_k"], ["Ha_c"]),
        helper.make_node("Mul", ["Ha_c", "hs_k"], ["Ha"]),
    ]


def hfb_functions(packing: str, opset: int, scaled: bool,
                  hidden_quant: bool = False, pointwise: bool = True,
                  conv: bool = False) -> list[FunctionProto]:
    """The functions a model with ``hfb::StrassenPointwise`` (``pointwise``) and/or
    ``hfb::StrassenConv`` (``conv``) nodes must carry."""
    return [unpack_function(packing, opset)] + (
        [strassen_function(packing, opset, scaled, hidden_quant)] if pointwise else []) + (
        [strassen_function(packing, opset, scaled, hidden_quant, conv=True)] if conv else [])


