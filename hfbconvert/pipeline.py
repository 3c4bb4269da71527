"""The compress pipeline: sensitivity -> plan -> build -> reconstruct -> fine-tune ->
BatchNorm adjustment.

Each stage is switchable (``CompressConfig``) and its effect on agreement with the
original model, measured on held-apart calibration images, is recorded in the returned
metadata, so an ablation is a matter of flags.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hfbconvert.calib.readers import CalibData

from . import actquant, distributed, progress
from .bnadjust import BN_MODES, BN_SCOPES, bn_targets, match_bn, reestimate_bn
from .costs import ModelCost, model_cost
from .distill import FinetuneConfig, finetune, fingerprint, trainable_parameters
from .errors import ConfigError
from .fitting import PairStats
from .handlers import is_hybrid, parse_kinds
from .hybrid import HybridPointwise
from .layers import (
    PointwiseLayer,
    build_layer,
    find_pointwise,
    layer_bias,
    layer_weight,
    select_layers,
    set_submodule,
)
from .memory import release_freed
from .models.info import ModelInfo
from .plan import LayerPlan, MilpNotOptimal, Plan, budget_plan, uniform_plan
from .sensitivity import loss_curves
from .stats import collect_input_stats
from .ternary import twn_ternarize
from .weightquant import check_bits, check_rounding

if TYPE_CHECKING:
    from .stages import State

METHODS = ("hybrid", "twn", "strassen")


@dataclass
class CompressConfig:
    method: str = "hybrid"
    budget: float | None = 0.536
    critical_fraction: float | None = None
    hidden_units_ratio: float = 1.0
    max_add_increase: float = 0.48
    # cap on stored bytes, as a fraction of the original model's float32 bytes (cost
    # model: weights and biases); None: no cap, the MUL budget alone decides
    size_budget: float | None = None
    # cap on arithmetic energy (cost model), as a fraction of the original model's at the
    # same activation bits: with int8 activations 1.0 means "no more than int8 PTQ"
    energy_budget: float | None = None
    # what prices --energy-budget: "constants" (costs.py, arithmetic only) or an accelerator
    # (shipped name or YAML) priced by ZigZag, memory included (hfbconvert.hw.planner)
    energy_model: str = "constants"
    budgets: tuple[int, ...] = (1, 2, 3, 4)
    ratios: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    # off by default: measured on MobileNetV1-0.5-160 (budget 0.536, 1000 images) the
    # one-shot fit alone gave val top-1 0.7285, + sequential reconstruction 0.7169
    reconstruct: bool = False
    sequential: bool = True
    bias_correction: bool = True
    fragility: bool = True
    recon_images: int = 256
    per_image: int = 64
    # images behind each layer's input statistics (Σ). 1,024 instead of 256 moved V1-0.5-160
    # top-1 by -1.15..+1.38 points across calibration samples and agreement by <= 0.005:
    # noise, so the cheaper setting stays (bench/ablation.md, "Fine-tuning")
    stats_images: int = 256
    # module-name globs: which convertible layers to convert (all when empty), which not
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # layer kinds to convert (handlers registry names; "conv": k×k banks, opt-in)
    layer_kinds: tuple[str, ...] = ("pointwise", "linear")
    held_fraction: float = 0.1
    # at least this many held-apart images when the set allows (at most a fifth of it):
    # at 100 images the agreement's 95% interval is +-0.08 wide, too wide to gate on
    held_min_images: int = 200
    # 0.75: good conversions measured 0.82-0.96 held-apart agreement (MobileNetV1 0.25-128
    # and 0.75-192 lost 0.85 and 1.08 top-1 points at 0.82 and 0.89; V1-0.5-160 0.93, V2
    # 0.96), collapsed ones (baselines at --steps 0) below 0.5
    min_agreement: float = 0.75
    seed: int = 0
    # steps None: auto_steps (bounded compute and epochs), as on the CLI
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=None))
    # FP weight storage 32|16|8; None (the default, for the CLI too): 16, measured lossless
    # on V1-0.5-160, or 8 with int8 activations (which need 8-bit weights); an int after
    # construction
    weight_bits: int | None = None
    # int8 weights with calibration data: "gptq" rounds each layer's codes with error
    # feedback against its inputs' E[x xᵀ]; "nearest" each weight on its own. MobileNetV2
    # int8 hybrid, tuning split (bench/int8_rounding.py): KL to the original after the int8
    # weights 0.0416 -> 0.0286 (float hybrid 0.0272), but after the mean shift and the
    # activation quantizers the two end within noise, so nearest (cheaper) stays default
    weight_rounding: str = "nearest"
    activation_bits: int = 32  # 8: int8 activations (needs weight_bits 8 and calibration data)
    # with int8 activations: ternary-bank hidden units int32 (exact; default) or uint8
    # (power-of-two scales); see actquant.attach
    hidden_bits: int = 32
    # with int8 activations and a fine-tune: True (QAT) fine-tunes after the int8 stages
    # with the quantizers in the forward; False fine-tunes in float first, then rounds
    # weights, corrects means and calibrates activations (no fake quantization per step)
    qat: bool = True
    act_calib_images: int = 128  # one forward pass as a single batch
    # after rounding to 8 bits: match per-layer output means. After gptq rounding on the
    # MobileNetV2 int8 `norm` path it raised the tuning split's KL (within noise), and
    # without it the evaluation split's 3 seeds moved within noise (README, int8 section)
    mean_shift: bool = True
    # BatchNorm stage (bnadjust.py): "off" | "match" | "reestimate". Off by default: the
    # V1-0.5-160 ImageNet model has its BN folded (stage skipped, nothing to gain), and on
    # BN-unfolded CIFAR-10 V1-0.5 (10,000 test images) "match" moved top-1 by +0.05
    # points (5 images) and "reestimate" cost 0.19 points (bench/ablation.md)
    bn_adjust: str = "off"
    bn_scope: str = "pointwise"  # "pointwise": BNs fed by a hybrid layer; "all": every BN
    bn_images: int = 512

    def __post_init__(self) -> None:
        if self.weight_bits is None:
            self.weight_bits = 8 if self.activation_bits == 8 else 16

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = list(self.budgets)
        d["ratios"] = list(self.ratios)
        d["layer_kinds"] = list(self.layer_kinds)
        return d


# a check once the model is built; changing it does not change the weights
RESUME_MAY_DIFFER = ("min_agreement",)


def resume_identity(cfg: CompressConfig, plan: Plan, data: CalibData) -> dict[str, Any]:
    """The options that decide the student a fine-tune starts from, for its checkpoint
    (the fine-tune adds its own options and the model/image fingerprints): a resume with
    other ones would continue this run's weights under the new options' name."""
    ident = {k: v for k, v in cfg.to_dict().items()
             if k != "finetune" and k not in RESUME_MAY_DIFFER}
    ident["normalization"] = {"mean": list(data.mean), "std": list(data.std)}
    # the layout the weights fit, whichever way it was chosen (budget, --plan file, ...)
    ident["plan"] = fingerprint((f"{lp.name}|r={lp.r}",
                                 torch.tensor(lp.critical_idx, dtype=torch.long))
                                for lp in plan.layers)
    return ident


def normalizer(data: CalibData):
    """uint8 NCHW -> normalized float input, with the data's mean/std."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return lambda u8: (u8.float() - mean) / std


