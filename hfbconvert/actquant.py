"""Int8 activations (``compress --activation-bits 8``): where they are quantized and how
their ranges are calibrated.

Every tensor an int8 kernel consumes is quantized: the input of each Conv2d, Linear and
hybrid layer. A ternary bank's hidden units (``a ⊙ (W_b x)``) stay int32 by default, or
are requantized to uint8 once per hidden unit with ``hidden_bits=8`` (see :func:`attach`).
Element-wise residual additions and the pooling/classifier glue between layers stay in
float.

Each quantizer is per-tensor affine uint8 (``q = clamp(round(x/s) + zp, 0, 255)``, the
onnxruntime QDQ default for activations), computed as QuantizeLinear's arithmetic
(:func:`fake_quant_ref`) with a straight-through gradient (STE) when a model is fine-tuned
with the quantizers in the loop. ONNX export writes that arithmetic out in standard ops
by default; only ``export --qdq`` (``export_qdq``) traces it through
``torch.fake_quantize_per_tensor_affine`` into a QuantizeLinear/DequantizeLinear pair.

Calibration is MSE-optimal clipping (``quant.calibrators.MSEClipCalibrator``): for each
tensor the range [lo, hi] of the calibration activations is shrunk by each ratio in
:data:`CLIP_RATIOS` and the one with the smallest squared quantization error on a seeded
sample of the values is kept. The search includes MinMax (ratio 1), so it is never worse in
squared error; with 256 levels it clips only heavy-tailed tensors. Quantizers are
calibrated in network order within one forward pass, each seeing the activations of the
network with all earlier quantizers already active, so the ranges match what the int8
network will actually produce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, InputError
from .handlers import handler_for, is_hybrid, layer_modules
from .quant import calibrators as C
from .quant import primitives as P

ACT_BITS = (32, 8)
HIDDEN_BITS = (32, 8)
QMIN, QMAX = P.UINT8
CLIP_RATIOS = C.ACTIVATION_CLIP_RATIOS
SAMPLE_VALUES = C.SAMPLE_VALUES  # values per tensor the clipping search is run on
ATTR = "hfb_activation_bits"
OBJECTIVES = ("input", "output")  # what a range minimises: see calibrate
OUTPUT_SEARCH_IMAGES = 32  # images of the calibration batch the output search runs on


def _check_bits(bits: Any, allowed: tuple[int, ...], field: str, choices: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ConfigError(field, bits, f"not supported; choose {choices}")
    return int(bits)


def check_act_bits(bits: Any, field: str = "activation_bits") -> int:
    return _check_bits(bits, ACT_BITS, field, "32 (float) or 8")


def check_hidden_bits(bits: Any) -> int:
    return _check_bits(bits, HIDDEN_BITS, "hidden_bits", "32 (int32 hidden units) or 8")


def check_config(act_bits: Any, weight_bits: int, has_data: bool,
                 hidden_bits: Any = 32) -> int:
    """Validate the activation and hidden-unit bits against the weight bits and the
    calibration data; raises :class:`ConfigError` naming the field at fault."""
    check_hidden_bits(hidden_bits)
    bits = check_act_bits(act_bits)
    if hidden_bits != 32 and bits != 8:
        raise ConfigError("hidden_bits", hidden_bits, "applies only with {other} 8",
                          other="activation_bits")
    if bits == 8 and weight_bits != 8:
        raise ConfigError("activation_bits", 8, f"needs {{other}} 8 (int8 kernels take "
                          f"int8 weights), not {weight_bits}", other="weight_bits")
    if bits == 8 and not has_data:
        raise ConfigError("activation_bits", 8, "needs calibration images to set the "
                          "activation ranges (give {other})", other="calib")
    return bits


class ActQuant(nn.Module):
    """uint8 fake quantization with calibrated ``scale`` and ``zero_point``: per tensor, or
    (``channels``) one pair per channel of dim 1, as the hidden units' groups use."""

    def __init__(self, channels: int | None = None, pow2: bool = True) -> None:
        super().__init__()
        shape = () if channels is None else (int(channels),)
        # per channel: scales powers of two apart (hidden units: :func:`_fit_pow2`) or
        # free (:func:`fit_channels`, for a depthwise conv's input)
        self.pow2 = pow2
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observer: Callable[[torch.Tensor], None] | None = None  # set while calibrating
        self.bypass = False  # pass inputs through in float (the output-error range search)
        # ONNX form when traced: False writes the arithmetic (Div, Round, Add, Clip, Sub,
        # Mul), which every runtime computes as PyTorch does; True writes QuantizeLinear/
        # DequantizeLinear, which onnxruntime rewrites into its int8 kernels
        self.export_qdq = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self.observer is not None:
            self.observer(x)  # sets scale/zero_point, then clears itself
        if self.export_qdq and torch.jit.is_tracing() and self.scale.dim() == 0:
            # the exporter turns this into QuantizeLinear/DequantizeLinear
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point,
                                                         QMIN, QMAX)
        # ONNX QuantizeLinear arithmetic (x / scale, round half to even), and ~100x faster
        # on CPU than fake_quantize with tensor qparams; straight-through gradient
        axis = 1 if self.scale.dim() else None
        return P.fake_quantize(x, self.scale, self.zero_point, QMIN, QMAX, axis=axis)

    def extra_repr(self) -> str:
        if self.scale.dim():
            return f"channels={self.scale.numel()}, groups={hidden_groups(self)}"
        return f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


def qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (scale, zero_point) covering [lo, hi] ∪ {0} (zero is exactly representable, so
    ReLU zeros and padding stay exact). Vectorized over any shape."""
    return P.choose_qparams(lo, hi, QMIN, QMAX)


def fake_quant_ref(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """The uint8 quantizer without gradient (qparams broadcast against ``x``)."""
    return P.fake_quantize(x, scale, zp, QMIN, QMAX, ste=False)


def choose_range(values: torch.Tensor, lo: float, hi: float,
                 ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[float, int, float]:
    """(scale, zero_point, clip ratio): :func:`quant.calibrators.mse_clip` for uint8."""
    return C.mse_clip(values, lo, hi, ratios, QMIN, QMAX)


# ---------------------------------------------------------------------------- placement
def _quant_input_hook(mod: nn.Module, args: tuple) -> tuple:
    return (mod.input_quant(args[0]),) + tuple(args[1:])


def quant_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer whose input an int8 kernel consumes, in module (≈ network) order: every
    layer a kind owns (``handlers``: convs, Linear, hybrid layers), not the modules inside
    a hybrid layer."""
    return [(name, m) for name, m, _ in layer_modules(model)]


def is_depthwise(m: nn.Module) -> bool:
    """A layer each of whose outputs reads one input channel (its kind says so)."""
    return handler_for(m).reads_one_channel(m)


def attach(model: nn.Module, hidden_bits: int = 32,
           depthwise_channels: bool = False) -> list[ActQuant]:
    """Give every quant site an input quantizer (hybrid layers also a hidden-unit one when
    ``hidden_bits`` is 8) and mark the model; idempotent. Structure only: the ranges come
    from :func:`calibrate` or a saved state dict.

    ``hidden_bits`` 32 (default): a ternary bank's hidden units ``a_k · (W_b x_q)`` stay
    int32, each brought to one common fixed-point scale by its multiplier (``a_k`` times
    the input scale, the one int32 MUL per hidden unit counted anyway), so W_c adds int32
    values exactly: no rounding, no extra operation; the price is a hidden tensor of
    int32 instead of uint8 in memory. 8: requantized to uint8 with power-of-two scales
    (:func:`_fit_pow2`), for targets that must keep every stored activation 8-bit.
    Measured on MobileNetV2 (96 px proxy, 300 val images): uint8 hidden units in the
    classifier alone cost 15 points of agreement with the original.

    ``depthwise_channels``: a depthwise conv's input gets one free range per channel
    (:func:`fit_channels`) instead of one per tensor. Measured on the MobileNetV2 int8
    hybrid (tuning split, bench/results/int8-rounding-v2-dwchan.json): KL 0.0409 vs 0.0404
    (gptq weights), 0.0446 vs 0.0402 (nearest + mean shift), within noise: the per-tensor
    ranges are not where its activation error comes from; off by default, not on the
    CLI."""
    check_hidden_bits(hidden_bits)
    made = []
    for _, m in quant_sites(model):
        if is_hybrid(m):
            if m.input_quant is None:
                m.input_quant = ActQuant()
                made.append(m.input_quant)
            if hidden_bits == 8 and m.n_tolerant and m.hidden_quant is None:
                m.hidden_quant = ActQuant(channels=m.r)
                made.append(m.hidden_quant)
        elif not isinstance(getattr(m, "input_quant", None), ActQuant):
            per_channel = depthwise_channels and is_depthwise(m)
            m.add_module("input_quant", ActQuant(channels=m.in_channels, pow2=False)
                         if per_channel else ActQuant())
            m.register_forward_pre_hook(_quant_input_hook)
            made.append(m.input_quant)
    setattr(model, ATTR, 8)
    return made


