"""Layer-kind handlers: the one seam where a layer type plugs in (see ``base.py``).

Registration order is matching order: pointwise, linear, k×k conv, then the catch-all
for grouped/depthwise convs (costed and quantized, never converted).
"""

from .base import LayerHandler, PointwiseLayer
from .conv import ConvHandler
from .grouped import GroupedHandler
from .linear import LinearHandler
from .pointwise import PointwiseHandler
from .registry import (
    convertible,
    default_kinds,
    family,
    handler_by_kind,
    handler_for,
    handler_for_record,
    handlers,
    hybrid_modules,
    is_hybrid,
    layer_modules,
    modules_of_kind,
    parse_kinds,
    register,
)

for _h in (PointwiseHandler(), LinearHandler(), ConvHandler(), GroupedHandler()):
    register(_h)

__all__ = ["LayerHandler", "PointwiseLayer", "convertible", "default_kinds", "family",
           "handler_by_kind", "handler_for", "handler_for_record", "handlers",
           "hybrid_modules", "is_hybrid", "layer_modules", "modules_of_kind", "parse_kinds",
           "register"]
