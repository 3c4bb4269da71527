"""The stable Python API: what the CLI calls, for notebooks and pipelines.

    import hfbconvert as hfb

    model, info = hfb.load_model("mobilenet_v2.pt")            # or any nn.Module + hfb.describe
    calib = hfb.load_images("images/", info, size=1000)
    result = hfb.compress(model, calib, info=info, budget=0.536, steps=0)
    hfb.save_compressed(result, "m.hfb.pt")
    hfb.export_onnx(result, "m.onnx", verify_images=calib.normalized()[:16])
    print(hfb.evaluate(result.model, hfb.load_images("val/", info), reference=model))

Everything here takes and returns plain objects (``nn.Module``, :class:`ModelInfo`,
:class:`CalibData`, dicts); none of it prints, exits, or touches files the caller did not
name. Errors are :class:`hfbconvert.errors.InputError` (bad input) and
:class:`hfbconvert.errors.CheckFailed` (a check did not pass), each one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from hfbconvert.calib.readers import CalibData

from .errors import InputError
from .handlers import modules_of_kind
from .models.info import ModelInfo

__all__ = ["Compressed", "describe", "load_model", "load_images", "analyze", "compress",
           "save_compressed", "load_compressed", "export_onnx", "evaluate", "CompressConfig",
           "finetune"]

from .pipeline import CompressConfig  # noqa: E402  (re-exported: the one configuration)


@dataclass
class Compressed:
    """A compressed network with what describes it: ``model`` (deploy-form hybrid layers),
    ``info`` (preprocessing, classes) and ``meta`` (plan, costs, stages, configuration)."""

    model: nn.Module
    info: ModelInfo
    meta: dict[str, Any] = field(default_factory=dict)


def describe(model: nn.Module, resolution: int, *, mean=(0.485, 0.456, 0.406),
             std=(0.229, 0.224, 0.225), crop: float = 0.875,
             resize_mode: str = "resize_then_crop", classes: list[str] | None = None,
             label_offset: int = 0) -> ModelInfo:
    """A :class:`ModelInfo` for any in-memory module (defaults: torchvision's ImageNet
    preprocessing). ``resolution`` has no default: nothing about a module says it."""
    if not isinstance(resolution, int) or not 8 <= resolution <= 4096:
        raise InputError(f"resolution must be an integer in 8..4096, got {resolution!r}")
    linears = modules_of_kind(model, "linear")
    n = len(classes) if classes else (linears[-1].out_features if linears else 1000)
    return ModelInfo(arch="custom", config={}, resolution=resolution, mean=tuple(mean),
                     std=tuple(std), crop=crop, resize_mode=resize_mode,
                     label_offset=label_offset, num_classes=int(n) + label_offset
                     if classes else int(n), classes=list(classes) if classes else None,
                     source=type(model).__name__,
                     extra={"pickled_module":
                            f"{type(model).__module__}.{type(model).__qualname__}"})


def load_model(path: str | os.PathLike, *, arch: str | None = None,
               trust_pickle: bool = False,
               resolution: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """A checkpoint (state_dict of a known family, reference checkpoint, ``builtin:NAME``,
    or with ``trust_pickle`` a whole pickled module) and its :class:`ModelInfo`."""
    from .models.loading import load_model as _load
    from .models.loading import settle_resolution

    net, info = _load(str(path), arch=arch, trust_pickle=trust_pickle)
    return net, settle_resolution(info, resolution, str(path), hint="pass resolution=N")


def load_images(path: str | os.PathLike, info: ModelInfo, *, size: int | None = None,
                seed: int = 0) -> CalibData:
    """Images preprocessed as ``info`` says: an ImageFolder tree (labels by the model's
    class names), a flat folder, or an ``.npz`` with ``images`` (and ``labels``)."""
    from hfbconvert.calib.presets import preset_for
    from hfbconvert.calib.readers import load_images as _load

    kw: dict[str, Any] = {"classes": list(info.classes)} if info.classes else {}
    return _load(path, preset_for(info), size=size, seed=seed, **kw)


def analyze(model: nn.Module, data: CalibData | None = None, *, info: ModelInfo,
            budgets: tuple[int, ...] = (1, 2, 4, 8, 16), stats_images: int = 512,
            threshold: float = 0.05, threshold_budget: int = 2, seed: int = 0,
            include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
            device: str = "cpu", layers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per-filter sensitivity of every convertible layer (the ``analyze`` JSON);
    ``layers``: the layer kinds (default pointwise, linear; add "conv" for k×k banks)."""
    from .analysis import analyze as _analyze

    return _analyze(model, info, data, tuple(budgets), stats_images, threshold,
                    threshold_budget, seed, source=info.source or "model", device=device,
                    include=tuple(include), exclude=tuple(exclude), kinds=layers)


