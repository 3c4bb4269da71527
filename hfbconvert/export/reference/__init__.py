"""The ``hfb`` op contract as numpy reference ops, one op per file (the shape of onnx's
``onnx/reference/ops``). docs/onnx_ops.md says in words what these say in code; the
exported FunctionProto bodies are tested against them, and they against HybridPointwise.

    from onnx.reference import ReferenceEvaluator
    from hfbconvert.export.reference import HFB_OPS
    ReferenceEvaluator("model.onnx", new_ops=HFB_OPS).run(None, {"input": x})

With ``new_ops`` the evaluator runs these instead of the function bodies in the file.
"""

from __future__ import annotations

from .op_strassen_conv import StrassenConv
from .op_strassen_pointwise import StrassenPointwise
from .op_unpack_ternary import UnpackTernary2bit, UnpackTernaryBase3, unpack

HFB_OPS = [StrassenPointwise, UnpackTernary2bit, UnpackTernaryBase3, StrassenConv]

__all__ = ["HFB_OPS", "StrassenConv", "StrassenPointwise", "UnpackTernary2bit",
           "UnpackTernaryBase3", "unpack"]
