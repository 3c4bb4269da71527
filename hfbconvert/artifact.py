"""The compressed-model file format (``hfbconvert-compressed/2``; ``/1`` is still read).

A ``torch.save``d dict of tensors and plain data only, always loaded with
``weights_only=True`` (no pickled code, ever; ``meta["source_model"]`` is only a string):

    format        "hfbconvert-compressed/2"
    model_info    ModelInfo.to_dict() of the source model (rebuilds the skeleton)
    layers        {module name: {c_in, c_out, kind, critical_idx: [..], r, channel_scale}}
    tensors       {state-dict key: record} of the deploy-form hybrid model's state dict,
                  each stored losslessly and compactly (``tensorcodec``): ternary codes
                  2 bits each, weights at their ``weight_bits`` (float16, or int8 codes +
                  per-channel float32 scales), index buffers as narrow integers
    meta          plan, costs, sensitivities, fine-tune log, versions (plain data)
    sha256        digest of model_info, layers, meta and every record's name and sha256

Loading verifies every checksum (a mismatch: the file is corrupt or was modified), then
validates all metadata and sizes before it builds any module, so a damaged or crafted
file is refused with one line instead of a traceback or a huge allocation. ``/1`` files
held the plain ``state_dict`` and no checksums; they get the same validation.

``meta["activation_bits"]`` 8 (``compress --activation-bits 8``) rebuilds the activation
quantizers (``actquant.attach``) and ``meta["bn_folded"]`` the folded layout (BNs as
Identity, conv biases, channel scales) before the state dict, which holds their values,
is loaded. ``meta["weight_bits"]`` (32 when absent) is the storage precision of the
full-precision weights (``compress --weight-bits``); the rebuilt model is marked with it
so that the ONNX exporter and the cost model store them at those bits.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import os
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from . import actquant, tensorcodec
from .bnfold import prepare_structure
from .errors import InputError
from .fileio import PickleRefused, load_torch, save_torch
from .handlers import (
    PointwiseLayer,
    handler_for,
    handler_for_record,
    hybrid_modules,
    is_hybrid,
)
from .hybrid import HybridPointwise
from .layers import build_layer, set_submodule
from .models.info import ModelInfo
from .weightquant import WEIGHT_BITS, mark_weight_bits

FORMAT = "hfbconvert-compressed/2"
FORMAT_V1 = "hfbconvert-compressed/1"
FORMATS = (FORMAT_V1, FORMAT)
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096  # the CLI's --resolution range
MAX_ELEMENTS = 1 << 28  # tensor elements of a rebuilt skeleton (1 GiB of float32)
MAX_CHANNELS = 1 << 20
MAX_CLASSES = 1 << 20
SPEC_KEYS = ("c_in", "c_out", "kind", "critical_idx", "r", "channel_scale", "stride",
             "kernel", "padding", "dilation")
# optional geometry keys (absent in files from before k×k banks): their defaults
GEOMETRY_DEFAULTS = {"stride": 1, "kernel": 1, "padding": 0, "dilation": 1}
MAX_KERNEL = 31
CODE_KEYS = ("wb_codes", "wc_codes")


def layer_spec(m: HybridPointwise) -> dict[str, Any]:
    """A hybrid layer's structure; its kind adds the geometry it needs (a pointwise conv
    only its stride, so files of pointwise models are byte-for-byte as before)."""
    h = handler_for(m)
    assert h is not None
    return {
        "c_in": m.c_in,
        "c_out": m.c_out,
        "kind": m.kind,
        "critical_idx": m.critical_idx.tolist(),
        "r": m.r,
        "channel_scale": m.channel_scale is not None,
        **h.geometry(m),
    }


def spec_record(name: str, spec: dict[str, Any]) -> PointwiseLayer:
    """The layer record an artifact spec describes (geometry defaults for old files)."""
    g = {k: spec.get(k, v) for k, v in GEOMETRY_DEFAULTS.items()}
    return PointwiseLayer(name, spec["kind"], spec["c_in"], spec["c_out"],
                          stride=g["stride"], kernel=g["kernel"], padding=g["padding"],
                          dilation=g["dilation"])


def hybrid_from_spec(spec: dict[str, Any]) -> HybridPointwise:
    h = build_layer(spec_record("", spec), torch.tensor(spec["critical_idx"], dtype=torch.long),
                    spec["r"], spec.get("channel_scale", False))
    assert is_hybrid(h)
    return h


def hybrid_layers(model: nn.Module) -> dict[str, HybridPointwise]:
    return dict(hybrid_modules(model))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- writing
def artifact_dict(model: nn.Module, info: ModelInfo, meta: dict[str, Any]) -> dict[str, Any]:
    """Freeze every hybrid layer (deploy form) and return the artifact's contents."""
    layers = hybrid_layers(model)
    for m in layers.values():
        m.freeze()
    codes = {f"{n}.{k}" for n in layers for k in CODE_KEYS}
    int8 = meta.get("weight_bits", 32) == 8
    tensors = {k: tensorcodec.encode(v, ternary=k in codes, int8=int8)
               for k, v in model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "model_info": info.to_dict(),
        "layers": {n: layer_spec(m) for n, m in layers.items()},
        "meta": meta,
        "tensors": tensors,
    }
    obj["sha256"] = header_digest(obj)
    return obj