# hidden-unit scales s_max · 2^-e, e = 0..7: codes shifted by up to 7 bits stay below
# 255 · 2^7 per term, so an int32 accumulator holds sums over 65,000 hidden units
HIDDEN_EXPONENTS = 8


def _fit_pow2(q: ActQuant, x: torch.Tensor, fit: Callable) -> dict:
    """Per-channel scales that differ by powers of two: ``s_k = s_max · 2^-e_k``, with
    ``e_k`` the largest shift (≤ 7) at which channel k's own range [lo_k, hi_k] ∪ {0}
    still fits in 256 steps, and a per-channel zero point (asymmetric: a mostly one-signed
    unit keeps all its levels). ``s_max`` comes from the clipping search on the widest
    unit's values. The zero points fold into a per-output constant of W_c.

    Why: a hidden unit's range is ``a_k`` times that of ``W_b x``, and ``a`` spans two
    orders of magnitude, so one scale for all of them rounds the small units away. With
    power-of-two ratios an integer kernel shifts each unit's uint8 code into a common
    int32 accumulator (one shift per hidden unit, no multiply), so W_c still only adds.
    Measured on MobileNetV1-0.5-160, agreement with the original on 400 val images (the
    same model with float hidden units: 0.890): one scale 0.835; equal-count groups with
    free scales: 4 groups 0.870, 16 groups 0.888 (but G - 1 multiplies per output). On all
    1,300 val images (float hidden units: top-1 0.722): power-of-two scales, symmetric
    0.705, asymmetric (per-unit zero points) 0.715."""
    dims = [d for d in range(x.dim()) if d != 1]
    lo_c = x.amin(dim=dims).clamp(max=0.0)
    hi_c = x.amax(dim=dims).clamp(min=0.0)
    span = hi_c - lo_c
    # the clipping search on the widest unit's values sets the coarsest step
    w = int(torch.argmax(span))
    vals = x.select(1, w).reshape(-1)
    _, _, ratio, lo, hi = fit(vals[:: max(1, vals.numel() // SAMPLE_VALUES)])
    s_max = max(ratio * float(span[w]) / (QMAX - QMIN), 1e-8)
    e = torch.floor(torch.log2(((QMAX - QMIN) * s_max) / span.clamp_min(1e-30)))
    e = e.clamp(0, HIDDEN_EXPONENTS - 1)
    scale = s_max * torch.pow(2.0, -e)
    q.scale.copy_(scale)
    q.zero_point.copy_(P.zero_point_for(lo_c, scale, QMIN, QMAX))
    counts = torch.bincount(e.long(), minlength=HIDDEN_EXPONENTS)
    return {"s_max": s_max, "clip_ratio": ratio, "min": lo, "max": hi,
            "units_per_shift": counts.tolist()}


CHANNEL_SAMPLE = 4096  # positions per channel the per-channel clipping search runs on


def fit_channels(q: ActQuant, x: torch.Tensor, ratios: tuple[float, ...] = CLIP_RATIOS,
                 sample: int = CHANNEL_SAMPLE) -> dict:
    """Free per-channel ranges: each channel of dim 1 gets the MSE-optimal clip of its own
    [lo_c, hi_c] ∪ {0} (ratios searched for all channels at once, on the same ``sample``
    evenly spaced positions of each channel; ties keep the widest).

    Why a depthwise conv's input may have them at no integer cost: output channel c reads
    only input channel c, so the input scale s_c merges with the filter's own per-channel
    scale into the one requantization multiplier channel c has anyway (and the producer's
    per-channel weight scales already give it one multiplier per channel)."""
    c = x.shape[1]
    v = x.transpose(0, 1).reshape(c, -1)
    lo_c = v.amin(1).clamp(max=0.0)
    hi_c = v.amax(1).clamp(min=0.0)
    vs = v[:, :: max(1, v.shape[1] // sample)].float()
    r = torch.tensor(ratios, dtype=torch.float32)[:, None]
    scale, zp = P.choose_qparams(lo_c[None] * r, hi_c[None] * r, QMIN, QMAX)  # (R, C)
    qv = P.fake_quantize(vs[None], scale[..., None], zp[..., None].float(), QMIN, QMAX,
                         ste=False)
    best = (qv - vs[None]).pow(2).sum(2).argmin(0)  # first minimum: the widest
    idx = torch.arange(c)
    q.scale.copy_(scale[best, idx])
    q.zero_point.copy_(zp[best, idx])
    chosen = r[best, 0]
    return {"min": float(lo_c.min()), "max": float(hi_c.max()), "per_channel": True,
            "clip_ratio_mean": float(chosen.mean()),
            "clip_ratio_min": float(chosen.min())}


def hidden_groups(q: ActQuant | None) -> int:
    """Distinct (scale, zero point) pairs of a hidden-unit quantizer (0: none): the
    distinct shifts of :func:`_fit_pow2`."""
    if q is None:
        return 0
    if q.scale.dim() == 0:
        return 1
    return int(torch.unique(torch.stack([q.scale, q.zero_point.float()], 1), dim=0).shape[0])


def model_act_bits(model: nn.Module) -> int:
    return int(getattr(model, ATTR, 32))


def quantizers(model: nn.Module) -> list[tuple[str, ActQuant]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]


Fit = Callable[[torch.Tensor], tuple[float, int, float, float, float]]


def _observer(name: str, q: ActQuant, fit: Fit, report: dict[str, dict],
              on_quantizer: Callable[[str], None] | None,
              search: Callable[[ActQuant, torch.Tensor], tuple] | None = None,
              clip_ratios: tuple[float, ...] = CLIP_RATIOS,
              ) -> Callable[[torch.Tensor], None]:
    """``q``'s one-shot observer: sets its range from the first tensor it sees (by ``fit``
    on the values, or ``search(q, x)``), records it in ``report`` and switches itself off,
    so ``q`` quantizes that same tensor."""
    def observe(x: torch.Tensor) -> None:
        x = x.detach().float()
        q.observer = None  # calibrated from here on (a search calls the layer again)
        if q.scale.dim() == 0:
            scale, zp, ratio, lo, hi = search(q, x) if search else fit(x.reshape(-1))
            q.scale.fill_(scale)
            q.zero_point.fill_(zp)
            report[name] = {"min": lo, "max": hi, "clip_ratio": ratio, "scale": scale,
                            "zero_point": zp}
        elif q.pow2:
            report[name] = _fit_pow2(q, x, fit)
        else:
            report[name] = fit_channels(q, x, clip_ratios)
        if on_quantizer is not None:
            on_quantizer(name)
    return observe


def consumers(model: nn.Module) -> dict[int, nn.Module]:
    """id(input quantizer) -> the layer whose input it quantizes."""
    return {id(m.input_quant): m for _, m in quant_sites(model)
            if isinstance(getattr(m, "input_quant", None), ActQuant)}


@torch.no_grad()
def output_error_range(q: ActQuant, layer: nn.Module, x: torch.Tensor,
                       ratios: tuple[float, ...], images: int = OUTPUT_SEARCH_IMAGES,
                       ) -> tuple[float, int, float, float, float]:
    """(scale, zero_point, clip ratio, min, max) of ``q`` minimising the squared error of
    ``layer``'s OUTPUT, ``‖layer(q(x)) − layer(x)‖²`` on the first ``images`` samples of
    ``x``, among the ranges ``ratio · [min, max]`` (ties keep the widest).

    Why: the error a layer passes on is ``W (x − q(x))``, which weighs each input channel's
    rounding and clipping error by its outgoing weights; the tensor's own squared error
    weighs every channel alike, so it clips a few wide channels deep even where the layer
    leans on them. Other quantizers inside ``layer`` (hidden units) pass through during
    the search."""
    lo, hi = float(x.min()), float(x.max())
    scales, zps = P.choose_qparams(lo, hi, QMIN, QMAX,
                                   clip_ratio=torch.tensor(ratios, dtype=torch.float32))
    xs = x[:images]
    others = [m for m in layer.modules() if isinstance(m, ActQuant) and m is not q]
    for m in [q, *others]:
        m.bypass = True
    try:
        ref = layer(xs).double()
        q.bypass = False
        errs = []
        for s, z in zip(scales.tolist(), zps.tolist()):
            q.scale.fill_(s)
            q.zero_point.fill_(z)
            errs.append(float((layer(xs).double() - ref).pow(2).sum()))
    finally:
        for m in [q, *others]:
            m.bypass = False
    k = min(range(len(errs)), key=lambda i: (errs[i], i))
    return float(scales[k]), int(zps[k]), float(ratios[k]), lo, hi


def _searchers(model: nn.Module, objective: str, ratios: tuple[float, ...],
               ) -> dict[int, Callable[[ActQuant, torch.Tensor], tuple]]:
    """id(quantizer) -> its range search, for ``objective`` "output" (none for "input")."""
    if objective not in OBJECTIVES:
        raise ValueError(f"activation range objective {objective!r}: choose one of "
                         f"{', '.join(OBJECTIVES)}")
    if objective == "input":
        return {}
    return {k: (lambda q, x, layer=layer: output_error_range(q, layer, x, ratios))
            for k, layer in consumers(model).items()}


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, seed: int = 0,
              on_quantizer: Callable[[str], None] | None = None,
              clip_ratios: tuple[float, ...] = CLIP_RATIOS,
              calibrator: Callable[[], C.Calibrator] | None = None,
              objective: str = "input") -> dict[str, dict]:
    """Calibrate every quantizer of ``model`` (after :func:`attach`) in ONE forward pass
    over ``images`` (one batch): each quantizer picks its range from the tensor it receives,
    then quantizes it, so every later quantizer sees the int8 network's activations.
    Returns per-quantizer ranges (plain data for the report). Each tensor's range comes
    from a fresh ``calibrator()`` (default: MSE clipping over ``clip_ratios``, sampling
    from one generator seeded by ``seed``; ``clip_ratios`` ``(1.0,)`` is MinMax, for
    comparisons: the search includes it). ``objective`` ``"output"``: each per-tensor
    input quantizer instead takes the clip ratio with the least squared error of its
    layer's output (:func:`output_error_range`). Measured on the MobileNetV2 int8
    hybrid (tuning split, bench/results/int8-rounding-v2-outrange.json): KL 0.0394 vs
    0.0404 with gptq weights, 0.0417 vs 0.0402 with nearest + mean shift, each within
    noise, at three times the calibration time; so "input" stays the default.

    Raises :class:`InputError` when a quantizer sees no activations (no calibration image
    reaches that layer)."""
    if images.numel() == 0:
        raise InputError("int8 activation calibration needs images; none were given")
    qs = dict(quantizers(model))
    gen = torch.Generator().manual_seed(seed)  # one stream, drawn in network order
    report: dict[str, dict] = {}

    def default() -> C.Calibrator:
        if tuple(clip_ratios) == (1.0,):
            return C.MinMaxCalibrator(QMIN, QMAX)
        return C.MSEClipCalibrator(clip_ratios, gen, SAMPLE_VALUES, QMIN, QMAX)

    make = calibrator if calibrator is not None else default

    def fit(flat: torch.Tensor) -> tuple[float, int, float, float, float]:
        c = make()
        c.collect(flat)
        r = c.compute()
        return r.scale, r.zero_point, r.clip_ratio, r.lo, r.hi

    search = _searchers(model, objective, tuple(clip_ratios))
    for name, q in qs.items():
        q.observer = _observer(name, q, fit, report, on_quantizer, search.get(id(q)),
                               tuple(clip_ratios))
    was = model.training
    model.eval()
    try:
        model(images)
    finally:
        missing = [n for n, q in qs.items() if q.observer is not None]
        for q in qs.values():
            q.observer = None
        model.train(was)
    if missing:
        raise InputError(f"activations cannot be calibrated: no calibration image reaches "
                         f"{missing[0]}")
    return report