def _batches(data: CalibData, n: int, bs: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Normalized batches of a seeded random sample of ``n`` images. Never the first n:
    folders are read in class order, and statistics from a few classes mislead every fit
    (measured: held agreement after reconstruction 0.37 with the first 256 of 5,000
    class-sorted images, 0.57 with a random 256)."""
    return [x for x, _ in data.sample(n, seed=seed).batches(bs)]


class HeldBatches:
    """The held-apart images as normalized batches, read from disk again on every pass
    (each stage's agreement check, each early-stopping check): holding them decoded in
    float would cost 4 bytes per pixel for a tenth of the calibration set. Freed memory
    goes back to the OS after each batch (:mod:`hfbconvert.memory`): without it the
    resident peak grew with the number of batches checked."""

    def __init__(self, data: CalibData, batch_size: int = 64) -> None:
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        for x, _ in self.data.batches(self.batch_size):
            yield x
            del x  # the consumer is done with the previous batch: free before trimming
            release_freed()

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    @property
    def n_images(self) -> int:
        return len(self.data)


def n_held(held) -> int:
    """Images in ``held`` (a :class:`HeldBatches` or a list of batches) without reading
    them."""
    return held.n_images if isinstance(held, HeldBatches) else sum(x.shape[0] for x in held)


def _device_of(net: nn.Module) -> torch.device:
    """Where ``net`` computes: its first parameter's (or buffer's) device, else the CPU."""
    for t in net.parameters():
        return t.device
    for t in net.buffers():
        return t.device
    return torch.device("cpu")


def _paired_logits(student: nn.Module, teacher: nn.Module, images: list[torch.Tensor]):
    """(student logits, teacher logits) per batch on the CPU, both networks in eval mode,
    each fed the batch on its own device."""
    student.eval()
    teacher.eval()
    ds, dt = _device_of(student), _device_of(teacher)
    for x in images:
        yield student(x.to(ds)).cpu(), teacher(x.to(dt)).cpu()


def held_count(n: int, cfg: CompressConfig) -> int:
    """Held-apart images out of ``n``: ``held_fraction`` of them, raised towards
    ``held_min_images`` while at most a fifth of the set is held apart."""
    return max(1, round(cfg.held_fraction * n), min(cfg.held_min_images, n // 5))


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, images: list[torch.Tensor]) -> float:
    """Top-1 agreement of ``student`` with ``teacher`` (labels not needed)."""
    hit = tot = 0
    for s, t in _paired_logits(student, teacher, images):
        hit += int((s.argmax(1) == t.argmax(1)).sum())
        tot += s.shape[0]
    return hit / max(tot, 1)


@torch.no_grad()
def held_kl(student: nn.Module, teacher: nn.Module, images: list[torch.Tensor]) -> float:
    """Mean KL(teacher || student) of the logits on held-apart images: the distillation
    objective measured where the fine-tune did not train, far less noisy than top-1
    agreement on a hundred images."""
    tot, n = 0.0, 0
    for s, t in _paired_logits(student, teacher, images):
        lt, ls = torch.log_softmax(t.double(), 1), torch.log_softmax(s.double(), 1)
        tot += float((lt.exp() * (lt - ls)).sum())
        n += s.shape[0]
    return tot / max(n, 1)


@torch.no_grad()
def layer_fragility(model: nn.Module, layers: list[PointwiseLayer], images: torch.Tensor,
                    rel_noise: float = 0.01, seed: int = 0) -> dict[str, float]:
    """Logit distortion per unit of relative weight error, for each pointwise layer.

    Gaussian noise of ``rel_noise`` relative energy is added to one layer's weights at a
    time; fragility = E‖Δlogits‖² / E‖logits‖² / rel_noise. This is what METHOD.md §5
    measured by hand (1% on the first pointwise layer: agreement 0.81)."""
    model.eval()
    base = model(images)
    denom = float((base - base.mean(0)).pow(2).mean().clamp_min(1e-30))
    out = {}
    g = torch.Generator().manual_seed(seed)
    for ly in layers:
        mod = model.get_submodule(ly.name)
        w = mod.weight.data
        kept = w.clone()  # w + noise - noise is not w in float: restore the exact bits
        noise = torch.randn(w.shape, generator=g)
        noise *= (rel_noise * w.pow(2).sum() / noise.pow(2).sum().clamp_min(1e-30)).sqrt()
        w.add_(noise)
        try:
            d = float((model(images) - base).pow(2).mean())
        finally:
            w.copy_(kept)
        out[ly.name] = d / denom / rel_noise
    return out


def _twn_init(layer: HybridPointwise, w: torch.Tensor) -> None:
    codes, scale = twn_ternarize(w.float(), dim=1)
    n = w.shape[0]
    layer.set_factors(codes, scale.reshape(-1), torch.eye(n))


def build_hybrid(model: nn.Module, plans: list[LayerPlan],
                 layers: Mapping[str, PointwiseLayer | str],
                 strides: dict[str, int] | None = None) -> nn.Module:
    """Deep-copy ``model`` and swap each planned layer for an (unfitted) hybrid layer,
    built by its kind, that starts with the original layer's bias (kept as is when no fit
    corrects it). ``layers``: the layer records by name (or, as before records, the kind
    names "conv"/"linear" of pointwise layers, with ``strides``)."""
    hybrid = copy.deepcopy(model)
    for lp in plans:
        ly = layers[lp.name]
        if isinstance(ly, str):
            ly = PointwiseLayer(lp.name, ly, lp.c_in, lp.c_out,
                                stride=(strides or {}).get(lp.name, 1))
        h = build_layer(ly, torch.tensor(lp.critical_idx, dtype=torch.long), lp.r)
        with torch.no_grad():
            h.bias.copy_(layer_bias(model, lp.name))
        set_submodule(hybrid, lp.name, h)
    return hybrid


def check_caps(method: str, critical_fraction: float | None, size_budget: float | None,
               energy_budget: float | None) -> None:
    """Size/energy caps are fractions in (0, 1] and steer only the budget planner."""
    for name, frac in (("size_budget", size_budget), ("energy_budget", energy_budget)):
        if frac is not None and not (math.isfinite(frac) and 0 < frac <= 1):
            raise ConfigError(name, frac, "must be a number in (0, 1]")
    for name, frac in (("size_budget", size_budget), ("energy_budget", energy_budget)):
        if frac is not None and critical_fraction is not None:
            raise ConfigError(name, frac, "steers the budget planner; it does not apply "
                              "with {other}", other="critical_fraction")
        if frac is not None and method != "hybrid":
            raise ConfigError(name, frac, f"steers the budget planner; it does not apply "
                              f"to {{other}} {method}", other="method")


def validate_config(cfg: CompressConfig, has_data: bool) -> None:
    """Every check of a :class:`CompressConfig` on its own (no model needed), in one place:
    the CLI calls it before loading anything, :func:`compress` before any work. Raises
    :class:`ConfigError` naming the field, its value and why."""
    if cfg.method not in METHODS:
        raise ConfigError("method", cfg.method, f"unknown; choose from {', '.join(METHODS)}")
    if cfg.budget is not None and not (math.isfinite(cfg.budget) and 0 < cfg.budget <= 1):
        raise ConfigError("budget", cfg.budget, "must be in (0, 1]")
    check_caps(cfg.method, cfg.critical_fraction, cfg.size_budget, cfg.energy_budget)
    check_bits(cfg.weight_bits)
    check_rounding(cfg.weight_rounding)
    actquant.check_config(cfg.activation_bits, cfg.weight_bits, has_data, cfg.hidden_bits)
    if not isinstance(cfg.mean_shift, bool):
        raise ConfigError("mean_shift", cfg.mean_shift, "must be true or false")
    if not cfg.mean_shift and cfg.weight_bits != 8:
        raise ConfigError("mean_shift=False", None, "applies only with {other} 8",
                          other="weight_bits")
    if not isinstance(cfg.qat, bool):
        raise ConfigError("qat", cfg.qat, "must be true or false")
    if not cfg.qat and cfg.activation_bits != 8:
        raise ConfigError("qat=False", None, "applies only with {other} 8",
                          other="activation_bits")
    if cfg.finetune.trainable == "norm" and cfg.activation_bits == 8 and cfg.qat:
        raise ConfigError("trainable", "norm", "with 8-bit activations needs {other} (QAT "
                          "fine-tunes after BatchNorm is folded into the layers)",
                          other="qat=False")
    if cfg.bn_adjust not in BN_MODES:
        raise ConfigError("bn_adjust", cfg.bn_adjust, f"unknown; choose from "
                          f"{', '.join(BN_MODES)}")
    if cfg.bn_scope not in BN_SCOPES:
        raise ConfigError("bn_scope", cfg.bn_scope, f"unknown; choose from "
                          f"{', '.join(BN_SCOPES)}")
    if cfg.finetune.stop_on != "kl":
        raise ConfigError("stop_on", cfg.finetune.stop_on, "compress checks its fine-tune "
                          "on held-apart images without labels: only kl (hfbconvert "
                          "finetune ranks by loss or top1)")


def make_plan(model: nn.Module, info: ModelInfo, layers: list[PointwiseLayer],
              curves: dict[str, torch.Tensor], energies: dict[str, torch.Tensor],
              fragility: dict[str, float], cfg: CompressConfig,
              plan_override: dict | None = None,
              densities: dict[str, torch.Tensor] | None = None,
              density_scale: dict[str, float] | None = None, add_slack: float = 0.0) -> Plan:
    """The plan of ``cfg``'s method (budget planner, uniform, baselines) with the user's
    ``plan_override`` applied. ``density_scale``/``add_slack``: the ADD repair's measured
    corrections (:func:`hfbconvert.stages.add_cap`, :func:`hfbconvert.plan.budget_plan`)."""
    cost = model_cost(model, info.resolution)
    pw_names = {ly.name for ly in layers}
    fixed = sum(c.muls for c in cost.layers if c.name not in pw_names)
    check_caps(cfg.method, cfg.critical_fraction, cfg.size_budget, cfg.energy_budget)
    caps: dict = {}  # the planner's size/energy caps (budget mode only)
    prices = None  # --energy-model: the accelerator's price of each option
    milp = None
    if cfg.method == "twn":
        plans = uniform_plan(layers, curves, energies, cfg.budgets, 0.0, 1.0, "twn")
    elif cfg.method == "strassen":
        plans = uniform_plan(layers, curves, energies, cfg.budgets, 0.0, cfg.hidden_units_ratio)
    elif cfg.critical_fraction is not None:
        plans = uniform_plan(layers, curves, energies, cfg.budgets, cfg.critical_fraction,
                             cfg.hidden_units_ratio)
    else:
        caps, prices = _planner_caps(model, info, layers, cfg, cost)
        plans, milp = _budget_plans(layers, curves, energies, fragility, cfg, cost, fixed,
                                    densities, caps, prices, density_scale, add_slack)
    for lp in plans:  # the planner prices uint8 hidden units' shifts; so does the plan
        lp.hidden_bits = cfg.hidden_bits if cfg.activation_bits == 8 else 32
    notes = _cap_notes(cfg, caps, prices, plans, cost.bytes) + _milp_notes(milp)
    if plan_override:
        plans = apply_plan_override(plans, plan_override, layers)
    pricing = (prices.record(cfg.energy_model, plans, caps["max_energy_pj"])
               if prices is not None else None)
    return Plan(cfg.method, plans, cfg.budget if cfg.critical_fraction is None else None,
                fixed, cost.muls, cost.adds, notes, pricing, milp)


def _planner_caps(model: nn.Module, info: ModelInfo, layers: list[PointwiseLayer],
                  cfg: CompressConfig, cost: ModelCost) -> tuple[dict, Any]:
    """The budget planner's size/energy caps in bytes and pJ (``budget_plan``'s keywords)
    and, with ``--energy-model`` an accelerator, its prices (else None: the constants
    table prices energy)."""
    caps: dict = {}
    if cfg.size_budget is None and cfg.energy_budget is None:
        return caps, None
    pw_names = {ly.name for ly in layers}
    stored = model_cost(model, info.resolution, weight_bits=cfg.weight_bits,
                        act_bits=cfg.activation_bits)
    outside = [c for c in stored.layers if c.name not in pw_names]
    if cfg.size_budget is not None:
        caps.update(max_bytes=cfg.size_budget * cost.bytes,
                    fixed_bytes=sum(c.bytes for c in outside))
    if cfg.energy_budget is not None and cfg.energy_model != "constants":
        from .hw.planner import engine_prices

        prices = engine_prices(model, info.resolution, [ly.name for ly in layers],
                               cfg.energy_model, cfg.activation_bits, cfg.hidden_bits)
        caps.update(max_energy_pj=cfg.energy_budget * prices.reference_pj,
                    fixed_energy_pj=prices.fixed_pj)
        return caps, prices
    if cfg.energy_budget is not None:
        caps.update(max_energy_pj=cfg.energy_budget * stored.energy_pj,
                    fixed_energy_pj=sum(c.energy_pj(stored.fp_bits, stored.act_bits)
                                        for c in outside))
    return caps, None


def _budget_plans(layers: list[PointwiseLayer], curves: dict[str, torch.Tensor],
                  energies: dict[str, torch.Tensor], fragility: dict[str, float],
                  cfg: CompressConfig, cost: ModelCost, fixed: int,
                  densities: dict[str, torch.Tensor] | None, caps: dict, prices: Any,
                  density_scale: dict[str, float] | None, add_slack: float,
                  ) -> tuple[list[LayerPlan], dict | None]:
    """:func:`budget_plan` under ``cfg``'s budget and caps, its cap errors in the user's
    fractions, and what the MILP said when it did not prove the plan optimal
    (:class:`hfbconvert.plan.MilpNotOptimal`; None when it did)."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", MilpNotOptimal)
        try:
            plans = budget_plan(
                layers, curves, energies, fragility, cfg.budgets,
                float(cfg.budget if cfg.budget is not None else 0.536), fixed, cost.muls,
                cost.adds, cfg.max_add_increase, cfg.ratios, densities,
                weight_bits=cfg.weight_bits, act_bits=cfg.activation_bits,
                energy_fn=prices.plan_pj if prices is not None else None,
                density_scale=density_scale, add_slack=add_slack,
                hidden_bits=cfg.hidden_bits if cfg.activation_bits == 8 else 32, **caps)
        except ConfigError as exc:
            # the planner knows its caps in bytes and pJ; the user gave fractions
            frac = {"max_bytes": ("size_budget", cfg.size_budget),
                    "max_energy_pj": ("energy_budget", cfg.energy_budget)}.get(exc.field)
            if frac is None:
                raise
            raise ConfigError(*frac, exc.reason, exc.other) from None
    for w in said:  # anything else caught here is passed on as it was
        if not issubclass(w.category, MilpNotOptimal):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    milp = [w.message.record for w in said if issubclass(w.category, MilpNotOptimal)]
    return plans, (milp[-1] if milp else None)


