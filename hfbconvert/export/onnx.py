"""ONNX export of plain and hybrid models.

Every ``HybridPointwise`` becomes: a standard Conv/Gemm for the FP32 critical bank, ONE
``hfb::StrassenPointwise`` node for the ternary bank (weights stored packed, uint8), then
Concat + Gather(perm) to restore the channel order and Add bias. The model carries
model-local FunctionProtos built from standard ops only, so a runtime without a native
kernel (onnxruntime CPU, ``onnx.reference``) still runs it; the unpack subgraph depends
only on initializers, so constant folding turns it into a float weight once, at session
creation. Semantics: ``docs/onnx_ops.md``; keep both in step.

Full-precision weights stored at 16 or 8 bits (``compress --weight-bits``) are written as
float16 initializers + Cast, or int8 initializers + float32 per-channel scales +
DequantizeLinear, feeding the unchanged Conv/Gemm/MatMul (:func:`store_weights`).

Graph capture uses the TorchScript exporter (``dynamo=False``) because it honours
``autograd.Function.symbolic``; it stops at opset 20, so higher opsets are reached with
``onnx.version_converter`` before the hfb functions are attached.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import AttributeProto, FunctionProto, ModelProto, NodeProto, TensorProto, helper
from torch import nn

from ..errors import CheckFailed, InputError
from ..fileio import atomic_path, atomic_write_bytes, check_output_path
from ..handlers import handler_for, hybrid_modules
from ..hybrid import HybridPointwise
from ..layers import set_submodule
from ..ternary import pack_2bit, pack_base3
from ..weightquant import check_bits, int8_codes, is_fp16_exact, model_weight_bits

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
    if conv:
        ks = helper.make_node("Constant", [], ["ks"])
        ks.attribute.append(_ref("value_ints", "kernel_shape", AttributeProto.INTS))
        wb_conv = helper.make_node("Conv", ["X", "Wb_k"], ["H"])
        wb_conv.attribute.extend(_ref(a, a, AttributeProto.INTS) for a in CONV_ATTRS)
        nodes += [
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
    else:
        nodes += [
            helper.make_node("Unsqueeze", ["Wb_f", "hw"], ["Wb_k"]),  # [r, c_in, 1, 1]
            helper.make_node("Unsqueeze", ["Wc_f", "hw"], ["Wc_k"]),  # [c_out, r, 1, 1]
            helper.make_node("Conv", ["X", "Wb_k"], ["H"], kernel_shape=[1, 1]),
        ]
    nodes += [
        helper.make_node("Unsqueeze", ["a", "chw"], ["a_k"]),  # [r, 1, 1]
        # a first: onnxruntime folds a Conv -> Mul(X, constant) into the conv weights, which
        # reorders the float products and moves hidden-unit rounding boundaries
        helper.make_node("Mul", ["a_k", "H"], [ha]),
    ]
    if hidden_quant:
        # QuantizeLinear/DequantizeLinear(axis 1) arithmetic written out: onnxruntime would
        # otherwise fuse W_b's conv and this per-channel Q into a QLinearConv, which takes a
        # single output zero point only (it fails at run time)
        nodes += [
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


def hfb_functions(packing: str, opset: int, scaled: bool,
                  hidden_quant: bool = False, pointwise: bool = True,
                  conv: bool = False) -> list[FunctionProto]:
    """The functions a model with ``hfb::StrassenPointwise`` (``pointwise``) and/or
    ``hfb::StrassenConv`` (``conv``) nodes must carry."""
    return [unpack_function(packing, opset)] + (
        [strassen_function(packing, opset, scaled, hidden_quant)] if pointwise else []) + (
        [strassen_function(packing, opset, scaled, hidden_quant, conv=True)] if conv else [])


# ---------------------------------------------------------------------------- export

SUPPORTED_OPSETS = (17, 18, 19, 20, 21, 22)
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's ceiling; above it: version_converter
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
_PACKERS = {"2bit": pack_2bit, "base3": pack_base3}


class _StrassenFn(torch.autograd.Function):
    """Ternary bank as one traced op: ``forward`` gives the tracer real values, ``symbolic``
    emits the single ``hfb::StrassenPointwise`` node."""

    @staticmethod
    def forward(ctx, x, wb, wc, a, s, c_in: int, r: int, c_out: int, packing: str,  # type: ignore[override]
                h_scale: tuple[float, ...] | None = None, h_zp: tuple[int, ...] = ()):
        # same ops in the same order as HybridPointwise.forward (conv kind)
        tb = _unpack_float(wb, r, c_in, packing)[:, :, None, None]
        tc = _unpack_float(wc, c_out, r, packing)[:, :, None, None]
        h = F.conv2d(x, tb) * a[None, :, None, None]
        if h_scale is not None:
            h = _fake_quant_hidden(h, h_scale, h_zp)
        y = F.conv2d(h, tc)
        return y if s is None else y * s[None, :, None, None]

    @staticmethod
    def symbolic(g, x, wb, wc, a, s, c_in, r, c_out, packing, h_scale=None, h_zp=()):  # type: ignore[no-untyped-def]
        args = [x, wb, wc, a] + ([s] if s is not None and not _is_none(s) else [])
        if h_scale is not None:
            args += [g.op("Constant", value_t=torch.tensor(list(h_scale), dtype=torch.float32)),
                     g.op("Constant", value_t=torch.tensor(list(h_zp), dtype=torch.uint8))]
        out = g.op(f"{DOMAIN}::{OP_NAME}", *args, c_in_i=c_in, r_i=r, c_out_i=c_out,
                   packing_s=packing)
        # a declared type keeps the exporter from warning, once per node, that it cannot
        # infer the custom op's shape
        out.setType(x.type().with_dtype(torch.float32).with_sizes([None, c_out, None, None]))
        return out


class _StrassenConvFn(torch.autograd.Function):
    """The k×k ternary bank as one traced op (``hfb::StrassenConv``)."""

    @staticmethod
    def forward(ctx, x, wb, wc, a, s, c_in: int, r: int, c_out: int, packing: str,  # type: ignore[override]
                h_scale: tuple[float, ...] | None, h_zp: tuple[int, ...], k: int, stride: int,
                padding: int, dilation: int):
        # same ops in the same order as HybridPointwise.forward (k×k conv kind)
        tb = _unpack_float(wb, r, c_in, packing).reshape(r, -1, k, k)
        tc = _unpack_float(wc, c_out, r, packing)[:, :, None, None]
        h = F.conv2d(x, tb, None, stride, padding, dilation) * a[None, :, None, None]
        if h_scale is not None:
            h = _fake_quant_hidden(h, h_scale, h_zp)
        y = F.conv2d(h, tc)
        return y if s is None else y * s[None, :, None, None]

    @staticmethod
    def symbolic(g, x, wb, wc, a, s, c_in, r, c_out, packing, h_scale, h_zp, k, stride,  # type: ignore[no-untyped-def]
                 padding, dilation):
        args = [x, wb, wc, a] + ([s] if s is not None and not _is_none(s) else [])
        if h_scale is not None:
            args += [g.op("Constant", value_t=torch.tensor(list(h_scale), dtype=torch.float32)),
                     g.op("Constant", value_t=torch.tensor(list(h_zp), dtype=torch.uint8))]
        out = g.op(f"{DOMAIN}::{CONV_OP_NAME}", *args, c_in_i=c_in, r_i=r, c_out_i=c_out,
                   packing_s=packing, kernel_shape_i=[k, k], strides_i=[stride, stride],
                   pads_i=[padding] * 4, dilations_i=[dilation, dilation])
        out.setType(x.type().with_dtype(torch.float32).with_sizes([None, c_out, None, None]))
        return out


def strassen_bank(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stand-in's ternary bank on NCHW ``x`` as one ``hfb::StrassenPointwise`` node."""
    return _StrassenFn.apply(x, s.wb_packed, s.wc_packed, s.a, s.channel_scale, s.c_in, s.r,
                             s.n_t, s.packing, s.h_scale, s.h_zp)


