"""Storage precision of the full-precision weights (``compress --weight-bits 32|16|8``).

Everything a hybrid model keeps in full precision -- the critical filters (``w_crit``),
the 3x3 stem conv, the depthwise convs, the classifier (or its critical part) and any
other Conv2d/Linear weight -- can be stored at 16 or 8 bits. Biases, BatchNorm, the
ternary banks' ``a`` and channel scales stay float32.

* 16: every weight is rounded to float16 (``w.half().float()``).
* 8: per-output-channel symmetric int8: ``scale = clip · max|w_row| / 127``, codes
  ``round(w / scale)`` clamped to [-127, 127], ``w = codes · scale``; ``clip`` is chosen
  per channel from :data:`CLIP_RATIOS` to minimise ``‖w − q(w)‖²``.

The PyTorch model is *fake-quantized*: the weights stay float32 tensors holding exactly the
representable values, so the model that is saved, evaluated and verified is the one the
ONNX file computes. Weight-only: the arithmetic stays float32 (so does the energy model).

Exactness: the scale is chosen so that ``fl(fl(127 · scale) / 127) == scale`` (nudged by an
ulp where needed), hence :func:`int8_codes` re-derives the same scale and codes from the
fake-quantized weights alone and ``codes · scale`` reproduces them bit for bit. Nothing but
the bit width needs to be stored next to the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .handlers import handler_for, is_hybrid, layer_modules
from .layers import hooked_eval
from .quant import calibrators as C
from .quant import primitives as P
from .quant import rounding as R

WEIGHT_BITS = (32, 16, 8)
INT8_MIN, INT8_MAX = P.INT8_SYMMETRIC
# per-channel clipping ratios searched for the int8 scale (1.0 = no clipping)
CLIP_RATIOS = C.WEIGHT_CLIP_RATIOS
ATTR = "hfb_weight_bits"  # set on the root module of a model whose weights were rounded


def check_bits(bits: Any, field: str = "weight_bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise ConfigError(field, bits, "not supported; choose 32, 16 or 8")
    return int(bits)


# ---------------------------------------------------------------------------- int8
def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to("cpu", torch.float32).reshape(w.shape[0], -1)


def _stable_scale(s: torch.Tensor) -> torch.Tensor:
    """Nudge each scale by ulps until ``fl(fl(127·s)/127) == s`` (almost always already)."""
    s = s.clone()
    for _ in range(8):
        bad = (s * INT8_MAX) / INT8_MAX != s
        if not bool(bad.any()):
            return s
        s[bad] = torch.nextafter(s[bad], torch.full_like(s[bad], float("inf")))
    raise RuntimeError("no round-trip-stable int8 scale found")  # pragma: no cover


def _quant_rows(rows: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale, _ = P.choose_qparams(rows.amin(1), rows.amax(1), INT8_MIN, INT8_MAX,
                                symmetric=True, clip_ratio=ratio, eps=None)
    # channels that are zero, or so small that the scale is not a normal float: all codes 0
    zero = ~(scale >= torch.finfo(torch.float32).tiny)
    scale = _stable_scale(torch.where(zero, torch.ones_like(scale), scale))
    codes = P.quantize(rows, scale, torch.zeros_like(scale), INT8_MIN, INT8_MAX, axis=0)
    codes[zero] = 0
    return codes, scale


def _sq_err(codes: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-channel ‖w − q(w)‖² of the float32 dequantized values, summed in float64."""
    return ((codes * scale[:, None]).double() - rows.double()).pow(2).sum(1)