def _milp_notes(milp: dict | None) -> list[str]:
    """The plan note (and stderr warning) of a MILP that did not prove its plan optimal."""
    if milp is None:
        return []
    gap = "" if milp.get("gap") is None else f" ({milp['gap']:.2%} from the proven optimum)"
    note = f"MILP planner: {milp['status']}; {milp['used']} used{gap}"
    progress.warn(note)
    return [note]


def _cap_notes(cfg: CompressConfig, caps: dict, prices: Any, plans: list[LayerPlan],
               float32_bytes: float) -> list[str]:
    """What the plan is predicted to use of the size and energy caps (plan notes)."""
    notes = []
    if "max_bytes" in caps:
        b = caps["fixed_bytes"] + sum(lp.predicted_bytes(cfg.weight_bits) for lp in plans)
        notes.append(f"size budget {cfg.size_budget:.1%}: {b:,.0f} of "
                     f"{caps['max_bytes']:,.0f} bytes predicted ({b / float32_bytes:.1%} of "
                     "the float32 weights)")
    if "max_energy_pj" in caps and prices is not None:
        e = caps["fixed_energy_pj"] + sum(prices.plan_pj(lp) for lp in plans)
        notes.append(f"energy budget {cfg.energy_budget:.1%} priced on {prices.design.name} "
                     f"(ZigZag, memory included): {e / 1e6:,.2f} of "
                     f"{caps['max_energy_pj'] / 1e6:,.2f} uJ predicted (the original on "
                     "the equal-area MAC-only baseline: "
                     f"{prices.reference_pj / 1e6:,.2f} uJ)")
        if prices.fallback_layers:
            notes.append("energy model: priced by the constants model (the engine could "
                         f"not map them): {', '.join(prices.fallback_layers)}")
    elif "max_energy_pj" in caps:
        e = caps["fixed_energy_pj"] + sum(lp.predicted_energy_pj(32, cfg.activation_bits)
                                          for lp in plans)
        notes.append(f"energy budget {cfg.energy_budget:.1%}: {e / 1e6:,.2f} of "
                     f"{caps['max_energy_pj'] / 1e6:,.2f} uJ predicted (ADDs at each layer's "
                     f"predicted W_b density)")
    return notes


