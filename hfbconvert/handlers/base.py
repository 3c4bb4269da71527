"""The contract every layer kind implements (one subclass per kind, one module each).

A handler is the only place that knows a layer type: which modules it matches, the rows of
features the layer reads (its input as a matrix product ``y = W x`` per output position),
how the hybrid replacement computes, what it costs, how a BatchNorm folds into it, which
weight is rounded and which input quantized, and how the ternary bank is exported. The
rest of hfbconvert works on the matrix form ``W`` (c_out x c_in, ``c_in`` being the
fan-in: in_channels·k·k for a k×k conv) and asks :mod:`.registry` for everything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..costs import LayerCost
    from ..hybrid import HybridPointwise


@dataclass
class PointwiseLayer:
    """One convertible layer as a matrix: ``c_out`` outputs of ``c_in`` inputs each at
    ``height·width`` positions (``c_in`` is the fan-in: in_channels·k·k for a k×k conv)."""

    name: str
    kind: str  # "conv" | "linear" (the module family; the handler is registry.handler_for)
    c_in: int
    c_out: int
    height: int = 1
    width: int = 1
    has_bias: bool = False
    stride: int = 1  # conv only: the layer sees every stride-th input pixel
    kernel: int = 1  # conv only: square kernel (1: pointwise)
    padding: int = 0  # conv only: zero padding on every side
    dilation: int = 1  # conv only

    @property
    def pixels(self) -> int:
        """Output positions per image: the MULs of the layer are pixels·c_in·c_out."""
        return self.height * self.width

    def to_dict(self) -> dict:
        return asdict(self)


class LayerHandler:
    """Base class: a layer kind. Subclasses set the class attributes and override what
    their kind does differently; the defaults are those of a conv-like (NCHW) layer."""

    kind: ClassVar[str] = ""  # registry name, also the name ``--layers`` takes
    record_kind: ClassVar[str] = "conv"  # HybridPointwise.kind / PointwiseLayer.kind
    convertible: ClassVar[bool] = True  # False: costed, folded, quantized; never converted
    default: ClassVar[bool] = True  # converted unless ``--layers`` leaves the kind out
    description: ClassVar[str] = ""

    # ------------------------------------------------------------------ discovery
    def matches(self, m: nn.Module) -> bool:
        """Does this kind own the (original, not hybrid) module ``m``?"""
        raise NotImplementedError

    def matches_hybrid(self, h: HybridPointwise) -> bool:
        """Does this kind own the hybrid layer ``h``?"""
        return False

    def record(self, name: str, m: nn.Module, in_shape: tuple) -> PointwiseLayer:
        """The layer record of ``m`` from the shape of its input in one traced pass."""
        raise NotImplementedError

    def layer_input(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the matrix form reads, features on dim 1 (4-D) or the last dim: one row
        per output position, so statistics and reconstruction rows line up with outputs."""
        return x

    def weight_inputs(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(groups, rows, fan_in): what each row of the layer's full-precision weight
        multiplies, one row per output position (rows of weight group ``g`` read group
        ``g``'s inputs). Error-feedback int8 rounding weighs rounding errors by these."""
        r = self.layer_input(m, x)
        r = r.movedim(1, -1) if r.dim() == 4 else r
        return r.reshape(1, -1, r.shape[-1])

    def weight_matrix(self, m: nn.Module) -> torch.Tensor:
        """The (c_out, c_in) weight matrix (detached), in :meth:`layer_input`'s order."""
        w = m.weight.detach()
        return w.reshape(w.shape[0], -1)

    def bias(self, m: nn.Module) -> torch.Tensor:
        if getattr(m, "bias", None) is None:
            return torch.zeros(m.weight.shape[0])
        return m.bias.detach().clone()

    # ------------------------------------------------------------------ hybrid layer
    def build(self, layer: PointwiseLayer, critical_idx: torch.Tensor, r: int,
              channel_scale: bool = False) -> HybridPointwise:
        from ..hybrid import HybridPointwise

        return HybridPointwise(layer.c_in, layer.c_out, critical_idx, r, layer.kind,
                               channel_scale, layer.stride, layer.kernel, layer.padding,
                               layer.dilation)

    channel_dim: ClassVar[int] = 1

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per channel) shaped to broadcast over this kind's outputs."""
        return v[None, :, None, None]

    def read(self, h: HybridPointwise, x: torch.Tensor) -> torch.Tensor:
        """The hybrid layer's input as its products read it (stride subsampling, ...)."""
        return x

    def apply(self, h: HybridPointwise, x: torch.Tensor, w: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``w`` (rows, c_in) applied to ``read(x)`` with the layer's geometry."""
        raise NotImplementedError

    def apply_hidden(self, hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w`` (rows, r) applied to the hidden units (W_c: a 1x1 product)."""
        raise NotImplementedError

    def reads_one_channel(self, m: nn.Module) -> bool:
        """Does each output channel of ``m`` read one input channel alone (a depthwise
        conv)? Then a per-channel input scale merges into that channel's multiplier."""
        return False

    def check_site(self, m: nn.Module, spec: dict[str, Any]) -> bool:
        """Is ``m`` (a rebuilt skeleton's module) the layer an artifact spec describes?"""
        return False

    def geometry_ok(self, layer: PointwiseLayer) -> bool:
        """Can this kind build a hybrid with the record's geometry (artifact checks)?"""
        return True

    def geometry(self, h: HybridPointwise) -> dict[str, int]:
        """Artifact spec fields beyond c_in/c_out/kind/critical_idx/r/channel_scale."""
        return {"stride": h.stride}

    # ------------------------------------------------------------------ ONNX emission
    # ``s`` is the exporter's stand-in for a frozen hybrid layer (the same geometry
    # attributes, packed codes as buffers): see ``export/onnx.py``.
    def export_weight(self, s: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """The critical rows (matrix form) as the standard op's weight initializer."""
        return w

    def export_critical(self, s: nn.Module, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """The critical bank as one standard op (Conv/Gemm/MatMul) on ``read(x)``."""
        raise NotImplementedError

    def export_bank(self, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The ternary bank as one ``hfb`` node on ``read(x)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ costs
    def pixels(self, out: torch.Tensor) -> int:
        """Output positions per image of an output tensor of this kind."""
        return int(out.shape[2] * out.shape[3])

    def dense_cost(self, name: str, m: nn.Module, out: torch.Tensor, fp_bits: int,
                   weight_bits: int, count_bias: bool = True) -> LayerCost:
        """MULs/ADDs/params/bytes of the original (dense) module."""
        raise NotImplementedError

    # ------------------------------------------------------------------ BatchNorm
    def folds_bn(self, m: nn.Module) -> bool:
        """Can a BatchNorm2d that reads only this layer's output be folded into it?"""
        return False

    # ------------------------------------------------------------------ quantization
    def weight_attr(self, m: nn.Module) -> str | None:
        """The full-precision weight attribute ``--weight-bits`` rounds (None: none)."""
        return "weight"
