"""Generic pointwise-layer discovery over any ``nn.Module``.

A pointwise layer is a ``Conv2d`` with a 1x1 kernel, groups 1, no padding, any square
stride (a stride-s 1x1 conv is a 1x1 conv on every s-th pixel: ResNet's downsample), or a
``Linear`` (on 2-D or N-D inputs: the last dimension holds the features).
Input spatial sizes come from one traced forward pass, so nothing here knows any
particular architecture.
"""

from __future__ import annotations

import fnmatch
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
    stride: int = 1  # conv only: the layer sees every stride-th input pixel

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
        and m.stride[0] == m.stride[1]
        and tuple(m.dilation) == (1, 1)
        and (tuple(m.padding) == (0, 0) if not isinstance(m.padding, str)
             else m.padding == "valid")
        and m.padding_mode == "zeros"
    )


def pointwise_stride(m: nn.Module) -> int:
    """Input subsampling of a pointwise layer (1 for Linear and unstrided convs)."""
    s = getattr(m, "stride", 1)
    return int(s[0]) if isinstance(s, tuple) else int(s)


def pointwise_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pixels a pointwise layer actually reads: every stride-th of a 4-D input, so
    statistics and reconstruction rows line up with the layer's outputs."""
    s = pointwise_stride(m) if x.dim() == 4 else 1
    return x[:, :, ::s, ::s] if s > 1 else x


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


def find_pointwise(model: nn.Module, resolution: int,
                   source: str = "model") -> list[PointwiseLayer]:
    """All pointwise layers in forward-execution order with their spatial sizes.

    Refuses, before any work, what could not be converted, saved and rebuilt: a module
    that returns anything but one logits tensor (N, classes), and a convertible layer
    registered under two names (shared weights: replacing one name would unshare them).
    """
    cands = [n for n, m in model.named_modules() if is_pointwise(m)]
    seen: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if is_pointwise(m) and seen.setdefault(id(m), n) != n:
            raise InputError(f"{source}: layer {seen[id(m)]} is shared (also {n}); "
                             f"hfbconvert converts unshared layers: --exclude '{seen[id(m)]}'")
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
        shp = shapes[n]
        if isinstance(m, nn.Linear):
            pix = 1
            for s in shp[1:-1]:
                pix *= int(s)
            out.append(PointwiseLayer(n, "linear", m.in_features, m.out_features, pix, 1,
                                      m.bias is not None))
        else:
            s = pointwise_stride(m)  # output size of a 1x1, unpadded conv
            out.append(PointwiseLayer(n, "conv", m.in_channels, m.out_channels,
                                      (int(shp[2]) - 1) // s + 1, (int(shp[3]) - 1) // s + 1,
                                      m.bias is not None, s))
    return out


def select_layers(layers: list[PointwiseLayer], include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = (), source: str = "model"
                  ) -> list[PointwiseLayer]:
    """Layers whose module name matches an ``include`` glob (all when empty) and no
    ``exclude`` glob (fnmatch, as onnxruntime's ``nodes_to_exclude`` names nodes). A glob
    that matches no layer is an error: a typo must not silently convert everything."""
    names = [ly.name for ly in layers]
    for flag, pats in (("--include", include), ("--exclude", exclude)):
        for p in pats:
            if not fnmatch.filter(names, p):
                raise InputError(f"{source}: {flag} {p!r} matches none of its "
                                 f"{len(names)} convertible layers (e.g. {names[0]})")
    out = [ly for ly in layers if (not include or any(fnmatch.fnmatchcase(ly.name, p)
                                                        for p in include))
           and not any(fnmatch.fnmatchcase(ly.name, p) for p in exclude)]
    if not out:
        raise InputError(f"{source}: --include/--exclude leave no layer to convert")
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