def strassen_conv_bank(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stand-in's k×k ternary bank on NCHW ``x`` as one ``hfb::StrassenConv`` node."""
    return _StrassenConvFn.apply(x, s.wb_packed, s.wc_packed, s.a, s.channel_scale, s.c_in,
                                 s.r, s.n_t, s.packing, s.h_scale, s.h_zp, s.kernel_size,
                                 s.stride, s.padding, s.dilation)


def _fake_quant_hidden(h: torch.Tensor, scale: tuple[float, ...], zp: tuple[int, ...],
                       ) -> torch.Tensor:
    """``actquant.ActQuant``'s per-channel arithmetic on the hidden units (traced values
    only; the symbolic passes h_scale/h_zero_point to the hfb function, whose body writes
    the same arithmetic out in standard ops)."""
    from ..actquant import fake_quant_ref

    return fake_quant_ref(h, torch.tensor(scale, dtype=torch.float32)[None, :, None, None],
                          torch.tensor(zp, dtype=torch.float32)[None, :, None, None])


def _unpack_float(packed: torch.Tensor, rows: int, cols: int, packing: str) -> torch.Tensor:
    """The unpack function body in torch. Builds its own constants: a module-level tensor
    (as in ``ternary.unpack_base3``) breaks the TorchScript tracer inside ``forward``."""
    _, base, per_byte = PACKINGS[packing]
    pows = torch.tensor([base**i for i in range(per_byte)], dtype=torch.int32)
    codes = (packed.to(torch.int32)[:, None] // pows) % base
    return (codes.reshape(-1)[: rows * cols].float() - 1.0).reshape(rows, cols)


def _is_none(v: Any) -> bool:
    """A TorchScript value standing for Python ``None``."""
    node = getattr(v, "node", None)
    return node is not None and node().mustBeNone()


class _ExportHybrid(nn.Module):
    """Export-only stand-in for a frozen ``HybridPointwise``: buffers hold exactly the
    tensors the ONNX file stores (packed codes, not int8), so they become the initializers."""

    def __init__(self, h: HybridPointwise, packing: str, scaled: bool) -> None:
        super().__init__()
        pack = _PACKERS[packing]
        ops = handler_for(h)
        assert ops is not None
        self.ops = ops  # the layer kind: its products and its ternary-bank node
        self.stride, self.kernel_size = h.stride, h.kernel_size
        self.padding, self.dilation = h.padding, h.dilation
        self.c_in, self.r, self.packing = h.c_in, h.r, packing
        self.n_c, self.n_t = h.n_critical, h.n_tolerant
        w = h.w_crit.detach().float().clone()
        self.register_buffer("w_crit", ops.export_weight(self, w))
        bias = h.bias.detach().float().clone()
        if self.n_t == 0:
            self.register_buffer("bias", bias)  # all critical: a plain conv/linear with bias
        else:
            self.register_buffer("bias", ops.per_channel(bias))
        self.register_buffer("wb_packed", pack(h.wb_codes.detach().cpu()))
        self.register_buffer("wc_packed", pack(h.wc_codes.detach().cpu()))
        self.register_buffer("a", h.a.detach().float().clone())
        cs = h.channel_scale
        if scaled and self.n_t:
            cs = torch.ones(self.n_t) if cs is None else cs.detach().float().clone()
            self.register_buffer("channel_scale", cs)
        else:
            self.channel_scale = None
        # int32 indices (ONNX Gather takes int32 or int64): half the bytes of int64
        self.register_buffer("perm", h.perm.detach().to(torch.int32).clone())
        # int8 activations: the same quantizer modules, traced as their arithmetic (Div,
        # Round, Add, Clip, Sub, Mul) or, with --qdq, as QuantizeLinear/DequantizeLinear;
        # the hidden one's parameters (--hidden-bits 8 only) become function inputs
        self.input_quant = copy.deepcopy(h.input_quant)
        hq = h.hidden_quant if self.n_t else None
        r = max(self.r, 1)
        self.h_scale = None if hq is None else tuple(
            float(v) for v in hq.scale.detach().float().expand(r))
        self.h_zp = () if hq is None else tuple(int(v) for v in hq.zero_point.expand(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = self.ops.read(self, x)  # e.g. a standard strided Slice before the function
        if self.n_t == 0:
            return self.ops.export_critical(self, x, self.w_crit, self.bias)
        yt = self.ops.export_bank(self, x)
        if self.n_c == 0:
            return yt + self.bias
        ch = self.ops.channel_dim
        y = torch.cat([self.ops.export_critical(self, x, self.w_crit, None), yt], dim=ch)
        return y.index_select(ch, self.perm) + self.bias


def _export_ready(model: nn.Module, packing: str, qdq: bool = False,
                  ) -> tuple[nn.Module, int, bool, bool]:
    """Deep copy in deploy form with every hybrid layer swapped for its export stand-in;
    activation quantizers written as Q/DQ (``qdq``) or as arithmetic."""
    from ..actquant import ActQuant

    m = copy.deepcopy(model).cpu().float().eval()
    for q in m.modules():
        if isinstance(q, ActQuant):
            q.export_qdq = qdq
    hybrids = dict(hybrid_modules(m))
    scaled = any(h.channel_scale is not None and h.n_tolerant for h in hybrids.values())
    hq = [h.hidden_quant is not None for h in hybrids.values() if h.n_tolerant]
    if any(hq) and not all(hq):
        raise InputError("hybrid layers mix float and int8 hidden units; re-run compress")
    hidden_quant = bool(hq) and all(hq)
    scaled = scaled or hidden_quant  # one function signature per model
    for name, h in hybrids.items():
        h.freeze()
        stand_in = _ExportHybrid(h, packing, scaled)
        if name == "":  # the model is a single hybrid layer
            return stand_in, int(h.n_tolerant > 0), scaled, hidden_quant
        set_submodule(m, name, stand_in)
    n_tol = sum(1 for h in hybrids.values() if h.n_tolerant)
    return m, n_tol, scaled, hidden_quant


def _torch_export(model: nn.Module, resolution: int, opset: int, dynamic_batch: bool,
                  custom: bool, fold_batchnorm: bool = True) -> ModelProto:
    """``fold_batchnorm=False`` keeps each BatchNormalization node (the model is in eval
    mode either way), so that a conv's weight initializer is its stored, rounded weight
    rather than that weight times the BN factor."""
    buf = io.BytesIO()
    training = torch.onnx.TrainingMode.EVAL if fold_batchnorm else \
        torch.onnx.TrainingMode.PRESERVE
    dummy = torch.zeros(2, 3, resolution, resolution)
    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
            do_constant_folding=True, custom_opsets={DOMAIN: DOMAIN_VERSION} if custom else None,
            training=training,
        )
    return onnx.load_from_string(buf.getvalue())


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
    new_nodes, new_inits = [], []
    for name, axis in targets.items():
        w = onnx.numpy_helper.to_array(inits[name])
        if bits == 16:
            if not is_fp16_exact(w):
                raise CheckFailed(f"weight {name} is not float16-representable (was the "
                                  "model compressed with --weight-bits 16?)")
            new_inits.append(onnx.numpy_helper.from_array(w.astype(np.float16), f"{name}.fp16"))
            new_nodes.append(helper.make_node("Cast", [f"{name}.fp16"], [name],
                                              name=f"{name}.cast", to=TensorProto.FLOAT))
        else:
            try:
                codes, scale = int8_codes(w, axis)
            except ValueError:
                raise CheckFailed(f"weight {name} is not per-channel int8-representable (was "
                                  "the model compressed with --weight-bits 8?)") from None
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


def _validate_args(opset: int, pack: str, resolution: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        lo, hi = SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]
        raise InputError(f"--opset {opset} is not supported; choose {lo}..{hi}")
    if pack not in PACKINGS:
        raise InputError(f"--pack {pack!r} is not supported; choose from {', '.join(PACKINGS)}")
    if int(resolution) < 1:
        raise InputError(f"resolution must be a positive integer, got {resolution}")


# ---------------------------------------------------------------------------- metadata

META_PREFIX = "hfbconvert."


def onnx_metadata(info: Any, source: str | None = None) -> dict[str, str]:
    """``metadata_props`` for a model described by ``info`` (a ModelInfo): hfbconvert
    version, preprocessing, label offset, class count and names, and the sha256 of
    ``source`` (the file named at export) when it is a file. Values are strings; the
    structured ones JSON. Read back with :func:`read_metadata`."""
    import hashlib
    import json

    from calib.presets import preset_for, preset_name

    from .. import __version__

    prep = preset_for(info)
    pre = dict(prep.to_dict(), preset=preset_name(prep),
               interpolation="bilinear" + (", antialiased" if prep.resize_mode ==
                                           "resize_then_crop" else ""))
    meta = {"version": __version__, "preprocess": json.dumps(pre, sort_keys=True),
            "label_offset": str(int(info.label_offset)),
            "num_classes": str(int(info.num_classes))}
    if info.classes:
        meta["classes"] = json.dumps([str(c) for c in info.classes])
    if source and Path(source).is_file():
        h = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        # the name only: the same file exported from another folder gives the same bytes
        meta.update(source_name=Path(source).name, source_sha256=h.hexdigest())
    return {META_PREFIX + k: v for k, v in meta.items()}


def set_metadata(mp: ModelProto, meta: dict[str, str]) -> None:
    """Write ``meta`` into ``mp.metadata_props`` (replacing keys already there), sorted."""
    props = {p.key: p.value for p in mp.metadata_props}
    props.update(meta)
    del mp.metadata_props[:]
    for k in sorted(props):
        mp.metadata_props.add(key=k, value=props[k])


def read_metadata(mp: ModelProto) -> dict[str, str]:
    """The hfbconvert ``metadata_props`` of ``mp``, prefix stripped (empty when none)."""
    n = len(META_PREFIX)
    return {p.key[n:]: p.value for p in mp.metadata_props if p.key.startswith(META_PREFIX)}


def build_onnx(model: nn.Module, resolution: int, opset: int = 17, pack: str = "2bit",
               dynamic_batch: bool = True, weight_bits: int | None = None,
               qdq: bool = False, metadata: dict[str, str] | None = None) -> ModelProto:
    """The checked in-memory ONNX model (no file I/O); see :func:`export_onnx`.
    ``weight_bits`` None: the model's own storage bits (32 unless it was rounded by
    ``compress --weight-bits``). ``metadata``: ``metadata_props`` to write
    (:func:`onnx_metadata`)."""
    _validate_args(opset, pack, resolution)
    bits = model_weight_bits(model) if weight_bits is None else check_bits(
        weight_bits, "weight bits")
    ready, n_tol, scaled, hidden_quant = _export_ready(model, pack, qdq)
    try:
        mp = _torch_export(ready, int(resolution), min(opset, TORCHSCRIPT_MAX_OPSET),
                           dynamic_batch, custom=n_tol > 0, fold_batchnorm=bits == 32)
        if opset > TORCHSCRIPT_MAX_OPSET:
            mp = _convert_opset(mp, opset)
    except Exception as exc:  # torch raises many types for unexportable models
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model cannot be exported to ONNX opset {opset}: {msg[:200]}") from None
    store_weights(mp, bits)
    if n_tol:
        _attach_functions(mp, pack, opset, scaled, hidden_quant)
    try:
        onnx.checker.check_model(mp, full_check=True)
    except Exception as exc:
        raise CheckFailed(f"exported ONNX model fails the ONNX checker: {exc}") from None
    if metadata:
        set_metadata(mp, metadata)
    return mp


def onnx_stats(mp: ModelProto, data: bytes) -> dict[str, Any]:
    """Sizes and node counts of an exported model, for reports."""
    ops = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in mp.graph.node
    )
    packed = sum(
        len(t.raw_data) for t in mp.graph.initializer if t.data_type == TensorProto.UINT8
    )
    stored = {TensorProto.FLOAT16: 16, TensorProto.INT8: 8}
    bits = next((stored[t.data_type] for t in mp.graph.initializer if t.data_type in stored),
                32)
    total_init = sum(onnx.numpy_helper.to_array(t).nbytes for t in mp.graph.initializer)
    return {
        "bytes": len(data),
        "opset": next(o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": int(sum(ops.values())),
        "node_counts": dict(sorted(ops.items())),
        "custom_ops": int(sum(c for k, c in ops.items() if k.startswith(f"{DOMAIN}::"))),
        "functions": [f"{f.domain}::{f.name}" for f in mp.functions],
        "initializer_bytes": int(total_init),
        "packed_bytes": int(packed),
        "weight_bits": bits,
    }


def export_onnx(model: nn.Module, path: str | Path, resolution: int, opset: int = 17,
                pack: str = "2bit", dynamic_batch: bool = True,
                force: bool = False, weight_bits: int | None = None,
                qdq: bool = False, verify_images: torch.Tensor | None = None,
                metadata: dict[str, str] | None = None,
                device: str | torch.device | None = None) -> dict[str, Any]:
    """Export ``model`` (plain or hybrid; hybrid layers are exported in deploy form) to
    ``path`` atomically. Refuses to overwrite unless ``force``; returns :func:`onnx_stats`
    plus ``packing`` and ``path``. ``weight_bits``, ``metadata``: see :func:`build_onnx`.

    With ``verify_images`` (normalized NCHW) the file is compared with PyTorch in
    onnxruntime *before* it takes ``path``: only a verified file ever lands there. A file
    that fails is kept for inspection as ``NAME.unverified.onnx`` (``stats["verify"]``
    says why, ``stats["path"]`` where it went), so a rerun needs no --force.
    """
    from ..verify import verify_onnx

    dest = check_output_path(path, force)
    _validate_args(opset, pack, resolution)
    mp = build_onnx(model, resolution, opset, pack, dynamic_batch, weight_bits, qdq,
                    metadata)
    data = mp.SerializeToString()
    stats = onnx_stats(mp, data)
    stats.update(packing=pack if stats["custom_ops"] else None, path=str(dest),
                 sha256=hashlib.sha256(data).hexdigest())  # report.json pins the file
    failed = None
    try:
        with atomic_path(dest, overwrite=force) as tmp:
            tmp.write_bytes(data)
            if verify_images is not None:
                vr = verify_onnx(tmp, model, verify_images, device=device)
                vr.onnx_path = str(dest)
                stats["verify"] = vr.to_dict()
                if not vr.passed:
                    raise _Unverified
    except _Unverified:
        failed = dest.with_name(dest.name.removesuffix(".onnx") + ".unverified.onnx")
        if os.path.lexists(failed) and not force:
            stats["path"] = None
        else:
            check_output_path(failed, True)
            atomic_write_bytes(failed, data)
            stats["path"] = str(failed)
            stats["verify"]["onnx_path"] = str(failed)
    return stats


class _Unverified(Exception):
    """Internal: verification failed, so the temporary file must not take the name."""