def quantize_int8(w: torch.Tensor, clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) symmetric int8: ``(codes int8 like w, scale float32 [C])``.

    Each channel takes the clipping ratio with the smallest squared error; ties keep the
    earlier (larger) ratio. An all-zero channel (or one whose scale would be subnormal,
    |w| < 1e-36) gets scale 1 and codes 0."""
    rows = _rows(w)
    best_codes, best_scale = _quant_rows(rows, clip_ratios[0])
    best_err = _sq_err(best_codes, best_scale, rows)
    for ratio in clip_ratios[1:]:
        codes, scale = _quant_rows(rows, ratio)
        err = _sq_err(codes, scale, rows)
        better = err < best_err
        best_codes[better], best_scale[better], best_err[better] = \
            codes[better], scale[better], err[better]
    return best_codes.to(torch.int8).reshape(w.shape), best_scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return P.dequantize(codes, scale, torch.zeros_like(scale), axis=0)


def fake_quant(w: torch.Tensor, bits: int, clip_ratios: tuple[float, ...] = CLIP_RATIOS,
               ) -> torch.Tensor:
    """``w`` rounded to its storage precision, as float32 (on w's device)."""
    if bits == 32:
        return w.detach().float().clone()
    if bits == 16:
        return w.detach().half().float()
    codes, scale = quantize_int8(w, clip_ratios)
    return dequantize_int8(codes, scale).to(w.device)


def int8_codes(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Re-derive ``(codes int8, scale float32)`` of fake-quantized float32 weights along
    channel ``axis`` (the scale rule of :func:`quantize_int8` after clipping: the largest
    code of a channel is ±127). Raises ``ValueError`` unless ``codes · scale == w`` exactly."""
    w = np.asarray(w, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    amax = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    scale = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1)).astype(np.float32)
    codes = np.rint(rows / scale[:, None])
    if np.abs(codes).max(initial=0) > INT8_MAX or not np.array_equal(
            (codes.astype(np.float32) * scale[:, None]).astype(np.float32), rows):
        raise ValueError("weights are not per-channel int8 values")
    codes = np.moveaxis(codes.astype(np.int8).reshape(moved.shape), 0, axis)
    return np.ascontiguousarray(codes), scale


def is_fp16_exact(w: np.ndarray) -> bool:
    w = np.asarray(w, dtype=np.float32)
    return bool(np.array_equal(w.astype(np.float16).astype(np.float32), w))


# ---------------------------------------------------------------------------- models
def weight_params(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(full name, module, attribute)`` of every full-precision weight matrix/kernel:
    Conv2d and Linear ``weight`` and HybridPointwise ``w_crit`` (not biases, BatchNorm,
    ``a`` or channel scales)."""
    out = []
    for name, mod, h in layer_modules(model):
        attr = ("w_crit" if mod.n_critical else None) if is_hybrid(mod) else h.weight_attr(mod)
        if attr is not None and getattr(mod, attr, None) is not None:
            out.append((f"{name}.{attr}" if name else attr, mod, attr))
    return out


def model_weight_bits(model: nn.Module) -> int:
    """Storage bits of ``model``'s full-precision weights (32 unless it was rounded)."""
    return int(getattr(model, ATTR, 32))


def mark_weight_bits(model: nn.Module, bits: int) -> None:
    setattr(model, ATTR, check_bits(bits))


@torch.no_grad()
def apply_weight_bits(model: nn.Module, bits: int,
                      clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                      moments: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Round every full-precision weight of ``model`` in place to ``bits`` and mark the
    model; returns per-weight statistics (plain data) for the artifact's metadata.

    ``moments`` (8 bits; from :func:`input_moments`): the weights named there are
    rounded with error feedback (:func:`quantize_int8_gptq`) on the same grid."""
    bits = check_bits(bits)
    stats: dict[str, Any] = {}
    for name, mod, attr in weight_params(model):
        p = getattr(mod, attr)
        w = p.data
        extra: dict[str, Any] = {}
        if bits == 8 and moments is not None and name in moments:
            codes, scale, extra = quantize_int8_gptq(w, moments[name], clip_ratios)
            q = dequantize_int8(codes, scale).to(w.device, w.dtype)
        else:
            q = fake_quant(w, bits, clip_ratios).to(w.device, w.dtype)
        d = (q.double() - w.double()).pow(2).sum()
        stats[name] = {"channels": int(w.shape[0]), "numel": int(w.numel()),
                       "rel_err": float(d / w.double().pow(2).sum().clamp_min(1e-30)), **extra}
        p.data.copy_(q)
    mark_weight_bits(model, bits)
    return stats


# ---------------------------------------------------------------- error-feedback rounding
ROUNDINGS = ("nearest", "gptq")
MOMENT_ROWS_PER_IMAGE = 256  # output positions per image sampled into E[x xᵀ]
MOMENT_BATCH = 8  # images per forward pass while collecting them


def check_rounding(rounding: Any, field: str = "weight_rounding") -> str:
    if rounding not in ROUNDINGS:
        raise ConfigError(field, rounding, "not supported; choose nearest or gptq")
    return str(rounding)


def quantize_int8_gptq(w: torch.Tensor, moment: torch.Tensor,
                       clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """:func:`quantize_int8`'s grid (scales) with codes chosen by error feedback against
    the input second moment ``moment`` (groups, fan_in, fan_in): lower expected output
    error ``(w − q)ᵀ E[x xᵀ] (w − q)`` than rounding to nearest.

    A channel whose largest code would no longer be ±127 keeps its nearest codes: the
    export re-derives each scale from the largest code (:func:`int8_codes`), so it must
    stay at the grid's end. Returns ``(codes, scale, stats)``: the output error relative
    to nearest rounding and how many channels kept nearest codes."""
    codes, scale = quantize_int8(w, clip_ratios)
    rows = _rows(w).double()
    near = codes.reshape(w.shape[0], -1).to(torch.float64)
    m = moment.to("cpu", torch.float64)
    group = None if m.shape[0] == 1 else torch.arange(w.shape[0]) // (w.shape[0] // m.shape[0])
    fb = R.gptq_codes(rows, scale, m, group, INT8_MIN, INT8_MAX)
    keep = fb.abs().amax(1) != near.abs().amax(1)
    fb[keep] = near[keep]
    s = scale.double()[:, None]
    e_near = R.output_error(rows, near * s, m, group).sum()
    e_fb = R.output_error(rows, fb * s, m, group).sum()
    return fb.to(torch.int8).reshape(w.shape), scale, {
        "rounding": "gptq", "output_err_vs_nearest": float(e_fb / e_near.clamp_min(1e-300)),
        "nearest_channels": int(keep.sum())}


def sampled_inputs(h: Any, m: nn.Module, x: torch.Tensor, rows_per_image: int,
                   gen: torch.Generator) -> torch.Tensor:
    """What ``m``'s weight multiplies for input ``x`` (its kind ``h``'s ``weight_inputs``,
    (groups, rows, fan_in)), at most ``rows_per_image`` seeded output positions per image,
    float64: the rows behind every input moment."""
    r = h.weight_inputs(m, x)
    cap = rows_per_image * x.shape[0]
    if r.shape[1] > cap:
        r = r[:, torch.randperm(r.shape[1], generator=gen)[:cap].to(r.device)]
    return r.double()


@torch.no_grad()
def input_moments(model: nn.Module, batches: list[torch.Tensor], seed: int = 0,
                  rows_per_image: int = MOMENT_ROWS_PER_IMAGE) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (groups, fan_in, fan_in), float64 on the CPU, of what every
    full-precision weight (:func:`weight_params`) multiplies, over a sample of output
    positions of ``batches`` (one forward pass, the layer kinds' ``weight_inputs``)."""
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list] = {}
    handles = []
    for name, mod, _ in weight_params(model):
        h = handler_for(mod)
        if h is None:  # pragma: no cover - weight_params only lists known kinds
            continue

        def hook(m: nn.Module, inp: tuple, _n: str = name, _h: Any = h) -> None:
            r = sampled_inputs(_h, m, inp[0].detach(), rows_per_image, gen)
            a = acc.setdefault(_n, [0.0, 0])
            a[0] = a[0] + (r.transpose(1, 2) @ r).cpu()
            a[1] += r.shape[1]
        handles.append(mod.register_forward_pre_hook(hook))
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    with hooked_eval(model, handles):
        for x in batches:
            # a few images a pass: a depthwise conv's im2col at 112x112 is 43 MB per image
            for part in x.split(MOMENT_BATCH):
                model(part.to(dev))
    return {n: s / max(c, 1) for n, (s, c) in acc.items()}


# ------------------------------------------------------------- training with int8 in the loop
class Int8STE(nn.Module):
    """Parametrization: the forward sees the per-channel int8 value of the latent weight
    (max-abs scale, no clip search, the rule :func:`int8_codes` re-derives), the backward
    passes the gradient straight through, so fine-tuning learns weights that survive
    rounding. Applied to weights that are already int8 values, it is the identity."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = fake_quant(w, 8, (1.0,)).to(w.dtype)
        return w + (q - w).detach()


def attach_int8_ste(model: nn.Module) -> int:
    """Put :class:`Int8STE` on every full-precision weight; returns how many."""
    from torch.nn.utils import parametrize

    sites = weight_params(model)
    for _, mod, attr in sites:
        parametrize.register_parametrization(mod, attr, Int8STE())
    return len(sites)


@torch.no_grad()
def detach_int8_ste(model: nn.Module) -> None:
    """Back to plain weights holding exact int8 values (what the export re-derives)."""
    from torch.nn.utils import parametrize

    for mod in list(model.modules()):
        for attr in ("weight", "w_crit"):
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    apply_weight_bits(model, 8, clip_ratios=(1.0,))
