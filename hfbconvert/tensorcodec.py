"""Lossless storage encodings of the artifact's tensors, and their checksums.

A tensor is stored as a *record* (plain data plus one or two payload tensors):

    enc     "raw" | "ternary2" | "float16" | "int8" | "int"
    dtype   dtype of the decoded tensor ("float32", "int64", ...)
    shape   its shape (list of ints)
    data    payload: the tensor itself (raw), ternary.pack_2bit codes (ternary2, uint8),
            a float16 copy (float16), per-channel int8 codes (int8), the values in the
            narrowest integer type that holds them (int)
    scale   int8 only: float32 per-channel scales along dim 0 (``weightquant.int8_codes``)
    sha256  hex digest of everything above (:func:`record_digest`)

:func:`encode` tries the compact encodings it is allowed and keeps the first whose
decoding is bit-identical to the input (else ``raw``), so decoding always gives back the
exact tensor. :func:`decode` checks the record's structure and sizes before it allocates
anything; it raises ``ValueError`` with a short reason.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .ternary import pack_2bit, unpack_2bit
from .weightquant import int8_codes

ENCODINGS = ("raw", "ternary2", "float16", "int8", "int")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
_PAYLOADS = ("data", "scale")
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (no copy)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def record_digest(rec: dict[str, Any]) -> str:
    """sha256 of a record's encoding, dtype, shape and payload bytes (not its sha256)."""
    h = hashlib.sha256(f"{rec['enc']}|{rec['dtype']}|{list(rec['shape'])}".encode())
    for key in _PAYLOADS:
        p = rec.get(key)
        if p is not None:
            h.update(f"|{key}:{_NAMES.get(p.dtype, p.dtype)}:{list(p.shape)}|".encode())
            h.update(tensor_bytes(p))
    return h.hexdigest()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(tensor_bytes(a)) == bytes(
        tensor_bytes(b))


def _narrow_int(t: torch.Tensor) -> torch.Tensor | None:
    if t.dtype not in _INTS or t.numel() == 0:
        return None
    lo, hi = int(t.min()), int(t.max())
    for d in _INTS:
        if d.itemsize < t.dtype.itemsize and torch.iinfo(d).min <= lo and hi <= torch.iinfo(
                d).max:
            return t.to(d)
    return None


def _candidates(t: torch.Tensor, ternary: bool, int8: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if ternary and t.dtype == torch.int8:
        try:
            out.append({"enc": "ternary2", "data": pack_2bit(t)})
        except ValueError:
            pass
    if t.dtype == torch.float32:
        if int8 and t.dim() >= 2 and t.shape[0] > 0:
            try:
                with np.errstate(all="ignore"):  # inf/nan weights: not int8 values
                    codes, scale = int8_codes(t.numpy(), axis=0)
                out.append({"enc": "int8", "data": torch.from_numpy(codes),
                            "scale": torch.from_numpy(scale)})
            except ValueError:
                pass
        out.append({"enc": "float16", "data": t.half()})
    narrow = _narrow_int(t)
    if narrow is not None:
        out.append({"enc": "int", "data": narrow})
    return out


def encode(t: torch.Tensor, ternary: bool = False, int8: bool = False) -> dict[str, Any]:
    """Record of ``t``: 2-bit codes if ``ternary`` (int8 values in {-1,0,1}), per-channel
    int8 if ``int8`` (float32 weights holding int8 values), float16 for float32 values it
    holds exactly, narrow integers; otherwise raw. Always lossless (checked bit for bit)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _NAMES:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    head = {"dtype": _NAMES[t.dtype], "shape": list(t.shape)}
    rec: dict[str, Any] | None = None
    for cand in _candidates(t, ternary, int8):
        cand = {**cand, **head}
        if _bits_equal(_decode_checked(cand), t):
            rec = cand
            break
    if rec is None:
        rec = {"enc": "raw", **head, "data": t.clone()}
    rec = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
    rec["sha256"] = record_digest(rec)
    return rec


# ---------------------------------------------------------------------------- decoding
def _payload(rec: dict[str, Any], key: str, dtype: torch.dtype | tuple[torch.dtype, ...],
             shape: list[int] | None) -> torch.Tensor:
    p = rec.get(key)
    if not isinstance(p, torch.Tensor) or type(p) is not torch.Tensor:
        raise ValueError(f"{key} is not a tensor")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if p.dtype not in dtypes:
        raise ValueError(f"{key} has dtype {p.dtype}")
    if p.device.type != "cpu" or not p.is_contiguous() or p.is_quantized or p.is_sparse:
        raise ValueError(f"{key} is not a plain contiguous tensor")
    if shape is not None and list(p.shape) != shape:
        raise ValueError(f"{key} has shape {list(p.shape)}, expected {shape}")
    return p


def check_record(rec: Any) -> tuple[str, torch.dtype, list[int]]:
    """``(enc, dtype, shape)`` of a well-formed record header; ``ValueError`` otherwise."""
    if not isinstance(rec, dict):
        raise ValueError("not a tensor record")
    extra = set(rec) - {"enc", "dtype", "shape", "sha256", *_PAYLOADS}
    if extra:
        raise ValueError(f"unknown record keys {sorted(map(str, extra))[:3]}")
    enc, dtype, shape = rec.get("enc"), rec.get("dtype"), rec.get("shape")
    if enc not in ENCODINGS or not isinstance(enc, str):
        raise ValueError(f"unknown encoding {str(enc)[:20]!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, (list, tuple)) or len(shape) > 8 or not all(
            type(s) is int and 0 <= s < 2**40 for s in shape):
        raise ValueError("shape is not a list of non-negative integers")
    if enc != "int8" and "scale" in rec:
        raise ValueError("unexpected scale")
    return enc, DTYPES[dtype], list(shape)


def decode(rec: Any) -> torch.Tensor:
    """The tensor a record holds (a new tensor; checks structure and sizes first)."""
    return _decode_checked(rec)


def _decode_checked(rec: Any) -> torch.Tensor:
    enc, dtype, shape = check_record(rec)
    n = 1
    for s in shape:
        n *= s
    if enc == "raw":
        return _payload(rec, "data", dtype, shape).clone()
    if enc == "float16":
        if dtype != torch.float32:
            raise ValueError("float16 encoding of a non-float32 tensor")
        return _payload(rec, "data", torch.float16, shape).float()
    if enc == "int8":
        if dtype != torch.float32 or len(shape) < 2:
            raise ValueError("int8 encoding needs a float32 tensor of 2+ dimensions")
        codes = _payload(rec, "data", torch.int8, shape)
        scale = _payload(rec, "scale", torch.float32, shape[:1])
        return codes.float() * scale.reshape((-1,) + (1,) * (len(shape) - 1))
    if enc == "int":
        if dtype not in _INTS:
            raise ValueError("int encoding of a non-integer tensor")
        return _payload(rec, "data", _INTS, shape).to(dtype)
    # ternary2
    if dtype != torch.int8:
        raise ValueError("ternary2 encoding of a non-int8 tensor")
    packed = _payload(rec, "data", torch.uint8, [(n + 3) // 4])
    if bool((((packed.reshape(-1, 1) >> _SHIFTS) & 3) == 3).any()):
        raise ValueError("ternary codes outside {-1, 0, 1}")
    return unpack_2bit(packed, n).reshape(shape)