def _bad_plan(reason: str) -> ConfigError:
    return ConfigError("plan_override", None, reason)


def apply_plan_override(plans: list[LayerPlan], override: dict, layers: list[PointwiseLayer],
                        ) -> list[LayerPlan]:
    """Per-layer overrides: {"layers": {name: {"critical": n | "critical_idx": [..], "r": r}}}.
    Raises :class:`ConfigError` with field ``plan_override`` (the caller names the file)."""
    by = {lp.name: lp for lp in plans}
    entries = override.get("layers", override)
    if not isinstance(entries, dict):
        raise _bad_plan("expected an object mapping layer names to settings")
    unknown = [n for n in entries if n not in by]
    if unknown:
        raise _bad_plan(f"unknown layer(s) {', '.join(unknown[:3])}; "
                        f"known: {', '.join(list(by)[:3])}, ...")
    for name, spec in entries.items():
        lp = by[name]
        if "critical_idx" in spec:
            idx = sorted({int(i) for i in spec["critical_idx"]})
            if idx and (idx[0] < 0 or idx[-1] >= lp.c_out):
                raise _bad_plan(f"{name}: critical_idx out of range 0..{lp.c_out - 1}")
            lp.critical_idx, lp.n_critical = idx, len(idx)
        elif "critical" in spec:
            n_c = int(spec["critical"])
            if not 0 <= n_c <= lp.c_out:
                raise _bad_plan(f"{name}: critical must be in 0..{lp.c_out}")
            lp.critical_idx = lp.critical_idx[:n_c] if n_c <= lp.n_critical else lp.critical_idx
            lp.n_critical = len(lp.critical_idx)
        if "r" in spec:
            lp.r = int(spec["r"])
        if lp.n_tolerant and lp.r < lp.n_tolerant:
            raise _bad_plan(f"{name}: r={lp.r} is below the {lp.n_tolerant} "
                            "tolerant filters (at least one hidden unit per filter)")
    return plans


