"""Generic discovery of convertible layers over any ``nn.Module``.

Which modules are layers of which kind is the handlers' business (``hfbconvert.handlers``:
pointwise 1x1 convs, Linear, opt-in k×k convs); this module finds them, in forward order,
with input sizes from one traced forward pass, so nothing here knows any particular
architecture or layer type.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import InputError
from .handlers import PointwiseLayer, convertible, handler_for, handler_for_record

__all__ = ["PointwiseLayer", "find_pointwise", "hooked_eval", "is_pointwise", "layer_bias",
           "layer_weight", "pointwise_input", "pointwise_stride", "select_layers",
           "set_submodule", "trace_shapes"]


def is_pointwise(m: nn.Module, kinds: Iterable[str] | None = None) -> bool:
    """Would ``m`` be converted under ``kinds`` (default: pointwise and linear)?"""
    return convertible(m, kinds) is not None


def pointwise_stride(m: nn.Module) -> int:
    """Input subsampling of a pointwise layer (1 for Linear and unstrided convs)."""
    s = getattr(m, "stride", 1)
    return int(s[0]) if isinstance(s, tuple) else int(s)


def pointwise_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's matrix form reads (its kind decides: every stride-th pixel of a
    strided 1x1 conv, im2col rows of a k×k conv), so statistics and reconstruction rows
    line up with the layer's outputs."""
    h = handler_for(m)
    return x if h is None else h.layer_input(m, x)


@contextmanager
def hooked_eval(model: nn.Module, handles: Iterable) -> Iterator[nn.Module]:
    """``model`` in eval mode while its hooks (``handles``) are registered; afterwards the
    hooks are removed and the training flag restored, even if the forward pass raised."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def trace_shapes(model: nn.Module, resolution: int, names: list[str]) -> dict[str, tuple]:
    """Input shape of each named module, from one forward pass of a single zero image
    (under the key ``""``: the output's shape, or its type name when not a tensor)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for n in names:
        def hook(mod, inp, _n=n):
            shapes[_n] = tuple(inp[0].shape)
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        out = model(torch.zeros(1, 3, resolution, resolution, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    shapes[""] = tuple(out.shape) if isinstance(out, torch.Tensor) else (type(out).__name__,)
    return shapes


def find_pointwise(model: nn.Module, resolution: int, source: str = "model",
                   kinds: Iterable[str] | None = None) -> list[PointwiseLayer]:
    """All convertible layers of ``kinds`` (default: pointwise and linear) in
    forward-execution order with their spatial sizes.

    Refuses, before any work, what could not be converted, saved and rebuilt: a module
    that returns anything but one logits tensor (N, classes), and a convertible layer
    registered under two names (shared weights: replacing one name would unshare them).
    """
    kinds = None if kinds is None else tuple(kinds)
    cands = [n for n, m in model.named_modules() if is_pointwise(m, kinds)]
    seen: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if is_pointwise(m, kinds) and seen.setdefault(id(m), n) != n:
            raise InputError(f"{source}: layer {seen[id(m)]} is shared (also {n}); "
                             f"hfbconvert converts unshared layers: {{exclude}} "
                             f"'{seen[id(m)]}'", exclude="exclude")
    if not cands:
        raise InputError(f"{source}: model has no pointwise (1x1 conv or Linear) layers")
    order: list[str] = []
    hooks = []
    for n in cands:
        def hook(mod, inp, _n=n):
            if _n not in order:
                order.append(_n)
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        shapes = trace_shapes(model, resolution, cands)
    except Exception as exc:
        raise InputError(
            f"{source}: forward pass at {resolution}x{resolution} failed ({exc})"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    logits = shapes.pop("")
    if len(logits) != 2 or not isinstance(logits[0], int):
        got = f"a {logits[0]}" if isinstance(logits[0], str) else \
            f"a tensor of shape {list(logits)}"
        raise InputError(f"{source}: forward returns {got}; hfbconvert needs one (batch, "
                         "classes) logits tensor (wrap the module to return it)")
    out = []
    for n in order:
        m = model.get_submodule(n)
        h = convertible(m, kinds)
        assert h is not None
        out.append(h.record(n, m, shapes[n]))
    return out


def select_layers(layers: list[PointwiseLayer], include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = (), source: str = "model"
                  ) -> list[PointwiseLayer]:
    """Layers whose module name matches an ``include`` glob (all when empty) and no
    ``exclude`` glob (fnmatch, as onnxruntime's ``nodes_to_exclude`` names nodes). A glob
    that matches no layer is an error: a typo must not silently convert everything."""
    names = [ly.name for ly in layers]
    for field, pats in (("include", include), ("exclude", exclude)):
        for p in pats:
            if not fnmatch.filter(names, p):
                raise InputError(f"{source}: {{field}} {p!r} matches none of its "
                                 f"{len(names)} convertible layers (e.g. {names[0]})",
                                 field=field)
    out = [ly for ly in layers if (not include or any(fnmatch.fnmatchcase(ly.name, p)
                                                        for p in include))
           and not any(fnmatch.fnmatchcase(ly.name, p) for p in exclude)]
    if not out:
        raise InputError(f"{source}: {{include}}/{{exclude}} leave no layer to convert",
                         include="include", exclude="exclude")
    return out


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (c_out, c_in) weight matrix of a convertible layer (detached; c_in: fan-in)."""
    m = model.get_submodule(name)
    h = handler_for(m)
    assert h is not None, name
    return h.weight_matrix(m)


def layer_bias(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    h = handler_for(m)
    assert h is not None, name
    return h.bias(m)


def build_layer(layer: PointwiseLayer, critical_idx: torch.Tensor, r: int,
                channel_scale: bool = False) -> nn.Module:
    """The (unfitted) hybrid replacement of ``layer``, built by its kind."""
    return handler_for_record(layer).build(layer, critical_idx, r, channel_scale)
