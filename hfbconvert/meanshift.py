"""Per-channel mean-shift correction of every layer's bias after rounding to 8 bits.

Rounding weights (and activations) to int8 adds an error whose mean over real inputs is
not zero: ``E[ΔW x] = ΔW · E[x]``. Each layer's per-channel output mean then drifts from
the original network's, and the drift compounds through the network. Matching each
layer's output mean to the original's on the calibration images, in network order (each
layer sees the already-corrected layers before it), removes that part of the error for
the price of one forward pass of each network; biases absorb the shift, so the deployed
model costs nothing extra.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import hooked_eval


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 2 else [0]
    return y.detach().double().mean(dim=dims)


def correction_sites(model: nn.Module, folded: list[tuple[str, str]],
                     ) -> tuple[dict[str, str], dict[str, nn.Module]]:
    """(module -> reference module, module -> bias owner) for every conv/linear/hybrid
    layer of ``model``: a layer followed by a BN (folded into it or not) is observed after
    that BN, in both networks."""
    from .actquant import quant_sites
    from .bnfold import conv_bn_pairs

    after = dict(folded)
    unfolded = dict(conv_bn_pairs(model))
    layers, owners = {}, {}
    for name, mod in quant_sites(model):
        if name in after:
            layers[after[name]], owners[after[name]] = after[name], mod
        elif name in unfolded:
            bn = unfolded[name]
            layers[bn], owners[bn] = bn, model.get_submodule(bn)
        else:
            layers[name], owners[name] = name, mod
    return layers, owners


@torch.no_grad()
def match_output_means(model: nn.Module, reference: nn.Module, images: torch.Tensor,
                       layers: dict[str, str], biases: dict[str, nn.Module],
                       ) -> dict[str, float | None]:
    """Shift ``biases[name].bias`` so that the output of module ``name`` in ``model`` has,
    per channel, the mean that module ``layers[name]`` of ``reference`` has on ``images``.

    ``layers`` maps a module of ``model`` to the module of ``reference`` whose output
    stands for it (itself, or the BN after it); ``biases`` maps it to the module whose
    ``bias`` moves that output (the layer itself, or the BN after it; a layer without a
    bias is left alone).
    One forward pass of each network: the hooks run in network order and correct the
    output they see, so later layers measure their means on corrected inputs. Returns the
    relative size of each correction (‖Δ‖ / ‖reference mean‖) for the report."""
    target: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(_m, _i, out):
            target[name] = _channel_mean(out)
        return hook

    _run_hooked(reference, images, {ref: grab(name) for name, ref in layers.items()})
    report: dict[str, float | None] = {}

    def correct(name: str):
        def hook(_m, _i, out):
            if name in report or name not in target:
                return None
            delta = (target[name] - _channel_mean(out)).to(out.dtype)
            owner = biases[name]
            if getattr(owner, "bias", None) is None:  # nowhere to put it: leave as is
                report[name] = None
                return None
            owner.bias.add_(delta.to(owner.bias.device))
            report[name] = float(delta.norm() / target[name].norm().clamp_min(1e-12))
            shape = (1, -1) + (1,) * (out.dim() - 2)
            return out + delta.reshape(shape)
        return hook

    _run_hooked(model, images, {name: correct(name) for name in layers})
    return report


def _run_hooked(net: nn.Module, images: torch.Tensor, hooks: dict) -> None:
    """One eval-mode forward pass with forward hooks on the named modules (removed after,
    training flag restored)."""
    with hooked_eval(net, [net.get_submodule(name).register_forward_hook(h)
                           for name, h in hooks.items()]):
        net(images)