def sensitivity_inputs(model: nn.Module, layers: list[PointwiseLayer],
                       data: CalibData | None, cfg: CompressConfig, seed: int | None = None):
    """Σ per layer (None without data), loss curves, output energies per filter and the
    layer input means (None without data)."""
    sig: dict[str, torch.Tensor | None] = {ly.name: None for ly in layers}
    means: dict[str, torch.Tensor | None] = {ly.name: None for ly in layers}
    if data is not None:
        seed = cfg.seed if seed is None else seed
        # Σ and the mean are sums: the sample's batches stream from disk, one in memory
        sample = data.sample(cfg.stats_images, seed=seed)
        st = collect_input_stats(model, [ly.name for ly in layers],
                                 (x for x, _ in sample.batches(64)), seed=seed)
        sig = {n: s.sigma for n, s in st.items()}
        means = {n: s.mean for n, s in st.items()}
    curves, energies, densities = {}, {}, {}
    with progress.task("sensitivity", len(layers)) as t:
        for ly in layers:
            w = layer_weight(model, ly.name).float()
            s = sig[ly.name]
            if cfg.method == "hybrid" and cfg.critical_fraction != 0.0:
                curves[ly.name], densities[ly.name] = loss_curves(w, s, cfg.budgets,
                                                                  with_density=True)
            else:  # no filter is ranked: TWN/StrassenNets everywhere need no curves
                curves[ly.name] = torch.zeros(w.shape[0], len(cfg.budgets))
                densities[ly.name] = torch.full_like(curves[ly.name], 0.7)
            energies[ly.name] = ((w.double() @ s) * w.double()).sum(1) if s is not None else \
                w.double().pow(2).sum(1)
            t.advance(1, info=ly.name)
    return sig, curves, energies, densities, means


