"""``hfb::UnpackTernary2bit`` / ``hfb::UnpackTernaryBase3``: uint8 bytes -> float
[rows, cols] in {-1, 0, 1}, row-major, little-end first within a byte."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

# packing name -> (base, codes per byte); code c stands for the value c - 1
LAYOUTS = {"2bit": (4, 4), "base3": (3, 5)}


def unpack(packed: np.ndarray, rows: int, cols: int, packing: str) -> np.ndarray:
    """The contract: code_i of byte b is (b // base**i) % base, i = 0..per_byte-1, in
    element order; trailing padding codes are dropped; value = code - 1. A 2-bit code 3
    (value 2) is not a ternary value and is refused."""
    base, per_byte = LAYOUTS[packing]
    b = np.asarray(packed, dtype=np.int64).reshape(-1)
    codes = (b[:, None] // base ** np.arange(per_byte)) % base
    flat = codes.reshape(-1)
    if flat.size < rows * cols:
        raise ValueError(f"{b.size} bytes hold {flat.size} codes, need {rows * cols}")
    flat = flat[: rows * cols]
    if (flat > 2).any():
        raise ValueError("packed codes outside {0, 1, 2} (values {-1, 0, 1})")
    return (flat.astype(np.float32) - 1.0).reshape(rows, cols)


class UnpackTernary2bit(OpRun):
    op_domain = "hfb"

    def _run(self, packed, rows=None, cols=None):  # type: ignore[override]
        return (unpack(packed, int(rows), int(cols), "2bit"),)


class UnpackTernaryBase3(OpRun):
    op_domain = "hfb"

    def _run(self, packed, rows=None, cols=None):  # type: ignore[override]
        return (unpack(packed, int(rows), int(cols), "base3"),)
