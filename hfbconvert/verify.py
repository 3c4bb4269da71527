"""Check an exported ONNX file against the PyTorch model it came from.

Two independent runtimes are compared with PyTorch: onnxruntime (CPU EP, no custom-op
library, so the ``hfb`` function bodies run) on every image, and the pure-numpy
``onnx.reference`` evaluator on a few images, which checks the file's semantics rather
than one runtime's kernels. Pass: max|Δlogit| ≤ rtol_rel · max|logit| and identical top-1.

The tolerance never goes below the model's own float32 rounding: :func:`float_noise` runs
PyTorch in float64 on a few images and :data:`FLOAT_NOISE_FACTOR` times the float32 −
float64 gap is the floor. Logits that come out of a cancellation carry the rounding of the
large operands, not of the small result (a random-weight MobileNetV1 at budget 0.536:
a bias-corrected classifier adds a bias of −141.6 to pre-bias outputs of +141.7, so the
logits are about 0.06 and one float32 ulp of 141, 1.5e-5, is 2.4e-4 of them; PyTorch's own
float32 is 1.3e-5 from float64 there, and both runtimes were 1.5e-5 from PyTorch).

Models with int8 activations (``compress --activation-bits 8``) get a stated looser check
that bounds how *often* an image is off, not the single worst image: at most
:data:`QUANTIZED_TOP1_MISMATCH` of the images may have max|Δlogit| above
:data:`QUANTIZED_RTOL` · max|logit|, and at most that share a different top-1 (at least one
image of each is allowed). onnxruntime's graph optimizations reorder float arithmetic (and,
for ``--qdq`` files, requantize in integer kernels), so a value near a rounding boundary
lands one step away now and then and the step travels through the network; the largest Δ
over N images grows with N, so a max-only bound fails deep int8 models (MobileNetV2: one
image of 16 at 5.4%) for what is a rare, expected event. onnx.reference, which runs the
file as written, matches PyTorch to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckFailed, InputError
from .handlers import hybrid_modules

WORST_ROWS = 10  # rows kept for the mismatch table
FLOAT_RTOL = 1e-4
QUANTIZED_RTOL = 0.05
QUANTIZED_TOP1_MISMATCH = 0.05
# the tolerance floor: this many times PyTorch's own float32 − float64 gap (two float32
# evaluations in other summation orders are each about one gap from the exact value)
FLOAT_NOISE_FACTOR = 8.0
FLOAT_NOISE_IMAGES = 4  # images the float64 run sees (rounding is a property of the model)


@dataclass
class MismatchRow:
    index: int
    max_abs_diff: float
    torch_top1: int
    onnx_top1: int


@dataclass
class Comparison:
    """One runtime against PyTorch on ``n_images`` images."""

    runtime: str
    n_images: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    top1_agreement: float
    top1_mismatches: int
    worst: list[MismatchRow] = field(default_factory=list)
    max_mismatch_frac: float = 0.0
    n_over_tolerance: int = 0  # images whose max|Δlogit| exceeds ``tolerance``
    noise_floor: float = 0.0  # lower bound of ``tolerance``: the model's float32 rounding

    @property
    def allowed(self) -> int:
        """Images that may be over the tolerance, and images that may flip top-1."""
        if self.max_mismatch_frac <= 0:
            return 0
        return max(1, int(self.max_mismatch_frac * self.n_images))

    @property
    def passed(self) -> bool:
        return (self.n_over_tolerance <= self.allowed
                and self.top1_mismatches <= self.allowed)


@dataclass
class VerifyResult:
    onnx_path: str
    rtol_rel: float
    ort: Comparison
    reference: Comparison | None  # None when reference_batch == 0

    @property
    def passed(self) -> bool:
        return self.ort.passed and (self.reference is None or self.reference.passed)

    @property
    def worst(self) -> list[MismatchRow]:
        return self.ort.worst

    def summary(self) -> str:
        parts = [_describe(self.ort)] + ([_describe(self.reference)] if self.reference else [])
        return f"{'PASS' if self.passed else 'FAIL'}: " + "; ".join(parts)

    def ensure_passed(self) -> None:
        """Raise :class:`CheckFailed` (exit 1) when the file disagrees with PyTorch."""
        if not self.passed:
            raise CheckFailed(
                f"{self.onnx_path}: ONNX output differs from PyTorch ({self.summary()})"
            )

    @property
    def max_rel_diff(self) -> float:
        """onnxruntime's max|Δlogit| / max|logit| (the quantity bounded by ``rtol_rel``)."""
        m = self.ort.max_abs_logit
        return self.ort.max_abs_diff / m if m > 0 else float(self.ort.max_abs_diff > 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the top-level keys summarize onnxruntime, the sub-dicts hold detail."""
        d = asdict(self)
        d.update(passed=self.passed, n_images=self.ort.n_images,
                 max_abs_diff=self.ort.max_abs_diff, max_rel_diff=self.max_rel_diff,
                 agreement=self.ort.top1_agreement, worst=d["ort"]["worst"])
        d["ort"].update(passed=self.ort.passed, allowed=self.ort.allowed)
        if self.reference is not None:
            d["reference"].update(passed=self.reference.passed, allowed=self.reference.allowed)
        return d


def _describe(c: Comparison) -> str:
    over = (f", {c.n_over_tolerance} over tol (allowed {c.allowed})"
            if c.max_mismatch_frac > 0 else "")
    return (
        f"{c.runtime}: max|Δ|={c.max_abs_diff:.3g} (tol {c.tolerance:.3g}{over}), "
        f"top-1 {c.top1_agreement:.2%} of {c.n_images}"
    )


def compare_logits(runtime: str, ref: np.ndarray, got: np.ndarray, rtol_rel: float,
                   max_mismatch_frac: float = 0.0, noise_floor: float = 0.0) -> Comparison:
    """Tolerance is relative to the largest PyTorch logit of the compared images, and at
    least ``noise_floor`` (absolute: the model's float32 rounding, :func:`float_noise`)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64)).reshape(len(ref), -1)
    row_diff = diff.max(axis=1) if diff.size else np.zeros(len(ref))
    t1, o1 = ref.reshape(len(ref), -1).argmax(1), got.reshape(len(got), -1).argmax(1)
    mism = t1 != o1
    max_logit = float(np.abs(ref).max()) if ref.size else 0.0
    tol = max(rtol_rel * max_logit, noise_floor) if noise_floor > 0 else rtol_rel * max_logit
    order = np.lexsort((-row_diff, ~mism))[:WORST_ROWS]  # mismatches first, then largest Δ
    worst = [MismatchRow(int(i), float(row_diff[i]), int(t1[i]), int(o1[i])) for i in order]
    return Comparison(
        runtime=runtime, n_images=len(ref), max_abs_diff=float(row_diff.max(initial=0.0)),
        max_abs_logit=max_logit, tolerance=tol,
        top1_agreement=float(1.0 - mism.mean()) if len(ref) else 1.0,
        top1_mismatches=int(mism.sum()), worst=worst, max_mismatch_frac=max_mismatch_frac,
        n_over_tolerance=int((row_diff > tol).sum()), noise_floor=noise_floor,
    )


def _deploy_copy(model: nn.Module) -> nn.Module:
    """The deploy form the export wrote (freezing mutates, so work on a copy if needed)."""
    if any(not h.frozen for _, h in hybrid_modules(model)):
        model = copy.deepcopy(model)
        for _, h in hybrid_modules(model):
            h.freeze()
    return model


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int,
                 device: str | torch.device | None = None) -> np.ndarray:
    """PyTorch's side of a verification, on ``device`` (default: where the model is; the
    deploy copy moves, never the caller's model)."""
    model = _deploy_copy(model)
    if device is not None and torch.device(device) != next(
            (p.device for p in model.parameters()), torch.device("cpu")):
        model = copy.deepcopy(model).to(device)
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    try:
        outs = [model(images[i : i + batch_size].to(dev)).float().cpu()
                for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs).numpy()


@torch.no_grad()
def float_noise(model: nn.Module, images: torch.Tensor,
                device: str | torch.device | None = None) -> float:
    """max|logits in float32 − logits in float64| of PyTorch itself on the first
    :data:`FLOAT_NOISE_IMAGES` images: how closely float32 can reproduce this model at
    all. 0.0 (no floor) when a float64 copy does not run (a module with a fixed dtype)."""
    x = images[:FLOAT_NOISE_IMAGES]
    y32 = torch_logits(model, x, len(x), device)
    try:
        m64 = copy.deepcopy(_deploy_copy(model)).double().eval()
        if device is not None:
            m64 = m64.to(device)
        dev = next((p.device for p in m64.parameters()), torch.device("cpu"))
        y64 = m64(x.double().to(dev)).cpu().numpy()
    except (RuntimeError, TypeError):
        return 0.0
    if y64.shape != y32.shape or not np.isfinite(y64).all():
        return 0.0
    return float(np.abs(y32.astype(np.float64) - y64).max(initial=0.0))


def _run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int,
                 fixed_batch: int | None) -> np.ndarray:
    """Run in chunks; a model exported with a fixed batch gets zero-padded chunks."""
    step = fixed_batch or batch_size
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if fixed_batch and n < fixed_batch:
            pad = np.zeros((fixed_batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outs.append(np.asarray(run(chunk))[:n])
    return np.concatenate(outs)


def _fixed_batch(dim: Any) -> int | None:
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def ort_session(path: str | Path, threads: int = 0) -> Any:
    """onnxruntime CPU session with full graph optimization (folds the unpack subgraphs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: onnxruntime cannot load it ({msg[:200]})") from None


def ort_logits(path: str | Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    sess = ort_session(path)
    inp = sess.get_inputs()[0]
    return _run_batched(lambda b: sess.run(None, {inp.name: b})[0], x, batch_size,
                        _fixed_batch(inp.shape[0]))


def _reference_new_ops(mp: Any) -> list:
    """``onnx.reference`` implements DequantizeLinear from opset 19 only; for int8 weights
    (``--weight-bits 8``) in an opset 13-18 file, reuse the version-19 kernel (same
    semantics for int8/uint8 input and float32 scale); int8 activations put it in the hfb
    functions too."""
    opset = next((o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = [*mp.graph.node, *(n for f in mp.functions for n in f.node)]
    if opset >= 19 or not any(n.op_type == "DequantizeLinear" for n in nodes):
        return []
    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_19

    def _run(self, x, x_scale, x_zero_point=None, axis=1, **_unused):  # type: ignore[no-untyped-def]
        return DequantizeLinear_19._run(self, x, x_scale, x_zero_point, axis=axis)

    return [type("DequantizeLinear", (DequantizeLinear_19,), {"op_domain": "", "_run": _run})]


def reference_logits(path: str | Path, x: np.ndarray) -> np.ndarray:
    import onnx
    from onnx.reference import ReferenceEvaluator

    mp = onnx.load(str(path))
    new_ops = _reference_new_ops(mp) or None

    class _Evaluator(ReferenceEvaluator):
        """Function bodies get their own evaluator of this class, which would otherwise
        not see ``new_ops``."""

        def __init__(self, proto: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("new_ops", new_ops)
            super().__init__(proto, *args, **kwargs)

    ev = _Evaluator(mp)
    inp = mp.graph.input[0]
    dim = inp.type.tensor_type.shape.dim[0]
    fixed = _fixed_batch(dim.dim_value if dim.HasField("dim_value") else None)
    return _run_batched(lambda b: ev.run(None, {inp.name: b})[0], x, len(x), fixed)


def verify_onnx(onnx_path: str | Path, model: nn.Module, images: torch.Tensor,
                batch_size: int = 32, rtol_rel: float | None = None,
                reference_batch: int = 2,
                device: str | torch.device | None = None) -> VerifyResult:
    """Compare onnxruntime (all images) and onnx.reference (first ``reference_batch``
    images) with the PyTorch deploy-form ``model`` on normalized NCHW ``images``.
    ``rtol_rel`` None: :data:`FLOAT_RTOL`, or :data:`QUANTIZED_RTOL` for int8 activations."""
    from .actquant import model_act_bits

    quantized = model_act_bits(model) == 8
    if rtol_rel is None:
        rtol_rel = QUANTIZED_RTOL if quantized else FLOAT_RTOL
    frac = QUANTIZED_TOP1_MISMATCH if quantized else 0.0
    path = Path(onnx_path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        raise InputError("verification images must be a non-empty float N x C x H x W tensor")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    images = images.detach().float().cpu()
    ref = torch_logits(model, images, batch_size, device)
    # int8 activations: rounding steps dwarf float noise (the stated looser check instead)
    floor = 0.0 if quantized else FLOAT_NOISE_FACTOR * float_noise(model, images, device)
    x = images.numpy()
    ort_cmp = compare_logits("onnxruntime", ref, ort_logits(path, x, batch_size), rtol_rel,
                             frac, floor)
    ref_cmp = None
    k = min(int(reference_batch), len(x))
    if k > 0:
        ref_cmp = compare_logits("onnx.reference", ref[:k], reference_logits(path, x[:k]),
                                 rtol_rel, frac, floor)
    return VerifyResult(str(path), rtol_rel, ort_cmp, ref_cmp)