def compress(model: nn.Module, info: ModelInfo, data: CalibData | None, cfg: CompressConfig,
             checkpoint: str | None = None, resume: bool = False,
             plan_override: dict | None = None, dry_run: bool = False,
             after_stage: Callable[[str, State], None] | None = None,
             ) -> tuple[nn.Module | None, dict[str, Any]]:
    """Run the pipeline; returns (deploy-form hybrid model, metadata). ``dry_run`` stops
    after planning and returns (None, metadata with the plan). ``after_stage(name,
    state)`` sees the network after each building stage (a per-stage ablation); it must
    not change it."""
    validate_config(cfg, data is not None)
    torch.manual_seed(cfg.seed)
    from . import stages as S

    # the caller's model is never touched: every stage reads a private eval-mode copy (no
    # training flag, device move, hook, attribute or transient weight change leaks back)
    model = copy.deepcopy(model).eval()
    if cfg.finetune.trainable != "all" and data is not None and cfg.finetune.steps != 0 \
            and not trainable_parameters(model, cfg.finetune.trainable):
        # before any work, not after the fit
        raise ConfigError("trainable", cfg.finetune.trainable, "the model has no "
                          "normalization layer parameters to train (BatchNorm folded?)")
    t0 = time.perf_counter()
    st = _initial_state(model, info, data, cfg, checkpoint, resume, plan_override)
    helper = distributed.active() and not distributed.is_main()
    if helper and (dry_run or not any(
            s.name in S.COLLECTIVE for s in S.stages_for(cfg, st.train is not None,
                                                         S.finetune_config(st).steps))):
        # a torchrun rank other than 0 exists for the fine-tune's collectives; with none
        # to share, rank 0 converts alone
        return None, {"rank": {"rank": distributed.rank(), "ran": [], "skipped": "all"}}
    st = S.run(st, S.planning_stages(cfg, st.train is not None))
    _record_plan(st, data)
    if dry_run:
        return None, st.meta
    _prepare_build(st)
    post = S.stages_for(cfg, st.train is not None, st.finetune.steps)
    if helper:  # rank 0 alone runs what follows the last fine-tune, and writes
        return _helper_rank(st, post)
    st = S.run(st, post, after=after_stage)
    t = time.perf_counter()
    st = S.finish(st)
    st.timings["finish_s"] = time.perf_counter() - t
    S.close_timings(st.timings, time.perf_counter() - t0)
    st.meta["timings"] = st.timings
    return st.hybrid, st.meta


def _initial_state(model: nn.Module, info: ModelInfo, data: CalibData | None,
                   cfg: CompressConfig, checkpoint: str | None, resume: bool,
                   plan_override: dict | None) -> State:
    """The stages' state before any stage: the layers to convert, the training and
    held-apart splits of ``data``, the original's cost."""
    from . import stages as S

    layers = select_layers(find_pointwise(model, info.resolution, info.source or "model",
                                          parse_kinds(cfg.layer_kinds, "layer_kinds")),
                           cfg.include, cfg.exclude, info.source or "model")
    held: HeldBatches | list[torch.Tensor] = []
    train = data
    if data is not None and len(data) >= 20:
        train, held_data = data.split(cfg.held_fraction, seed=cfg.seed,
                                      count=held_count(len(data), cfg))
        held = HeldBatches(held_data.sample(512, seed=0), 64)  # at most 512 checked
    return S.State(model, info, cfg, layers, train, held, model_cost(model, info.resolution),
                   checkpoint=checkpoint, resume=resume, plan_override=plan_override)


def _record_plan(st: State, data: CalibData | None) -> None:
    """The configuration, plan and planning inputs into ``st.meta`` (all a dry run
    returns)."""
    assert st.plan is not None
    st.meta.update({
        "config": st.cfg.to_dict(), "plan": st.plan.to_dict(),
        "sensitivity": {n: c.tolist() for n, c in st.curves.items()},
        "budgets": list(st.cfg.budgets), "fragility": st.fragility,
        "layers": [ly.to_dict() for ly in st.layers],
        "calibration": None if data is None else {"source": data.source, "n_images": len(data),
                                                   "held_images": n_held(st.held)},
    })


def _prepare_build(st: State) -> None:
    """Before the building stages: the fine-tune's step count, the resume identity of its
    checkpoint, and the arithmetic the model is built for."""
    from . import stages as S

    cfg = st.cfg
    S.resolve_finetune(st)
    if st.train is not None and st.checkpoint:
        st.identity = resume_identity(cfg, st.plan, st.train)
    st.meta["weight_bits"] = cfg.weight_bits
    st.meta["activation_bits"] = cfg.activation_bits
    if cfg.activation_bits == 8:
        st.meta["hidden_bits"] = cfg.hidden_bits


