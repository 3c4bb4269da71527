"""The compressed-model file format (``hfbconvert-compressed/1``).

A ``torch.save``d dict of tensors and plain data only, loadable with
``weights_only=True``:

    format        "hfbconvert-compressed/1"
    model_info    ModelInfo.to_dict() of the source model (rebuilds the skeleton)
    layers        {module name: {c_in, c_out, kind, critical_idx: [..], r, channel_scale}}
    state_dict    the deploy-form state dict of the whole hybrid model
    meta          plan, costs, sensitivities, fine-tune log, versions (plain data)

``meta["activation_bits"]`` 8 (``compress --activation-bits 8``) rebuilds the activation
quantizers (``actquant.attach``) and ``meta["bn_folded"]`` the folded layout (BNs as
Identity, conv biases, channel scales) before the state dict, which holds their values,
is loaded.

``meta["weight_bits"]`` (32 when absent) is the storage precision of the full-precision
weights (``compress --weight-bits``): the state dict holds them fake-quantized (float32
tensors with exactly the float16 / per-channel int8 values), and the rebuilt model is
marked with it so that the ONNX exporter and the cost model store them at those bits.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import actquant
from .bnfold import prepare_structure
from .errors import InputError
from .fileio import load_torch, save_torch
from .hybrid import HybridPointwise
from .layers import set_submodule
from .models.info import ModelInfo
from .weightquant import WEIGHT_BITS, mark_weight_bits

FORMAT = "hfbconvert-compressed/1"


def layer_spec(m: HybridPointwise) -> dict[str, Any]:
    return {
        "c_in": m.c_in,
        "c_out": m.c_out,
        "kind": m.kind,
        "critical_idx": m.critical_idx.tolist(),
        "r": m.r,
        "channel_scale": m.channel_scale is not None,
    }


def hybrid_from_spec(spec: dict[str, Any]) -> HybridPointwise:
    return HybridPointwise(
        spec["c_in"], spec["c_out"], torch.tensor(spec["critical_idx"], dtype=torch.long),
        spec["r"], spec["kind"], spec.get("channel_scale", False),
    )


def hybrid_layers(model: nn.Module) -> dict[str, HybridPointwise]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HybridPointwise)}


def save_compressed(path: str | os.PathLike, model: nn.Module, info: ModelInfo,
                    meta: dict[str, Any], overwrite: bool = True) -> None:
    """Freeze every hybrid layer (deploy form) and write the artifact atomically."""
    layers = hybrid_layers(model)
    for m in layers.values():
        m.freeze()
    obj = {
        "format": FORMAT,
        "model_info": info.to_dict(),
        "layers": {n: layer_spec(m) for n, m in layers.items()},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    save_torch(path, obj, overwrite)


def is_compressed(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def build_compressed(obj: dict[str, Any], source: str = "artifact") -> tuple[nn.Module, ModelInfo]:
    """Rebuild the deploy-form hybrid model from a loaded artifact dict."""
    from .models.loading import build_model

    info = ModelInfo.from_dict(obj["model_info"])
    model = build_model(info)
    for name, spec in obj["layers"].items():
        h = hybrid_from_spec(spec)
        h.freeze()
        set_submodule(model, name, h)
    meta = obj.get("meta") or {}
    prepare_structure(model, [tuple(p) for p in meta.get("bn_folded") or []])
    act_bits = meta.get("activation_bits", 32)
    if act_bits not in actquant.ACT_BITS:
        raise InputError(f"{source}: unsupported activation_bits {act_bits!r} in the "
                         "artifact's metadata (32 or 8)")
    if act_bits == 8:
        # artifacts from before --hidden-bits always had uint8 hidden units
        hidden_bits = meta.get("hidden_bits", 8)
        if hidden_bits not in actquant.HIDDEN_BITS:
            raise InputError(f"{source}: unsupported hidden_bits {hidden_bits!r} in the "
                             "artifact's metadata (32 or 8)")
        actquant.attach(model, hidden_bits)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(
            f"{source}: compressed artifact does not match its layers ({first})") from None
    bits = (obj.get("meta") or {}).get("weight_bits", 32)
    if bits not in WEIGHT_BITS:
        raise InputError(f"{source}: unsupported weight_bits {bits!r} in the artifact's "
                         "metadata (32, 16 or 8)")
    mark_weight_bits(model, bits)
    model.eval()
    return model, info


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, ModelInfo, dict[str, Any]]:
    try:
        obj = load_torch(path)
    except InputError as exc:
        if "--trust-pickle" not in str(exc):
            raise
        # our artifacts never hold pickled code, and `report` has no --trust-pickle
        raise InputError(f"{path}: not an hfbconvert compressed model (it contains pickled "
                         "Python objects)") from None
    if not is_compressed(obj):
        raise InputError(f"{path}: not an hfbconvert compressed model (format {FORMAT})")
    model, info = build_compressed(obj, str(path))
    return model, info, obj.get("meta", {})
