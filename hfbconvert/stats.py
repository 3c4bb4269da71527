"""Per-layer input statistics (second moment Σ = E[x xᵀ] and mean) from calibration data.

Only a deterministic random subset of pixel positions per image is used: Σ of a
c_in-dimensional input converges long before all H·W positions are seen, and the
matmul X^T X dominates the cost otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import pointwise_input


@dataclass
class InputStats:
    sigma: torch.Tensor  # (c_in, c_in) float64, E[x xᵀ]
    mean: torch.Tensor  # (c_in,) float64
    count: int

    @property
    def c_in(self) -> int:
        return int(self.mean.numel())


def sample_rows(x: torch.Tensor, max_pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Flatten a layer input to rows of features, keeping ≤ max_pixels positions/image."""
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        if h * w > max_pixels:
            idx = torch.randperm(h * w, generator=gen)[:max_pixels].to(x.device)
            rows = rows[:, idx]
        return rows.reshape(-1, c)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    names: list[str],
    batches: Iterable[torch.Tensor],
    max_pixels: int = 64,
    seed: int = 0,
) -> dict[str, InputStats]:
    """One pass over the data with forward pre-hooks on the named layers."""
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list] = {}
    hooks = []
    for n in names:
        def hook(mod, inp, _n=n):
            rows = sample_rows(pointwise_input(mod, inp[0].detach()), max_pixels, gen).double()
            s = acc.setdefault(_n, [0.0, 0.0, 0])
            s[0] = s[0] + rows.T @ rows
            s[1] = s[1] + rows.sum(0)
            s[2] += rows.shape[0]
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for n, (s, m, c) in acc.items():
        out[n] = InputStats((s / c).cpu(), (m / c).cpu(), c)
    return out
