"""The registry of layer kinds: ``register`` a handler, then ask ``handler_for(module)``
(original or hybrid module, first match in registration order) or
``handler_by_kind(name)``. The shape of onnxruntime quantization's ``registry.py`` +
``operators/``: one module per kind, one table that dispatches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from ..errors import InputError
from .base import LayerHandler, PointwiseLayer

_HANDLERS: list[LayerHandler] = []


def register(handler: LayerHandler) -> LayerHandler:
    """Add ``handler`` (matched after those registered before it); returns it."""
    if any(h.kind == handler.kind for h in _HANDLERS):
        raise ValueError(f"layer kind {handler.kind!r} is already registered")
    _HANDLERS.append(handler)
    return handler


def handlers() -> list[LayerHandler]:
    return list(_HANDLERS)


def handler_by_kind(kind: str) -> LayerHandler:
    for h in _HANDLERS:
        if h.kind == kind:
            return h
    raise KeyError(kind)


def is_hybrid(m: nn.Module) -> bool:
    """A hybrid filter-bank layer (the replacement every convertible kind builds)."""
    from ..hybrid import HybridPointwise

    return isinstance(m, HybridPointwise)


def handler_for(m: nn.Module) -> LayerHandler | None:
    """The kind that owns ``m`` (an original or a hybrid layer); None: not a layer kind
    hfbconvert knows (BatchNorm, activations, containers, ...)."""
    hyb = is_hybrid(m)
    for h in _HANDLERS:
        if (h.matches_hybrid(m) if hyb else h.matches(m)):  # type: ignore[arg-type]
            return h
    return None


def handler_for_record(layer: PointwiseLayer) -> LayerHandler:
    """The kind of a layer record (from its module family and kernel)."""
    if layer.kind == "linear":
        return handler_by_kind("linear")
    return handler_by_kind("pointwise" if layer.kernel == 1 else "conv")


def convertible_kinds() -> list[str]:
    return [h.kind for h in _HANDLERS if h.convertible]


def default_kinds() -> tuple[str, ...]:
    return tuple(h.kind for h in _HANDLERS if h.convertible and h.default)


def parse_kinds(spec: str | Iterable[str] | None, source: str = "layer_kinds",
                ) -> tuple[str, ...]:
    """``"pointwise,linear,conv"`` (or a sequence) -> the kinds, checked; None: defaults.
    ``source``: the configuration field the kinds came from (the CLI shows its flag)."""
    if spec is None:
        return default_kinds()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    known = convertible_kinds()
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise InputError("{src}: " + (f"unknown layer kind {bad[0]!r}; choose from "
                                      f"{', '.join(known)}" if bad else "no layer kind given"),
                         src=source)
    return tuple(dict.fromkeys(items))


def convertible(m: nn.Module, kinds: Iterable[str] | None = None) -> LayerHandler | None:
    """The handler that would convert ``m`` under ``kinds`` (default kinds when None)."""
    h = None if is_hybrid(m) else handler_for(m)
    kinds = default_kinds() if kinds is None else tuple(kinds)
    return h if h is not None and h.convertible and h.kind in kinds else None


def family(m: nn.Module) -> str | None:
    """"hybrid", "conv" (any Conv2d kind) or "linear" for a layer a kind owns, else None:
    for code with its own per-family model of a layer (``hw.workload``)."""
    if is_hybrid(m):
        return "hybrid"
    h = handler_for(m)
    return None if h is None else h.record_kind


def modules_of_kind(model: nn.Module, kind: str) -> list[nn.Module]:
    """The original (not hybrid) modules of ``model`` the handler ``kind`` owns."""
    want = handler_by_kind(kind)
    return [m for m in model.modules() if not is_hybrid(m) and handler_for(m) is want]


def hybrid_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every hybrid layer of ``model``."""
    for n, m in model.named_modules():
        if is_hybrid(m):
            yield n, m


def layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, LayerHandler]]:
    """``(name, module, handler)`` of every layer a kind owns, hybrid layers included,
    not the modules inside a hybrid layer (its quantizers), in module order."""
    inside: set[int] = set()
    for n, m in model.named_modules():
        if id(m) in inside:
            continue
        if is_hybrid(m):
            inside.update(id(x) for x in m.modules() if x is not m)
        h = handler_for(m)
        if h is not None:
            yield n, m, h
