"""The torch bridge: a model in deploy form becomes a traceable module whose hybrid layers
are export stand-ins (packed codes as buffers, the ternary bank as one autograd.Function
whose ``symbolic`` emits the single ``hfb`` node), captured by the TorchScript exporter.
Which products a stand-in runs is its layer kind's business (``handlers``).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import ModelProto
from torch import nn

from ..errors import InputError
from ..handlers import handler_for, hybrid_modules
from ..hybrid import HybridPointwise
from ..layers import set_submodule
from ..ternary import pack_2bit, pack_base3
from .functions import CONV_OP_NAME, DOMAIN, DOMAIN_VERSION, OP_NAME, PACKINGS

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

