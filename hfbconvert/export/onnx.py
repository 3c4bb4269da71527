"""ONNX export of plain and hybrid models (the entry points; the hfb function definitions
are in ``functions.py``, the torch bridge in ``bridge.py``, graph passes in ``passes.py``).

Every ``HybridPointwise`` becomes: a standard Conv/Gemm for the FP32 critical bank, ONE
``hfb::StrassenPointwise`` node for the ternary bank (weights stored packed, uint8), then
Concat + Gather(perm) to restore the channel order and Add bias. The model carries
model-local FunctionProtos built from standard ops only, so a runtime without a native
kernel (onnxruntime CPU, ``onnx.reference``) still runs it; the unpack subgraph depends
only on initializers, so constant folding turns it into a float weight once, at session
creation. Semantics: ``docs/onnx_ops.md``; keep both in step.

Full-precision weights stored at 16 or 8 bits (``compress --weight-bits``) are written as
float16 initializers + Cast, or int8 initializers + float32 per-channel scales +
DequantizeLinear, feeding the unchanged Conv/Gemm/MatMul (:func:`store_weights`).

Graph capture uses the TorchScript exporter (``dynamo=False``) because it honours
``autograd.Function.symbolic``; it stops at opset 20, so higher opsets are reached with
``onnx.version_converter`` before the hfb functions are attached.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import ModelProto, TensorProto
from torch import nn

from ..errors import CheckFailed, ConfigError, InputError
from ..fileio import atomic_path, atomic_write_bytes, check_output_path
from ..weightquant import check_bits, model_weight_bits
from .bridge import (
    BATCH_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    SUPPORTED_OPSETS,
    TORCHSCRIPT_MAX_OPSET,
    _export_ready,
    _torch_export,
    _unpack_float,
)
from .functions import (
    CONV_OP_NAME,
    DOMAIN,
    DOMAIN_VERSION,
    OP_NAME,
    PACKINGS,
    hfb_functions,
    strassen_function,
    unpack_function,
)
from .passes import _attach_functions, _convert_opset, store_weights

# the names this module has always offered (split along its jobs: functions, bridge, passes)
__all__ = ["BATCH_DIM", "CONV_OP_NAME", "DOMAIN", "DOMAIN_VERSION", "INPUT_NAME", "OP_NAME",
           "OUTPUT_NAME", "PACKINGS", "SUPPORTED_OPSETS", "TORCHSCRIPT_MAX_OPSET",
           "_unpack_float", "build_onnx", "export_onnx", "hfb_functions", "onnx_metadata",
           "onnx_stats", "read_metadata", "set_metadata", "store_weights",
           "strassen_function", "unpack_function"]


def _validate_args(opset: int, pack: str, resolution: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        lo, hi = SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]
        raise ConfigError("opset", opset, f"not supported; choose {lo}..{hi}")
    if pack not in PACKINGS:
        raise ConfigError("pack", pack, f"not supported; choose from {', '.join(PACKINGS)}")
    if int(resolution) < 1:
        raise InputError(f"resolution must be a positive integer, got {resolution}")


# ---------------------------------------------------------------------------- metadata

META_PREFIX = "hfbconvert."


def onnx_metadata(info: Any, source: str | None = None) -> dict[str, str]:
    """``metadata_props`` for a model described by ``info`` (a ModelInfo): hfbconvert
    version, preprocessing, label offset, class count and names, and the sha256 of
    ``source`` (the file named at export) when it is a file. Values are strings; the
    structured ones JSON. Read back with :func:`read_metadata`."""
    import hashlib
    import json

    from hfbconvert.calib.presets import preset_for, preset_name

    from .. import __version__

    prep = preset_for(info)
    pre = dict(prep.to_dict(), preset=preset_name(prep),
               interpolation="bilinear" + (", antialiased" if prep.resize_mode ==
                                           "resize_then_crop" else ""))
    meta = {"version": __version__, "preprocess": json.dumps(pre, sort_keys=True),
            "label_offset": str(int(info.label_offset)),
            "num_classes": str(int(info.num_classes))}
    if info.classes:
        meta["classes"] = json.dumps([str(c) for c in info.classes])
    if source and Path(source).is_file():
        h = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        # the name only: the same file exported from another folder gives the same bytes
        meta.update(source_name=Path(source).name, source_sha256=h.hexdigest())
    return {META_PREFIX + k: v for k, v in meta.items()}


def set_metadata(mp: ModelProto, meta: dict[str, str]) -> None:
    """Write ``meta`` into ``mp.metadata_props`` (replacing keys already there), sorted."""
    props = {p.key: p.value for p in mp.metadata_props}
    props.update(meta)
    del mp.metadata_props[:]
    for k in sorted(props):
        mp.metadata_props.add(key=k, value=props[k])


def read_metadata(mp: ModelProto) -> dict[str, str]:
    """The hfbconvert ``metadata_props`` of ``mp``, prefix stripped (empty when none)."""
    n = len(META_PREFIX)
    return {p.key[n:]: p.value for p in mp.metadata_props if p.key.startswith(META_PREFIX)}


def build_onnx(model: nn.Module, resolution: int, opset: int = 17, pack: str = "2bit",
               dynamic_batch: bool = True, weight_bits: int | None = None,
               qdq: bool = False, metadata: dict[str, str] | None = None) -> ModelProto:
    """The checked in-memory ONNX model (no file I/O); see :func:`export_onnx`.
    ``weight_bits`` None: the model's own storage bits (32 unless it was rounded by
    ``compress --weight-bits``). ``metadata``: ``metadata_props`` to write
    (:func:`onnx_metadata`)."""
    _validate_args(opset, pack, resolution)
    bits = model_weight_bits(model) if weight_bits is None else check_bits(
        weight_bits, "weight bits")
    ready, n_tol, scaled, hidden_quant = _export_ready(model, pack, qdq)
    try:
        mp = _torch_export(ready, int(resolution), min(opset, TORCHSCRIPT_MAX_OPSET),
                           dynamic_batch, custom=n_tol > 0, fold_batchnorm=bits == 32)
        if opset > TORCHSCRIPT_MAX_OPSET:
            mp = _convert_opset(mp, opset)
    except Exception as exc:  # torch raises many types for unexportable models
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model cannot be exported to ONNX opset {opset}: {msg[:200]}") from None
    store_weights(mp, bits)
    if n_tol:
        _attach_functions(mp, pack, opset, scaled, hidden_quant)
    try:
        onnx.checker.check_model(mp, full_check=True)
    except Exception as exc:
        raise CheckFailed(f"exported ONNX model fails the ONNX checker: {exc}") from None
    if metadata:
        set_metadata(mp, metadata)
    return mp


def onnx_stats(mp: ModelProto, data: bytes) -> dict[str, Any]:
    """Sizes and node counts of an exported model, for reports."""
    ops = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in mp.graph.node
    )
    packed = sum(
        len(t.raw_data) for t in mp.graph.initializer if t.data_type == TensorProto.UINT8
    )
    stored = {TensorProto.FLOAT16: 16, TensorProto.INT8: 8}
    bits = next((stored[t.data_type] for t in mp.graph.initializer if t.data_type in stored),
                32)
    total_init = sum(onnx.numpy_helper.to_array(t).nbytes for t in mp.graph.initializer)
    return {
        "bytes": len(data),
        "opset": next(o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": int(sum(ops.values())),
        "node_counts": dict(sorted(ops.items())),
        "custom_ops": int(sum(c for k, c in ops.items() if k.startswith(f"{DOMAIN}::"))),
        "functions": [f"{f.domain}::{f.name}" for f in mp.functions],
        "initializer_bytes": int(total_init),
        "packed_bytes": int(packed),
        "weight_bits": bits,
    }


def export_onnx(model: nn.Module, path: str | Path, resolution: int, opset: int = 17,
                pack: str = "2bit", dynamic_batch: bool = True,
                force: bool = False, weight_bits: int | None = None,
                qdq: bool = False, verify_images: torch.Tensor | None = None,
                metadata: dict[str, str] | None = None,
                device: str | torch.device | None = None) -> dict[str, Any]:
    """Export ``model`` (plain or hybrid; hybrid layers are exported in deploy form) to
    ``path`` atomically. Refuses to overwrite unless ``force``; returns :func:`onnx_stats`
    plus ``packing`` and ``path``. ``weight_bits``, ``metadata``: see :func:`build_onnx`.

    With ``verify_images`` (normalized NCHW) the file is compared with PyTorch in
    onnxruntime *before* it takes ``path``: only a verified file ever lands there. A file
    that fails is kept for inspection as ``NAME.unverified.onnx`` (``stats["verify"]``
    says why, ``stats["path"]`` where it went), so a rerun needs no --force.
    """
    from ..verify import verify_onnx

    dest = check_output_path(path, force)
    _validate_args(opset, pack, resolution)
    mp = build_onnx(model, resolution, opset, pack, dynamic_batch, weight_bits, qdq,
                    metadata)
    data = mp.SerializeToString()
    stats = onnx_stats(mp, data)
    stats.update(packing=pack if stats["custom_ops"] else None, path=str(dest),
                 sha256=hashlib.sha256(data).hexdigest())  # report.json pins the file
    failed = None
    try:
        with atomic_path(dest, overwrite=force) as tmp:
            tmp.write_bytes(data)
            if verify_images is not None:
                vr = verify_onnx(tmp, model, verify_images, device=device)
                vr.onnx_path = str(dest)
                stats["verify"] = vr.to_dict()
                if not vr.passed:
                    raise _Unverified
    except _Unverified:
        failed = dest.with_name(dest.name.removesuffix(".onnx") + ".unverified.onnx")
        if os.path.lexists(failed) and not force:
            stats["path"] = None
        else:
            check_output_path(failed, True)
            atomic_write_bytes(failed, data)
            stats["path"] = str(failed)
            stats["verify"]["onnx_path"] = str(failed)
    return stats


class _Unverified(Exception):
    """Internal: verification failed, so the temporary file must not take the name."""