def _helper_rank(st: State, post: list) -> tuple[nn.Module | None, dict[str, Any]]:
    """A torchrun rank other than 0: ``post`` up to the last fine-tune (its collectives
    need the same network as rank 0's), nothing written."""
    from . import stages as S

    post, skipped = S.helper_rank_steps(post)
    st = S.run(st, post)
    st.meta["rank"] = {"rank": distributed.rank(), "ran": [s.name for s in post],
                       "skipped": [*skipped, "finish"]}
    st.meta["stages"] = st.log
    st.meta["timings"] = st.timings
    return st.hybrid, st.meta


def _bn_stage(model: nn.Module, hybrid: nn.Module, layers: list[PointwiseLayer],
              train: CalibData | None, cfg: CompressConfig, meta: dict, timings: dict,
              stages: list, held: list, seed: int) -> None:
    """Adjust BatchNorm statistics of ``hybrid`` (bnadjust.py) on training-split images,
    or record in ``meta["bn_adjust_skipped"]`` why there was nothing to do."""
    if train is None:
        meta["bn_adjust_skipped"] = "no calibration images"
        progress.warn("BN adjustment needs calibration images; skipped")
        return
    t = time.perf_counter()
    batches = _batches(train, cfg.bn_images, seed=seed)
    names = bn_targets(model, batches[0][:2], [ly.name for ly in layers], cfg.bn_scope)
    if not names:
        meta["bn_adjust_skipped"] = ("no BatchNorm after the pointwise layers (BN folded into "
                                     "the convolutions?)" if cfg.bn_scope == "pointwise"
                                     else "model has no BatchNorm with running statistics")
        progress.info(f"  BN stage skipped: {meta['bn_adjust_skipped']}")
        return
    info: dict[str, Any] = {"mode": cfg.bn_adjust, "scope": cfg.bn_scope, "layers": names,
                            "images": sum(x.shape[0] for x in batches)}
    if cfg.bn_adjust == "match":
        info["log_var_ratio_before"] = match_bn(model, hybrid, names, batches)
    else:
        reestimate_bn(hybrid, names, batches)
    timings["bn_adjust_s"] = time.perf_counter() - t
    meta["bn_adjust"] = info
    _stage(stages, f"bn_{cfg.bn_adjust}", hybrid, model, held, timings["bn_adjust_s"],
           cfg.finetune.device)