def save_compressed(path: str | os.PathLike, model: nn.Module, info: ModelInfo,
                    meta: dict[str, Any], overwrite: bool = True) -> None:
    """Freeze every hybrid layer (deploy form) and write the artifact atomically
    (``overwrite`` False: refuse a file that appeared at ``path`` meanwhile)."""
    save_torch(path, artifact_dict(model, info, meta), overwrite)


def _canon(x: Any, h: Any) -> None:
    """Feed a canonical serialization of plain data (dict order ignored) into ``h``."""
    if isinstance(x, dict):
        items = []
        for k, v in x.items():
            hk, hv = hashlib.sha256(), hashlib.sha256()
            _canon(k, hk)
            _canon(v, hv)
            items.append(hk.hexdigest() + hv.hexdigest())
        h.update(b"{" + ",".join(sorted(items)).encode() + b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"[%d:" % len(x))
        for v in x:
            _canon(v, h)
            h.update(b",")
        h.update(b"]")
    elif isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{list(t.shape)}:".encode())
        h.update(tensorcodec.tensor_bytes(t))
    else:  # None, bool, int, float (repr is exact), str
        h.update(f"{type(x).__name__}:{x!r};".encode())


def header_digest(obj: dict[str, Any]) -> str:
    """sha256 over model_info, layers, meta and each tensor record's name and sha256."""
    h = hashlib.sha256(b"hfbconvert-compressed/2\n")
    for key in ("model_info", "layers", "meta"):
        h.update(key.encode())
        _canon(obj.get(key), h)
    h.update(b"tensors")
    for name, rec in obj["tensors"].items():
        h.update(f"{name!r}={rec.get('sha256')!r};".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- reading
def is_compressed(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") in FORMATS


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n - 3] + "..."


class _Checker:
    """Raises one-line InputErrors naming the file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.arch = "the architecture"

    def bad(self, what: str, **fields: str) -> InputError:
        """``fields``: placeholders in ``what`` (:class:`.errors.HfbError`), kept for the CLI."""
        return InputError(f"{self.source}: malformed compressed model ({what})", **fields)

    def int_in(self, x: Any, lo: int, hi: int, what: str) -> int:
        if type(x) is not int:
            raise self.bad(f"{what} must be an integer, got {_short(x)}")
        if not lo <= x <= hi:
            raise self.bad(f"{what} {_short(x)} is out of range {lo}..{hi}")
        return x

    def real(self, x: Any, what: str) -> float:
        if type(x) not in (int, float) or not math.isfinite(x):
            raise self.bad(f"{what} must be a finite number, got {_short(x)}")
        return float(x)

    def dict_(self, x: Any, what: str) -> dict[Any, Any]:
        if not isinstance(x, dict):
            raise self.bad(f"{what} must be a dict, got {type(x).__name__}")
        return x


def _check_model_info(d: Any, c: _Checker) -> ModelInfo:
    from hfbconvert.calib.presets import RESIZE_MODES

    from .models.loading import ARCHS, CUSTOM

    c.dict_(d, "model_info")
    known = {f.name for f in fields(ModelInfo)}
    unknown = [k for k in d if k not in known]
    if unknown:
        raise c.bad(f"unknown model_info key {_short(unknown[0])}")
    for key in ("arch", "config"):
        if key not in d:
            raise c.bad(f"model_info lacks {key!r}")
    arch = d["arch"]
    if not isinstance(arch, str) or arch not in (*ARCHS, CUSTOM):
        raise c.bad(f"model_info.arch {_short(arch)} is not one of "
                    f"{', '.join(sorted((*ARCHS, CUSTOM)))}")
    config = c.dict_(d["config"], "model_info.config")
    if arch == CUSTOM and config:
        raise c.bad("model_info.config of a custom model must be empty")
    params = inspect.signature(ARCHS[arch].__init__).parameters if arch in ARCHS else {}
    for k, v in config.items():
        if not isinstance(k, str) or k == "self" or k not in params:
            raise c.bad(f"model_info.config has unknown key {_short(k)} for {arch}")
        if type(v) not in (bool, int, float, str) or (type(v) is float and not math.isfinite(v)):
            raise c.bad(f"model_info.config.{k} has bad value {_short(v)}")
    if "resolution" in d:
        res = d["resolution"]
        if type(res) is not int or not MIN_RESOLUTION <= res <= MAX_RESOLUTION:
            raise c.bad(f"model_info.resolution {_short(res)} is not an integer in "
                        f"{MIN_RESOLUTION}..{MAX_RESOLUTION} pixels")
    for key in ("mean", "std"):
        if key in d:
            v = d[key]
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise c.bad(f"model_info.{key} must be 3 numbers, got {_short(v)}")
            vals = [c.real(x, f"model_info.{key}") for x in v]
            if key == "std" and min(vals) <= 0:
                raise c.bad(f"model_info.std must be positive, got {_short(v)}")
    if "crop" in d and not 0 < c.real(d["crop"], "model_info.crop") <= 1:
        raise c.bad(f"model_info.crop {_short(d['crop'])} is not in (0, 1]")
    if "resize_mode" in d and (not isinstance(d["resize_mode"], str)
                               or d["resize_mode"] not in RESIZE_MODES):
        raise c.bad(f"model_info.resize_mode {_short(d['resize_mode'])} is not one of "
                    f"{', '.join(RESIZE_MODES)}")
    if "num_classes" in d:
        c.int_in(d["num_classes"], 1, MAX_CLASSES, "model_info.num_classes")
    if "label_offset" in d:
        c.int_in(d["label_offset"], 0, MAX_CLASSES, "model_info.label_offset")
    classes = d.get("classes")
    if classes is not None and (not isinstance(classes, (list, tuple))
                                or not all(isinstance(s, str) for s in classes)):
        raise c.bad("model_info.classes must be a list of names")
    if not isinstance(d.get("source", ""), str):
        raise c.bad("model_info.source must be a string")
    c.dict_(d.get("extra", {}), "model_info.extra")
    return ModelInfo.from_dict(d)


def _check_meta(meta: Any, c: _Checker) -> dict[str, Any]:
    if meta is None:
        return {}
    c.dict_(meta, "meta")
    for key, allowed, what in (("weight_bits", WEIGHT_BITS, "32, 16 or 8"),
                               ("activation_bits", actquant.ACT_BITS, "32 or 8"),
                               ("hidden_bits", actquant.HIDDEN_BITS, "32 or 8")):
        v = meta.get(key)
        if key in meta and (type(v) is not int or v not in allowed):
            raise InputError(f"{c.source}: unsupported {key} {_short(v)} in the artifact's "
                             f"metadata ({what})")
    pairs = meta.get("bn_folded") or []
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in pairs):
        raise c.bad("meta.bn_folded must be a list of [layer, batchnorm] name pairs")
    names = [s for p in pairs for s in p]
    if len(set(names)) != len(names):
        raise c.bad("meta.bn_folded names a module twice")
    return meta


def _check_spec(name: Any, spec: Any, c: _Checker) -> dict[str, Any]:
    if not isinstance(name, str) or not name:
        raise c.bad(f"bad layer name {_short(name)}")
    where = f"layers[{_short(name)}]"
    c.dict_(spec, where)
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise c.bad(f"{where} has unknown key {_short(unknown[0])}")
    missing = [k for k in SPEC_KEYS[:5] if k not in spec]
    if missing:
        raise c.bad(f"{where} lacks {missing[0]!r}")
    c_in = c.int_in(spec["c_in"], 1, MAX_CHANNELS, f"{where}.c_in")
    c_out = c.int_in(spec["c_out"], 1, MAX_CHANNELS, f"{where}.c_out")
    if spec["kind"] not in ("conv", "linear") or not isinstance(spec["kind"], str):
        raise c.bad(f"{where}.kind {_short(spec['kind'])} is not 'conv' or 'linear'")
    crit = spec["critical_idx"]
    if not isinstance(crit, (list, tuple)) or len(crit) > c_out:
        raise c.bad(f"{where}.critical_idx must be a list of at most c_out={c_out} indices")
    for i in crit:
        c.int_in(i, 0, c_out - 1, f"{where}.critical_idx entry")
    if len(set(crit)) != len(crit):
        raise c.bad(f"{where}.critical_idx has duplicate indices")
    n_t = c_out - len(crit)
    r = c.int_in(spec["r"], 1 if n_t else 0, 64 * MAX_CHANNELS, f"{where}.r")
    if type(spec.get("channel_scale", False)) is not bool:
        raise c.bad(f"{where}.channel_scale must be true or false")
    geo = {"stride": c.int_in(spec.get("stride", 1), 1, 64, f"{where}.stride"),
           "kernel": c.int_in(spec.get("kernel", 1), 1, MAX_KERNEL, f"{where}.kernel"),
           "padding": c.int_in(spec.get("padding", 0), 0, 64, f"{where}.padding"),
           "dilation": c.int_in(spec.get("dilation", 1), 1, 64, f"{where}.dilation")}
    out = {"c_in": c_in, "c_out": c_out, "kind": spec["kind"], "critical_idx": list(crit),
           "r": r if n_t else 0, "channel_scale": spec.get("channel_scale", False)}
    out.update({k: v for k, v in geo.items() if k in spec or k == "stride"})
    kind = handler_for_record(spec_record(str(name), out))
    if not kind.geometry_ok(spec_record(str(name), out)):
        raise c.bad(f"{where}: a {spec['kind']} layer with c_in {c_in} cannot have stride/"
                    f"kernel/padding/dilation {tuple(geo.values())}")
    return out


def _plain_tensor(t: Any, what: str, c: _Checker) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_sparse or t.is_quantized or t.device.type != "cpu":
        raise c.bad(f"{what} is not a dense CPU tensor")
    if not t.is_contiguous():
        raise c.bad(f"{what} is not contiguous")
    return t


def _read_tensors(obj: dict[str, Any], c: _Checker) -> dict[str, torch.Tensor]:
    """The state dict of a v2 artifact after verifying every checksum (v1: as stored)."""
    if obj["format"] == FORMAT_V1:
        sd = c.dict_(obj.get("state_dict"), "state_dict")
        for k, v in sd.items():
            if not isinstance(k, str):
                raise c.bad(f"state_dict key {_short(k)} is not a string")
            _plain_tensor(v, f"state_dict[{_short(k)}]", c)
        return sd
    recs = c.dict_(obj.get("tensors"), "tensors")
    for k, rec in recs.items():
        if not isinstance(k, str):
            raise c.bad(f"tensor name {_short(k)} is not a string")
        try:
            tensorcodec.check_record(rec)
        except ValueError as exc:
            raise c.bad(f"tensor {_short(k)}: {exc}") from None
        for p in ("data", "scale"):
            if p in rec:
                _plain_tensor(rec[p], f"tensor {_short(k)} {p}", c)
        if rec.get("sha256") != tensorcodec.record_digest(rec):
            raise _corrupt(c, f"checksum mismatch in tensor {_short(k)}")
    if obj.get("sha256") != header_digest(obj):
        raise _corrupt(c, "checksum mismatch in its metadata")
    out = {}
    for k, rec in recs.items():
        try:
            out[k] = tensorcodec.decode(rec)
        except ValueError as exc:
            raise c.bad(f"tensor {_short(k)}: {exc}") from None
    return out


def _corrupt(c: _Checker, why: str) -> InputError:
    return InputError(f"{c.source}: corrupt or modified compressed model ({why}); "
                      "re-create it with `hfbconvert compress`")


def _check_codes(name: str, spec: dict[str, Any], sd: dict[str, torch.Tensor],
                 c: _Checker) -> None:
    """The stored tensors of a hybrid layer have the spec's shapes; codes are ternary."""
    n_c = len(spec["critical_idx"])
    shapes = {"wb_codes": [spec["r"], spec["c_in"]], "wc_codes": [spec["c_out"] - n_c, spec["r"]],
              "w_crit": [n_c, spec["c_in"]], "bias": [spec["c_out"]]}
    for key, shape in shapes.items():
        t = sd.get(f"{name}.{key}")
        if t is None:
            raise c.bad(f"no tensor {name}.{key} for layer {_short(name)}")
        if list(t.shape) != shape:
            raise c.bad(f"{name}.{key} has shape {list(t.shape)}, its layer spec says {shape}")
        if key in CODE_KEYS:
            if t.dtype != torch.int8:
                raise c.bad(f"{name}.{key} has dtype {t.dtype}, expected torch.int8")
            if t.numel() and bool(((t < -1) | (t > 1)).any()):
                raise c.bad(f"{name}.{key} holds ternary codes outside {{-1, 0, 1}}")


def _skeleton(info: ModelInfo, c: _Checker, skeleton: nn.Module | None) -> nn.Module:
    """Build the architecture, after checking its size on the meta device; a custom
    model's comes from ``skeleton`` (its source model, which the caller loaded), copied."""
    from .models.loading import ARCHS, build_model

    if skeleton is not None and info.arch not in ARCHS:
        return copy.deepcopy(skeleton).float().eval()
    if info.arch not in ARCHS:
        cls = info.extra.get("pickled_module", "nn.Module")
        raise InputError(
            f"{c.source}: a compressed custom model ({cls}); its network is rebuilt from the "
            f"source model: pass {{source}} {info.source or 'MODEL'} (with {{trust}} "
            "for a pickled module)", source="source_model", trust="trust_pickle=True")

    try:
        with torch.device("meta"):
            probe = ARCHS[info.arch](**info.config)
        n = sum(t.numel() for t in probe.state_dict().values())
    except Exception as exc:  # any constructor failure is a bad config
        raise c.bad(f"model_info.config {_short(info.config, 120)} does not build "
                    f"({type(exc).__name__})") from None
    if n > MAX_ELEMENTS:
        raise c.bad(f"model_info.config describes {n:,} weights (more than {MAX_ELEMENTS:,})")
    try:
        return build_model(info)
    except InputError as exc:  # its fields stay fields: the CLI renders them as flags
        what, fields = exc.template_fields()
        raise c.bad(what, **fields) from None


def _check_site(model: nn.Module, name: str, spec: dict[str, Any], c: _Checker) -> None:
    """``name`` is, in the skeleton, the layer of the spec's kind and sizes (its kind's
    ``check_site``)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise c.bad(f"layer {_short(name)} is not a module of {c.arch}") from None
    if not handler_for_record(spec_record(name, spec)).check_site(m, spec):
        raise c.bad(f"layer {_short(name)} ({type(m).__name__}) is not a {spec['c_in']}->"
                    f"{spec['c_out']} pointwise {spec['kind']} of {c.arch}")


def _check_pairs(model: nn.Module, pairs: list[Any], c: _Checker) -> None:
    for layer_name, bn_name in pairs:
        try:
            layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        except AttributeError:
            raise c.bad(f"meta.bn_folded names a missing module "
                        f"({_short(layer_name)}, {_short(bn_name)})") from None
        h = handler_for(layer)
        if h is None or not h.folds_bn(layer) or not isinstance(bn, nn.BatchNorm2d):
            raise c.bad(f"meta.bn_folded pair ({_short(layer_name)}, {_short(bn_name)}) is "
                        "not a layer and its BatchNorm")


def check_artifact(obj: Any, source: str = "artifact") -> tuple[
        ModelInfo, dict[str, Any], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Checksums and every piece of metadata of a loaded artifact dict, nothing built:
    ``(info, meta, layer specs, tensors)``. Enough for a report of any model."""
    c = _Checker(str(source))
    if not is_compressed(obj):
        raise InputError(f"{source}: not an hfbconvert compressed model (format {FORMAT})")
    for key in ("model_info", "layers", "state_dict" if obj["format"] == FORMAT_V1
                else "tensors"):
        if key not in obj:
            raise c.bad(f"no {key!r}")
    if obj["format"] == FORMAT and not isinstance(obj.get("sha256"), str):
        raise c.bad("no checksum")
    sd = _read_tensors(obj, c)
    info = _check_model_info(obj["model_info"], c)
    c.arch = info.arch
    meta = _check_meta(obj.get("meta"), c)
    specs = {name: _check_spec(name, spec, c)
             for name, spec in c.dict_(obj["layers"], "layers").items()}
    return info, meta, specs, sd


def build_compressed(obj: dict[str, Any], source: str = "artifact",
                     skeleton: nn.Module | None = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the deploy-form hybrid model from a loaded artifact dict (``/1`` or ``/2``):
    checksums first, then every piece of metadata, then the modules.

    A built-in family is rebuilt from its own definition. A custom ``nn.Module`` needs
    ``skeleton``, the source model it was compressed from (any module with the same
    structure: its weights are all replaced), because the artifact holds no code and is
    never unpickled.
    """
    info, meta, specs, sd = check_artifact(obj, source)
    c = _Checker(str(source))
    c.arch = info.arch
    model = _skeleton(info, c, skeleton)
    for name, spec in specs.items():
        _check_site(model, name, spec, c)
        _check_codes(name, spec, sd, c)  # sizes bounded by the file before allocating
    for name, spec in specs.items():
        h = hybrid_from_spec(spec)
        h.freeze()
        set_submodule(model, name, h)
        for key in ("critical_idx", "tolerant_idx", "perm"):
            t = sd.get(f"{name}.{key}")
            if t is not None and not torch.equal(t, getattr(h, key)):
                raise c.bad(f"{name}.{key} does not match its layer spec")
    pairs = [tuple(p) for p in meta.get("bn_folded") or []]
    _check_pairs(model, pairs, c)
    prepare_structure(model, pairs)
    if meta.get("activation_bits", 32) == 8:
        # artifacts from before --hidden-bits always had uint8 hidden units
        actquant.attach(model, meta.get("hidden_bits", 8))
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and (sd[k].shape != expected[k].shape
                                                 or sd[k].dtype != expected[k].dtype)]
    if missing or extra or wrong:
        what = ", ".join(f"{label} {_short(ks[0])}" + (f" and {len(ks) - 1} more" if
                                                         len(ks) > 1 else "")
                         for label, ks in (("missing", missing), ("unexpected", extra),
                                           ("wrong shape or dtype", wrong)) if ks)
        raise InputError(f"{source}: compressed artifact does not match its layers ({what})")
    model.load_state_dict(sd, strict=True)
    mark_weight_bits(model, meta.get("weight_bits", 32))
    model.eval()
    return model, info


def read_compressed(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact dict of ``path`` (weights only, never pickled code), or one line."""
    try:
        obj = load_torch(path)
    except PickleRefused:
        # our artifacts never hold pickled code, and `report` has no --trust-pickle
        raise InputError(f"{path}: not an hfbconvert compressed model (it contains pickled "
                         "Python objects)") from None
    if not is_compressed(obj):
        raise InputError(f"{path}: not an hfbconvert compressed model (format {FORMAT})")
    return obj


def load_compressed(path: str | os.PathLike, skeleton: nn.Module | None = None
                    ) -> tuple[nn.Module, ModelInfo, dict[str, Any]]:
    """Read (weights only, never pickled code), verify and rebuild an artifact
    (``skeleton``: see :func:`build_compressed`)."""
    obj = read_compressed(path)
    model, info = build_compressed(obj, str(path), skeleton)
    return model, info, obj.get("meta") or {}


def load_compressed_meta(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, Any]]:
    """``(info, meta)`` of a verified artifact without building its network: what a
    report needs, for any model, custom ones included."""
    info, meta, _, _ = check_artifact(read_compressed(path), str(path))
    return info, meta
