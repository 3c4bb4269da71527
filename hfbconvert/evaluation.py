"""Accuracy and agreement of a model on preprocessed images.

Agreement (same top-1 as a reference model) needs no labels, so it works on any
calibration folder; it is the check that a converted model still behaves like the
original one, while top-1/top-5 need labelled data.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfbconvert.calib.readers import CalibData

from .errors import InputError
from .metrics import (
    RESAMPLES,
    bootstrap_mean_interval,
    bootstrap_means,
    discordant,
    encode_bits,
    encode_classes,
    encode_floats,
    mcnemar_exact,
    percentile_interval,
    verdict,
)
from .models.info import ModelInfo


@dataclass
class PerImage:
    """Per-image outcomes of one evaluation pass, in the data's file order: what every
    interval and paired comparison is computed from. ``None`` where not computable
    (no labels; no reference)."""

    pred: np.ndarray  # top-1 logit index per image (int64)
    correct: np.ndarray | None = None  # top-1 right (bool)
    correct5: np.ndarray | None = None  # label among the top-5 (bool)
    ref_pred: np.ndarray | None = None  # the reference's top-1 logit index
    ref_correct: np.ndarray | None = None  # the reference's top-1 right
    kl: np.ndarray | None = None  # KL(reference || model) of the softmaxes, nats

    @property
    def n(self) -> int:
        return int(self.pred.shape[0])

    @property
    def agree(self) -> np.ndarray | None:
        return None if self.ref_pred is None else self.pred == self.ref_pred


def evaluate_per_image(
    model: nn.Module,
    data: CalibData,
    label_offset: int = 0,
    reference: nn.Module | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> PerImage:
    """One pass of ``model`` (and ``reference``, on the same batches) over ``data``.
    Logit index of label ``y`` is ``y + label_offset``. ``device``: where PyTorch models
    run (copies; the caller's modules stay where they are); an :class:`OnnxClassifier`
    always runs in onnxruntime on the CPU."""
    if len(data) == 0:
        raise ValueError("evaluate: no images")
    dev = torch.device(device)
    if dev.type != "cpu":
        model, reference = (_on(m, dev) for m in (model, reference))
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    pred, c1, c5, rpred, rc1, kl = [], [], [], [], [], []
    try:
        with torch.inference_mode():
            for x, y in data.batches(batch_size):
                x = x.to(dev)
                logits = model(x).float().cpu()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                pred.append(top[:, 0])
                if y is not None:
                    target = (y + label_offset).unsqueeze(1)
                    c1.append(top[:, 0] == target[:, 0])
                    c5.append((top == target).any(dim=1))
                if reference is not None:
                    ref = reference(x).float().cpu()
                    rpred.append(ref.argmax(dim=1))
                    if y is not None:
                        rc1.append(rpred[-1] == y + label_offset)
                    kl.append(kl_per_image(ref, logits))
    finally:
        for m, was_training in modes:
            m.train(was_training)

    def cat(parts: list[torch.Tensor]) -> np.ndarray | None:
        return torch.cat(parts).numpy() if parts else None

    return PerImage(pred=torch.cat(pred).numpy().astype(np.int64), correct=cat(c1),
                    correct5=cat(c5), ref_pred=cat(rpred), ref_correct=cat(rc1), kl=cat(kl))


def kl_per_image(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of the softmaxes per image, nats, in float64 (the sum of
    small differences of near-equal log-probabilities needs it)."""
    lp_ref = torch.log_softmax(torch.as_tensor(ref_logits).double(), dim=1)
    lp = torch.log_softmax(torch.as_tensor(logits).double(), dim=1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(dim=1).clamp_min(0.0)


def summarize(r: PerImage, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The reported metrics of one pass, each interval a 95% percentile bootstrap over
    images (seeded: same inputs, same numbers)."""
    def mean(v: np.ndarray | None) -> float | None:
        return None if v is None else float(np.mean(v))

    def ci(v: np.ndarray | None) -> list[float] | None:
        return None if v is None else list(bootstrap_mean_interval(v, resamples, seed)[1])

    return {
        "n": r.n,
        "top1": mean(r.correct),
        "top5": mean(r.correct5),
        "agreement": mean(r.agree),
        "top1_ci95": ci(r.correct),
        "agreement_ci95": ci(r.agree),
        "kl": mean(r.kl),
        "kl_ci95": ci(r.kl),
    }


def compare_summary(r: PerImage, a: str, b: str, resamples: int = RESAMPLES,
                    seed: int = 0) -> dict[str, Any]:
    """Paired comparison of A (``r``'s reference) and B (``r``'s model) on the same
    images: each top-1, the difference A - B with a paired bootstrap interval, McNemar's
    exact test on the discordant images, agreement and KL(A || B). One set of resampled
    images serves every interval, so they describe the same resamples."""
    if r.ref_pred is None or r.kl is None:
        raise ValueError("compare_summary needs a pass with a reference")
    agree = r.agree
    labelled = r.correct is not None and r.ref_correct is not None
    cols = [agree, r.kl]
    if labelled:
        cols += [r.ref_correct, r.correct, r.ref_correct.astype(float) - r.correct]
    draws = bootstrap_means(np.column_stack([np.asarray(c, dtype=float) for c in cols]),
                            resamples, seed)
    est = [float(np.mean(c)) for c in cols]
    ci = [list(percentile_interval(e, draws[:, j])) for j, e in enumerate(est)]

    def side(path: str, j: int | None) -> dict[str, Any]:
        return {"model": path, "top1": None if j is None else est[j],
                "top1_ci95": None if j is None else ci[j]}

    res: dict[str, Any] = {
        "n": r.n, "resamples": resamples, "seed": seed,
        "a": side(a, 2 if labelled else None), "b": side(b, 3 if labelled else None),
        "difference": None,
        "agreement": est[0], "agreement_ci95": ci[0],
        "kl": est[1], "kl_ci95": ci[1], "kl_direction": "KL(A||B), nats",
    }
    if labelled:
        b_only_a, c_only_b = discordant(r.ref_correct, r.correct)
        res["difference"] = {
            "top1": est[4], "ci95": ci[4],
            "verdict": verdict(est[4], *ci[4], better="A better than B",
                               worse="A worse than B"),
            "a_only_correct": b_only_a, "b_only_correct": c_only_b,
            "mcnemar_p": mcnemar_exact(b_only_a, c_only_b),
        }
    return res


def per_image_record(r: PerImage, data: CalibData) -> dict[str, Any]:
    """Compact per-image results for results files: the images' fingerprint (so a later
    paired comparison can check it has the same images in the same order), correctness
    bits as hex and predicted logit indices as base64 uint16; with a reference also the
    agreement bits (``agree_hex``) and KL(reference || model) as base64 float32
    (``kl_b64``), so that two models' fidelity can be compared paired too."""
    from hfbconvert.calib.readers import chunks_of

    h = hashlib.sha256()  # streamed: the same digest as of the whole array's bytes
    for c in chunks_of(data.images):
        h.update(np.ascontiguousarray(c.numpy()).tobytes())
    if data.labels is not None:
        h.update(np.ascontiguousarray(data.labels.numpy().astype("<i8")).tobytes())
    out: dict[str, Any] = {
        "n": r.n, "images_sha256": h.hexdigest(),
        "correct_hex": None if r.correct is None else encode_bits(r.correct),
        "pred_b64": encode_classes(r.pred)}
    if r.ref_pred is not None:
        out["agree_hex"] = encode_bits(r.agree)
    if r.kl is not None:
        out["kl_b64"] = encode_floats(r.kl)
    return out


def evaluate(
    model: nn.Module,
    data: CalibData,
    label_offset: int = 0,
    reference: nn.Module | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Return ``{"n", "top1", "top5", "agreement", "top1_ci95", "agreement_ci95", "kl",
    "kl_ci95"}``; a metric is None when it cannot be computed (no labels, no reference).
    ``kl`` is the mean KL(reference || model) in nats: a fidelity measure with less
    variance than agreement. See :func:`evaluate_per_image` for the arguments."""
    return summarize(evaluate_per_image(model, data, label_offset, reference, batch_size,
                                        device))


def _on(m: nn.Module | None, dev: torch.device) -> nn.Module | None:
    """A copy of ``m`` on ``dev`` (onnxruntime models stay as they are)."""
    if m is None or isinstance(m, OnnxClassifier):
        return m
    return copy.deepcopy(m).to(dev)


class OnnxClassifier(nn.Module):
    """An exported ``.onnx`` file run by onnxruntime (CPU, stock: the hfb ops are ONNX
    functions), called like the PyTorch model: float NCHW in, logits out."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        from .verify import ort_session

        self.path = str(path)
        self.session = ort_session(path, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])
        outs = []  # a file exported with a fixed batch: run it in padded slices
        for i in range(0, len(arr), self.batch):
            part = arr[i:i + self.batch]
            pad = np.zeros((self.batch - len(part), *arr.shape[1:]), dtype=np.float32)
            out = self.session.run(None, {self.input_name: np.concatenate([part, pad])})[0]
            outs.append(out[: len(part)])
        return torch.from_numpy(np.concatenate(outs))


def load_onnx_for_eval(path: str | Path, threads: int = 0) -> tuple[OnnxClassifier, ModelInfo]:
    """The ``.onnx`` file as a module plus the ModelInfo its hfbconvert metadata describes
    (preprocessing, label offset, classes; see ``export.onnx.onnx_metadata``)."""
    import onnx

    from .export.onnx import read_metadata

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        mp = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{p}: not a readable ONNX model ({msg[:100]})") from None
    meta = read_metadata(mp)
    if "preprocess" not in meta:
        raise InputError(f"{p}: no hfbconvert preprocessing metadata (exported by another "
                         "tool or an older hfbconvert); re-export it with `hfbconvert export "
                         "onnx`")
    try:
        pre = json.loads(meta["preprocess"])
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        info = ModelInfo(
            arch="onnx", config={}, resolution=int(pre["resolution"]),
            mean=tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
            crop=float(pre["crop"]), resize_mode=str(pre["resize_mode"]),
            label_offset=int(meta.get("label_offset", 0)),
            num_classes=int(meta["num_classes"]),
            classes=[str(c) for c in classes] if classes is not None else None,
            source=str(p), extra={"onnx_metadata": meta},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{p}: malformed hfbconvert metadata ({exc})") from None
    return OnnxClassifier(p, threads), info