def compress(model: nn.Module, data: CalibData | None = None, *, info: ModelInfo,
             config: CompressConfig | None = None, plan: dict | None = None,
             checkpoint: str | None = None, resume: bool = False,
             **overrides: Any) -> Compressed:
    """Plan, fit and fine-tune; the caller's ``model`` is left as it was. ``overrides``
    are :class:`CompressConfig` fields (``budget=0.6, steps=0, activation_bits=8``);
    ``steps``, ``lr``, ``batch_size`` and ``device`` go to the fine-tune configuration."""
    from .pipeline import compress as _compress

    cfg = config or CompressConfig()
    ft_keys = {f.name for f in fields(cfg.finetune)} - {"seed"}
    ft = {k: overrides.pop(k) for k in list(overrides) if k in ft_keys}
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise InputError(f"compress: unknown option(s) {', '.join(bad)}; "
                         f"CompressConfig has {', '.join(sorted(known))}")
    if config is None and "activation_bits" in overrides:
        # the weight-bits default follows the activation bits (8 for int8 activations)
        overrides.setdefault("weight_bits", None)
    cfg = replace(cfg, **overrides)
    cfg = replace(cfg, finetune=replace(cfg.finetune, seed=cfg.seed, **ft))
    hybrid, meta = _compress(model, info, data, cfg, checkpoint=checkpoint, resume=resume,
                             plan_override=plan)
    meta.pop("timings", None)
    return Compressed(hybrid, info, meta)


def save_compressed(result: Compressed, path: str | os.PathLike, *,
                    force: bool = False) -> None:
    """Write the artifact (checked output path, atomic, checksummed)."""
    from .artifact import save_compressed as _save
    from .fileio import check_output_path, output_lock

    check_output_path(path, force)
    with output_lock([path]):
        _save(path, result.model, result.info, result.meta, overwrite=force)


def load_compressed(path: str | os.PathLike, *,
                    source_model: nn.Module | None = None) -> Compressed:
    """Read and verify an artifact; a custom architecture is rebuilt on ``source_model``
    (the module it was compressed from, or one of the same structure)."""
    from .artifact import load_compressed as _load

    model, info, meta = _load(path, skeleton=source_model)
    return Compressed(model, info, meta)


def export_onnx(model: Compressed | nn.Module, path: str | os.PathLike, *,
                info: ModelInfo | None = None, verify_images: torch.Tensor | None = None,
                force: bool = False, opset: int = 17, pack: str = "2bit",
                qdq: bool = False) -> dict[str, Any]:
    """ONNX with ``hfb`` function ops (stock onnxruntime runs it); with ``verify_images``
    (normalized NCHW) the file takes ``path`` only once onnxruntime matches PyTorch."""
    from .export.onnx import export_onnx as _export
    from .export.onnx import onnx_metadata
    from .fileio import output_lock

    net, inf = (model.model, model.info) if isinstance(model, Compressed) else (model, info)
    if inf is None:
        raise InputError("export_onnx: pass info= (hfbconvert.describe) for a plain module")
    with output_lock([path]):
        return _export(net, path, inf.resolution, opset=opset, pack=pack, force=force,
                       qdq=qdq, verify_images=verify_images, metadata=onnx_metadata(inf, None))


def evaluate(model: nn.Module, data: CalibData, *, reference: nn.Module | None = None,
             label_offset: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Top-1/top-5 (labelled data), agreement and KL with ``reference``, with intervals."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(model, data, label_offset, reference=reference, device=device)


def finetune(compressed: Compressed, data: CalibData, *, teacher: nn.Module,
             epochs: int = 1, learn_codes: bool = False, batch_size: int = 32,
             lr: float = 1e-4, latent_lr: float = 2e-3, label_weight: float = 1.0,
             feature_weight: float = 1.0, temperature: float = 1.0,
             held_fraction: float = 0.1, eval_every: int = 25, patience: int = 3,
             stop_from: float = 0.5, lr_backoff: int = 2, stop_on: str = "auto",
             seed: int = 0,
             device: str = "cpu",
             checkpoint: str | os.PathLike | None = None,
             checkpoint_every: int = 50, resume: bool = False) -> Compressed:
    """Fine-tune a compressed model further on labelled ``data`` (``load_images`` with the
    model's classes): distillation from ``teacher`` (the original) plus cross-entropy,
    optionally learning the ternary codes; early stopping on a held-apart split, whose
    curve (held KL, agreement, top-1, cross-entropy) lands in ``meta["finetune_curve"]``;
    ``stop_on`` ranks its checks (``RetrainConfig.stop_on``). ``compressed``
    is left as it was; the result is a new :class:`Compressed` (save it with
    :func:`save_compressed`). Under torchrun it runs on DDP like ``compress``."""
    from .retrain import RetrainConfig, retrain

    cfg = RetrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, latent_lr=latent_lr,
                        label_weight=label_weight, temperature=temperature,
                        feature_weight=feature_weight, learn_codes=learn_codes,
                        held_fraction=held_fraction, eval_every=eval_every, patience=patience,
                        stop_from=stop_from, lr_backoff=lr_backoff, stop_on=stop_on,
                        seed=seed)
    model, meta, _ = retrain(compressed.model, compressed.info, compressed.meta, teacher, data,
                             cfg, device=device,
                             checkpoint=None if checkpoint is None else str(checkpoint),
                             checkpoint_every=checkpoint_every, resume=resume)
    return Compressed(model, compressed.info, meta)
