"""Fold each BatchNorm2d into the conv or hybrid layer that feeds it.

Int8 kernels take a conv's weights and bias and requantize its output once; a BatchNorm
left between a conv and the next quantizer would run in float. Folding before the weights
are rounded to int8 means the int8 codes are those of the folded weights (as onnxruntime's
PTQ quantizes its BN-folded graph), so nothing is lost to a second rounding.

For a hybrid layer the per-channel BN factor k = γ/√(σ²+ε) goes into the critical rows and
into the tolerant bank's per-output-channel scale (``channel_scale``; in an int8 kernel it
merges into the output requantization multiplier, as a BN factor does for any int8 conv),
and the shift into the bias. Ternary codes and ``a`` are untouched.

Pairs are found with ``torch.fx`` (a BN whose only input is a conv/hybrid layer used
nowhere else), so any traceable model works; an untraceable one keeps its BatchNorms.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .handlers import handler_for, is_hybrid
from .layers import set_submodule


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_hybrid(m) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer name, BN name)`` for every BatchNorm2d fed only by a layer whose kind folds
    BN (convs and conv hybrids: ``LayerHandler.folds_bn``) and whose output goes nowhere
    else; [] when the model cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure just means "do not fold"
        return []
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = mods.get(src.target)
        h = None if layer is None else handler_for(layer)
        if h is not None and h.folds_bn(layer):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def prepare_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """The parameter layout of a folded model (for loading a saved state dict): every
    paired conv has a bias, every paired hybrid layer with tolerant filters a channel
    scale, and every paired BN is an Identity."""
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        if is_hybrid(layer):
            if layer.n_tolerant and layer.channel_scale is None:
                layer.channel_scale = nn.Parameter(torch.ones(layer.n_tolerant))
        elif layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_channels))
        set_submodule(model, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold, in place, every BN :func:`conv_bn_pairs` finds; returns the pairs folded.

    A Conv2d takes ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (what
    ``fuse_conv_bn_eval`` computes, without replacing the module); a hybrid layer, which
    PyTorch does not know, folds k = γ/√(σ²+ε) into its critical rows and channel scale.
    The two agree to float rounding (PyTorch multiplies by rsqrt): on the CIFAR-10
    MobileNetV1-0.5 (27 pairs, 807,648 weights) 75% of the folded weights are bit-identical
    to the division form, the rest within 2.8e-7 relative, and no int8 code changes."""
    pairs = conv_bn_pairs(model)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(bn, nn.BatchNorm2d)
        k = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(k)
        if is_hybrid(layer):
            layer.w_crit.mul_(k[layer.critical_idx][:, None])
            if layer.n_tolerant:
                kt = k[layer.tolerant_idx]
                if layer.channel_scale is None:
                    layer.channel_scale = nn.Parameter(kt.clone())
                else:
                    layer.channel_scale.mul_(kt)
            layer.bias.copy_((layer.bias - bn.running_mean) * k + beta)
        else:  # a plain conv: PyTorch's own fusion rule (k through rsqrt, in its order)
            w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean,
                                        bn.running_var, bn.eps, bn.weight, bn.bias)
            layer.weight.copy_(w)  # in place: the module and its parameter stay the same
            if layer.bias is None:
                layer.bias = nn.Parameter(b.detach().clone())
            else:
                layer.bias.copy_(b)
        set_submodule(model, bn_name, nn.Identity())
    return pairs
