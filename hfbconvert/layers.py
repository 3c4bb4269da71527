"""Generic pointwise-layer discovery over any ``nn.Module``.

A pointwise layer is a ``Conv2d`` with a 1x1 kernel, stride 1, groups 1, or a ``Linear``.
Input spatial sizes come from one traced forward pass, so nothing here knows any
particular architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import InputError


@dataclass
class PointwiseLayer:
    name: str
    kind: str  # "conv" | "linear"
    c_in: int
    c_out: int
    height: int = 1
    width: int = 1
    has_bias: bool = False

    @property
    def pixels(self) -> int:
        """Output positions per image: the MULs of the layer are pixels·c_in·c_out."""
        return self.height * self.width

    def to_dict(self) -> dict:
        return asdict(self)


def is_pointwise(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (
        isinstance(m, nn.Conv2d)
        and tuple(m.kernel_size) == (1, 1)
        and m.groups == 1
        and tuple(m.stride) == (1, 1)
        and tuple(m.dilation) == (1, 1)
        and (m.padding == (0, 0) or m.padding == "valid")
    )


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
    """Input shape of each named module, from one forward pass of a single zero image."""
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
        model(torch.zeros(1, 3, resolution, resolution, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def find_pointwise(model: nn.Module, resolution: int,
                   source: str = "model") -> list[PointwiseLayer]:
    """All pointwise layers in forward-execution order with their spatial sizes."""
    cands = [n for n, m in model.named_modules() if is_pointwise(m)]
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
    out = []
    for n in order:
        m = model.get_submodule(n)
        shp = shapes[n]
        if isinstance(m, nn.Linear):
            pix = 1
            for s in shp[1:-1]:
                pix *= int(s)
            out.append(PointwiseLayer(n, "linear", m.in_features, m.out_features, pix, 1,
                                      m.bias is not None))
        else:
            out.append(PointwiseLayer(n, "conv", m.in_channels, m.out_channels, int(shp[2]),
                                      int(shp[3]), m.bias is not None))
    return out


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (c_out, c_in) weight matrix of a pointwise layer (detached)."""
    m = model.get_submodule(name)
    w = m.weight.detach()
    return w.reshape(w.shape[0], -1)


def layer_bias(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    if getattr(m, "bias", None) is None:
        return torch.zeros(m.weight.shape[0])
    return m.bias.detach().clone()
