"""Graph passes on the captured ModelProto: opset lifting, attaching the ``hfb``
functions the nodes call, and rewriting full-precision weights into their storage bits
(float16 + Cast, int8 + DequantizeLinear).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper

from ..errors import CheckFailed
from ..weightquant import int8_codes, is_fp16_exact
from .functions import CONV_OP_NAME, DOMAIN, DOMAIN_VERSION, OP_NAME, hfb_functions


def _convert_opset(mp: ModelProto, opset: int) -> ModelProto:
    """Lift the default-domain opset past the TorchScript exporter's ceiling."""
    from onnx import version_converter

    out = version_converter.convert_version(mp, opset)
    ir_needed = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    out.ir_version = max(out.ir_version, ir_needed)
    return out


def _attach_functions(mp: ModelProto, packing: str, opset: int, scaled: bool,
                      hidden_quant: bool = False) -> None:
    """The hfb functions the graph's nodes call (StrassenConv only with k×k banks)."""
    if not any(o.domain == DOMAIN for o in mp.opset_import):
        mp.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    used = {n.op_type for n in mp.graph.node if n.domain == DOMAIN}
    mp.functions.extend(hfb_functions(packing, opset, scaled, hidden_quant,
                                      pointwise=OP_NAME in used or CONV_OP_NAME not in used,
                                      conv=CONV_OP_NAME in used))


# op type -> index of its weight input; the channel axis of that weight is below
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


def _channel_axis(node: NodeProto, ndim: int) -> int:
    """Output-channel axis of ``node``'s weight: Conv [C_out, ...]; Gemm [N, K] with transB
    else [K, N]; MatMul [..., K, N]."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return ndim - 1


def _matmul_to_gemm(mp: ModelProto) -> None:
    """``MatMul(A, W[K, N])`` with a 2-D A and a float32 initializer W -> ``Gemm<transB=1>(A,
    Wᵀ[N, K])`` (the same products). With int8 weights this matters: onnxruntime rewrites
    DequantizeLinear -> MatMul into its MatMulNBits kernel, which quantizes the activations
    too (measured: 2e-3 relative logit error on a hybrid classifier); it leaves Gemm alone."""
    g = mp.graph
    inits = {t.name: t for t in g.initializer}
    users = Counter(i for n in g.node for i in n.input)
    cands = [n for n in g.node if n.op_type == "MatMul" and len(n.input) == 2
             and n.input[1] in inits and users[n.input[1]] == 1
             and inits[n.input[1]].data_type == TensorProto.FLOAT
             and len(inits[n.input[1]].dims) == 2]
    if not cands:
        return
    shapes = onnx.shape_inference.infer_shapes(mp)
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in (
        *shapes.graph.value_info, *shapes.graph.input)
        if v.type.tensor_type.HasField("shape")}
    for n in cands:
        if rank.get(n.input[0]) != 2:
            continue
        t = inits[n.input[1]]
        wt = onnx.numpy_helper.to_array(t).T.copy()
        t.CopyFrom(onnx.numpy_helper.from_array(wt, t.name))
        n.op_type = "Gemm"
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("transB", 1))


def _weight_targets(g: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> dict[str, int]:
    """The float32 weight initializers (>= 2-D) of graph-level Conv/Gemm/MatMul nodes, each
    with its output-channel axis."""
    targets: dict[str, int] = {}
    for node in g.node:
        k = _WEIGHT_INPUT.get(node.op_type)
        if k is None or len(node.input) <= k or node.input[k] not in inits:
            continue
        t = inits[node.input[k]]
        if t.data_type != TensorProto.FLOAT or len(t.dims) < 2:
            continue
        axis = _channel_axis(node, len(t.dims))
        if targets.setdefault(t.name, axis) != axis:
            raise CheckFailed(f"weight {t.name} is used with two different channel axes")
    return targets


def store_weights(mp: ModelProto, bits: int) -> int:
    """Rewrite, in place, every float32 weight initializer of a graph-level Conv, Gemm or
    MatMul into its ``bits`` storage; returns how many were rewritten. The consumer keeps
    its input name, now produced by

    * 16: ``Cast<to=FLOAT>(<name>.fp16)`` from a float16 initializer;
    * 8: ``DequantizeLinear<axis>(<name>.int8, <name>.scale, <name>.zero_point)`` from int8
      codes, float32 per-channel scales and int8 zero points.

    Both depend on initializers only (constant-foldable). The weights must already hold
    exactly representable values (fake-quantized by ``weightquant``): this re-derives the
    codes and raises :class:`CheckFailed` when they do not reproduce a weight bit for bit.
    """
    if bits == 32:
        return 0
    if bits == 8:
        _matmul_to_gemm(mp)
    g = mp.graph
    inits = {t.name: t for t in g.initializer}
    targets = _weight_targets(g, inits)
    new_nodes, new_inits = [], []
    for name, axis in targets.items():
        w = onnx.numpy_helper.to_array(inits[name])
        if bits == 16:
            if not is_fp16_exact(w):
                raise CheckFailed(f"weight {name} is not float16-representable (was the "
                                  "model compressed with {wb} 16?)", wb="weight_bits")
            new_inits.append(onnx.numpy_helper.from_array(w.astype(np.float16), f"{name}.fp16"))
            new_nodes.append(helper.make_node("Cast", [f"{name}.fp16"], [name],
                                              name=f"{name}.cast", to=TensorProto.FLOAT))
        else:
            try:
                codes, scale = int8_codes(w, axis)
            except ValueError:
                raise CheckFailed(f"weight {name} is not per-channel int8-representable (was "
                                  "the model compressed with {wb} 8?)",
                                  wb="weight_bits") from None
            zp = np.zeros(scale.shape, dtype=np.int8)
            new_inits += [onnx.numpy_helper.from_array(codes, f"{name}.int8"),
                          onnx.numpy_helper.from_array(scale, f"{name}.scale"),
                          onnx.numpy_helper.from_array(zp, f"{name}.zero_point")]
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero_point"],
                [name], name=f"{name}.dequantize", axis=axis))
    keep = [t for t in g.initializer if t.name not in targets]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes)  # initializer-only inputs: first is topological
    return len(targets)