def _min_recon_images(layers: list[PointwiseLayer], cfg: CompressConfig) -> int:
    """Images needed for well-posed per-layer least squares: 8 sampled rows per input
    channel of the widest layer (measured: MobileNetV2 with 22 synthetic images lost
    0.14 top-1 to reconstruction that the one-shot fit alone kept)."""
    widest = max((ly.c_in for ly in layers), default=1)
    return -(-8 * widest // max(cfg.per_image, 1))


def _enough_for_reconstruction(train: CalibData, layers: list[PointwiseLayer],
                               cfg: CompressConfig) -> bool:
    return min(len(train), cfg.recon_images) >= _min_recon_images(layers, cfg)


@torch.no_grad()
def bank_losses(hybrid: nn.Module, model: nn.Module, names: list[str],
                sig: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Relative loss of each tolerant bank against the original rows, in the Σ metric of
    the original layer input (the L of METHOD.md §3 for the whole bank)."""
    out = {}
    for name in names:
        h = hybrid.get_submodule(name)
        if not is_hybrid(h) or h.n_tolerant == 0:
            continue
        w = layer_weight(model, name).double()[h.tolerant_idx]
        wh = h.effective_weight().detach().double()[h.tolerant_idx]
        s = sig.get(name)
        d = wh - w
        if s is None:
            out[name] = float(d.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        else:
            s = s.double()
            out[name] = float(((d @ s) * d).sum() / ((w @ s) * w).sum().clamp_min(1e-30))
    return out


@torch.no_grad()
def output_errors(model: nn.Module, hybrid: nn.Module, names: list[str],
                  images: list[torch.Tensor], observe_at: dict[str, str] | None = None,
                  ) -> dict[str, float]:
    """‖y_hybrid − y_original‖² / ‖y_original‖² at each layer's output, end to end (the
    hybrid layer sees the hybrid network's inputs: compounding included). ``observe_at``
    maps a layer to the module whose output stands for it in both networks (the BN after
    a layer whose BN was folded into it). Per batch only the original's outputs are kept
    (copies: a later in-place op of the network cannot change them); each hybrid output is
    compared as it is produced (keeping both networks' outputs of every layer cost 2.8 MB
    per image on MobileNetV1-0.5-160)."""
    observe_at = observe_at or {}
    if not images:
        return {}
    acc: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}

    def grab(store: dict, n: str):
        def hook(_m, _i, out):
            store[n] = out.detach().to("cpu", copy=True)
        return hook

    def compare(ref: dict, errs: dict, n: str):
        def hook(_m, _i, out):  # a module run twice: its last output counts, as ref's
            got, r = out.detach().cpu(), ref[n]
            errs[n] = (float((got - r).pow(2).sum()), float(r.pow(2).sum()))
        return hook

    def run(net: nn.Module, x: torch.Tensor, hook_of) -> None:
        hs = [net.get_submodule(observe_at.get(n, n)).register_forward_hook(hook_of(n))
              for n in names]
        try:
            net.eval()
            net(x.to(_device_of(net)))
        finally:
            for h in hs:
                h.remove()

    for x in images:
        ref: dict[str, torch.Tensor] = {}
        errs: dict[str, tuple[float, float]] = {}
        run(model, x, functools.partial(grab, ref))
        run(hybrid, x, functools.partial(compare, ref, errs))
        for n in names:
            acc[n][0] += errs[n][0]
            acc[n][1] += errs[n][1]
        ref.clear()
        release_freed()
    return {n: a / max(b, 1e-30) for n, (a, b) in acc.items()}


def _orig_pair_stats(w: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor,
                     mean: torch.Tensor) -> PairStats:
    """PairStats of (x, W x + b) from the original input's uncentered second moment Σ
    and mean μ: E[x yᵀ] = Σ Wᵀ + μ bᵀ, E[y] = W μ + b. The fit then works in the centered
    Σ and the bias correction moves the bias by (W − Ŵ) μ."""
    w, b, mu = w.double(), b.double(), mean.double()
    return PairStats(sigma.double(), sigma.double() @ w.T + torch.outer(mu, b), mu,
                     w @ mu + b, 1)


def held_evaluator(teacher: nn.Module, held: list[torch.Tensor]):
    """student -> (held-apart KL, agreement), as :func:`held_kl` and :func:`agreement`
    compute them, with the teacher's logits computed once (the early-stopping checks run
    every few steps). The teacher's logits are computed at the first call: under torchrun
    only rank 0 calls it."""
    t_log: list[torch.Tensor] = []
    ds = None

    @torch.no_grad()
    def evaluate(student: nn.Module) -> tuple[float, float]:
        nonlocal ds
        if not t_log:
            t_log.extend(torch.log_softmax(t.double(), 1)
                         for _, t in _paired_logits(teacher, teacher, held))
        student.eval()
        ds = _device_of(student)
        kl, hit, n = 0.0, 0, 0
        for x, lt in zip(held, t_log, strict=True):
            s = student(x.to(ds)).cpu()
            ls = torch.log_softmax(s.double(), 1)
            kl += float((lt.exp() * (lt - ls)).sum())
            hit += int((s.argmax(1) == lt.argmax(1)).sum())
            n += s.shape[0]
        return kl / max(n, 1), hit / max(n, 1)

    return evaluate


def _guarded_finetune(hybrid: nn.Module, model: nn.Module, train: CalibData, held: list,
                      ft: FinetuneConfig, checkpoint: str | None, resume: bool,
                      info: ModelInfo, meta: dict, timings: dict, stages: list, stage: str,
                      teacher_at: dict[str, str] | None = None,
                      identity: dict[str, Any] | None = None) -> nn.Module:
    """Distill with early stopping on the held-apart KL (checked every ``eval_every``
    steps; the best state checked is shipped), and never ship a fine-tune that made the
    held-apart images worse: when no check beat the model from before it, that model
    comes back (``meta["finetune_reverted"]``)."""
    t = time.perf_counter()
    before = copy.deepcopy(hybrid) if held else None  # training form, latents included
    with progress.task("fine-tune", ft.steps) as bar:
        log = finetune(hybrid, model, train.images, train.labels, normalizer(train), ft,
                       checkpoint, resume, label_offset=info.label_offset,
                       on_step=lambda s, lo, ag: bar.advance(
                           1, info=f"loss {lo:.4f} agree {ag:.2f}"), teacher_at=teacher_at,
                       identity=identity,
                       evaluate=held_evaluator(model, held) if held else None)
    meta["finetune_log"] = log.to_dict()
    if held and before is not None and log.held_kl:
        curve = dict(zip(log.eval_steps, log.held_kl, strict=True))
        kl_before, kl_after = curve.get(0), log.held_kl[-1]
        meta["finetune_held_kl"] = {"before": kl_before, "after": kl_after,
                                    "best": curve.get(log.best_step),
                                    "best_step": log.best_step,
                                    "stopped_early_at": log.stopped_early_at}
        if log.best_step == 0 and len(log.held_kl) > 1:
            hybrid = before
            meta["finetune_reverted"] = (
                f"held-apart KL never fell below the fit's {kl_before:.4g} (last "
                f"{kl_after:.4g}); kept the fit")
            progress.warn(f"fine-tuning made the held-apart images worse (KL "
                          f"{kl_before:.4g} -> {kl_after:.4g}); kept the model before it")
    timings["finetune_s"] = time.perf_counter() - t
    _stage(stages, stage, hybrid, model, held, timings["finetune_s"], ft.device)
    return hybrid


def on_device(net: nn.Module, device: str | torch.device | None) -> nn.Module:
    """``net`` when it is on ``device`` already (or none is asked for), else a copy there
    to read from: ``--device`` moves copies, never the networks the stages build."""
    if device is None:
        return net
    from .distill import _on_device

    dev = distributed.device_for(str(device))
    return net if _on_device(net, dev) else copy.deepcopy(net).to(dev)


def _stage(stages: list, name: str, hybrid: nn.Module, model: nn.Module, held: list,
           seconds: float, device: str | torch.device | None = None) -> None:
    """Log stage ``name`` with the agreement of ``hybrid`` and ``model`` on the held-apart
    images, computed on ``device`` (copies)."""
    # torchrun ranks other than 0 print and ship nothing: no agreement checks for them
    ag = agreement(on_device(hybrid, device), on_device(model, device), held) \
        if held and distributed.is_main() else None
    stages.append({"stage": name, "agreement": ag, "seconds": round(seconds, 3)})
    if ag is not None:
        progress.info(f"  after {name}: agreement with original {ag:.4f} ({seconds:.1f} s)")
