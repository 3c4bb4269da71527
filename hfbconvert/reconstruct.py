"""Sequential reconstruction: fit layers in network order against the compressed
network's own inputs, to match the original network's outputs.

Data access per layer: one early-stopped forward pass of the compressed prefix. The
original network's inputs to every layer are captured once, at the same sampled pixel
positions, so target outputs y = W_orig·x_orig + b_orig are formed on the fly.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn

from .fitting import PairStats, fit_layer
from .handlers import is_hybrid
from .layers import PointwiseLayer, hooked_eval, layer_bias, layer_weight, pointwise_input


class _Stop(Exception):
    pass


def _positions(x: torch.Tensor, per_image: int, seed: int) -> torch.Tensor | None:
    """Deterministic pixel positions for one batch (None: take all rows)."""
    if x.dim() != 4:
        return None
    hw = x.shape[2] * x.shape[3]
    if hw <= per_image:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(hw, generator=g)[:per_image]


def _rows(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 2:
        return x
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    if pos is not None:
        flat = flat[:, :, pos.to(x.device)]
    return flat.permute(0, 2, 1).reshape(-1, c)


@torch.no_grad()
def capture_rows(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                 per_image: int, seed: int, stop_at: str | None = None) -> dict[str, list]:
    """Input rows of the named layers for every batch (list per layer, one entry per batch).
    With ``stop_at`` the forward pass ends at that layer's input (saves the tail)."""
    out: dict[str, list] = {n: [] for n in names}
    hooks = []
    state = {"b": 0}
    for n in names:
        def hook(mod, inp, _n=n, _li=zlib.crc32(n.encode())):
            x = pointwise_input(mod, inp[0].detach())
            pos = _positions(x, per_image, (seed * 1_000_003 + state["b"] * 1009 + _li) % 2**62)
            out[_n].append(_rows(x, pos).float())
            if _n == stop_at:
                raise _Stop
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with hooked_eval(model, hooks):
        for b, x in enumerate(batches):
            state["b"] = b
            try:
                model(x)
            except _Stop:
                pass
    return out


def pair_stats(xq: list[torch.Tensor], y: list[torch.Tensor]) -> PairStats:
    sxx = sxy = mx = my = 0
    cnt = 0
    for a, b in zip(xq, y):
        a, b = a.double(), b.double()
        sxx = sxx + a.T @ a
        sxy = sxy + a.T @ b
        mx = mx + a.sum(0)
        my = my + b.sum(0)
        cnt += a.shape[0]
    return PairStats(sxx / cnt, sxy / cnt, mx / cnt, my / cnt, cnt)




@torch.no_grad()
def reconstruct(original: nn.Module, hybrid: nn.Module, layers: list[PointwiseLayer],
                batches: list[torch.Tensor], per_image: int = 64, seed: int = 0,
                sequential: bool = True, bias_correction: bool = True,
                on_layer: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Fit every hybrid layer of ``hybrid`` (named like the original's pointwise layers).

    sequential=False fits each layer against the *original* inputs (the one-shot fit
    that METHOD.md §5 shows collapsing); True uses the compressed prefix's inputs."""
    names = [ly.name for ly in layers]
    xo = capture_rows(original, names, batches, per_image, seed)
    results: dict[str, dict] = {}
    for ly in layers:
        mod = hybrid.get_submodule(ly.name)
        if not is_hybrid(mod):
            continue
        w, b = layer_weight(original, ly.name).float(), layer_bias(original, ly.name).float()
        ys = [x @ w.T + b for x in xo[ly.name]]
        if sequential:
            xq = capture_rows(hybrid, [ly.name], batches, per_image, seed, stop_at=ly.name)[ly.name]
        else:
            xq = xo[ly.name]
        stats = pair_stats(xq, ys)
        res = fit_layer(mod, stats, bias_correction=bias_correction, prior=w)
        results[ly.name] = res
        if on_layer is not None:
            on_layer(ly.name, res)
    return results
