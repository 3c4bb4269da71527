"""Longer fine-tuning of a finished compressed model (``hfbconvert finetune``).

``compress`` fine-tunes briefly on the calibration images (a few hundred steps, the
ternary codes kept). A user with time and a labelled training set can take the result
further: distillation from the original (logits and every hybrid layer's output, as in
compress) plus cross-entropy on the labels, optionally learning the ternary codes too
(latent codes with straight-through rounding, :mod:`.hybrid`). A seeded held-apart split
of the training data gives the curve (held KL, agreement with the original, top-1) that
early stopping reads; the best state checked ships, the input artifact is never touched.

Everything distributed, resumable and deterministic comes from :func:`.finetune.finetune`
(DDP under torchrun, checkpoints refusing a changed configuration, batches a function of
(seed, step)); this module only prepares the student, the held split and the metadata.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfbconvert.calib.readers import CalibData

from . import distributed, progress
from .costs import model_cost
from .distill import STOP_ON, FinetuneConfig, FinetuneLog, finetune, fingerprint
from .errors import InputError
from .handlers import is_hybrid
from .metrics import wilson_interval
from .models.info import ModelInfo
from .pipeline import _batches, normalizer
from .weightquant import apply_weight_bits, input_moments

# fewer held-apart images than this and the curve's agreement is noise (95% interval
# +-0.07 at 200); the split takes held_fraction of the data, raised towards this
MIN_HELD = 200


@dataclass(frozen=True)
class RetrainConfig:
    """Options of ``hfbconvert finetune`` that decide the result (all recorded in the
    artifact and in the checkpoint)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    latent_lr: float = 2e-3
    label_weight: float = 1.0
    temperature: float = 1.0
    feature_weight: float = 1.0
    learn_codes: bool = False
    held_fraction: float = 0.1
    eval_every: int = 25
    patience: int = 3
    # FinetuneConfig.stop_from; 0.5 here, not compress's 1.0: a run of epochs is long, and
    # stopping it early is what saves the hours (not measured on a run that long here)
    stop_from: float = 0.5
    lr_backoff: int = 2  # FinetuneConfig.lr_backoff
    trainable: str = "all"  # FinetuneConfig.trainable
    warmup: int = 10
    seed: int = 0
    # what early stopping and the shipped state follow (distill.FinetuneConfig.stop_on);
    # "auto": the training objective ("loss") when labels are weighted, else "kl"
    stop_on: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) \
                or self.epochs < 1:
            raise InputError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.held_fraction, float | int)
                and 0.0 < self.held_fraction < 1.0):
            raise InputError(f"held_fraction must be in (0, 1), got {self.held_fraction!r}")
        if self.stop_on not in ("auto", *STOP_ON):
            raise InputError(f"stop_on must be one of auto, {', '.join(STOP_ON)}, got "
                             f"{self.stop_on!r}")

    @property
    def stop_rule(self) -> str:
        """``stop_on`` resolved: with labels weighted the student is meant to move away
        from the teacher, so its held KL is the wrong thing to keep low."""
        if self.stop_on != "auto":
            return self.stop_on
        return "loss" if self.label_weight > 0 else "kl"


def steps_for(n_train: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` passes: each step draws a seeded random batch (with
    replacement, as compress's fine-tune does), so an "epoch" is as many samples as
    training images, not a permutation."""
    return epochs * math.ceil(n_train / batch_size)


def unfreeze_codes(model: nn.Module) -> int:
    """Deploy form -> training form for every hybrid layer: latents start exactly at the
    codes (rounding gives them back unchanged), so the function is the same until a
    latent crosses ±0.5. Returns how many layers were unfrozen."""
    n = 0
    for m in model.modules():
        if is_hybrid(m) and m.frozen:
            m.wb_latent = nn.Parameter(m.wb_codes.float().clone())
            m.wc_latent = nn.Parameter(m.wc_codes.float().clone())
            m.frozen = False
            n += 1
    return n


def code_counts(model: nn.Module) -> dict[str, int]:
    """Non-zero ternary codes (ADDs per output pixel, roughly) over all hybrid layers."""
    nz = tot = 0
    for m in model.modules():
        if is_hybrid(m):
            for t in (m.wb_codes, m.wc_codes):
                nz += int((t != 0).sum())
                tot += t.numel()
    return {"nonzero": nz, "total": tot}


def check_labels(data: CalibData, info: ModelInfo, what: str) -> None:
    """Labels present and inside the model's classes (one line naming ``what``)."""
    if data.labels is None:
        raise InputError(f"{what}: no labels (expected class sub-folders named as the "
                         "model's classes, or an .npz with 'labels')")
    n = int(info.num_classes) - int(info.label_offset)
    hi, lo = int(data.labels.max()), int(data.labels.min())
    if lo < 0 or hi >= n:
        raise InputError(f"{what}: labels span {lo}..{hi} but the model has {n} classes "
                         "(the class folders do not match the model's classes)")


def held_evaluator(teacher: nn.Module, held: CalibData, label_offset: int,
                   batch_size: int = 256) -> Callable[[nn.Module], tuple[float, ...]]:
    """student -> (mean KL(teacher||student), agreement, top-1 or None, mean
    cross-entropy with the labels or None) on ``held``; the teacher's log-probabilities
    are computed once."""
    t_log: list[torch.Tensor] = []  # at the first call: under torchrun rank 0 alone calls

    @torch.no_grad()
    def evaluate(student: nn.Module) -> tuple[float, float, float | None, float | None]:
        if not t_log:  # the images are read again per check: memory flat in their number
            teacher.eval()
            dev_t = next(iter(teacher.parameters()), torch.zeros(())).device
            t_log.extend(torch.log_softmax(teacher(x.to(dev_t)).cpu().double(), 1)
                         for x, _ in held.batches(batch_size))
        student.eval()
        dev = next(iter(student.parameters()), torch.zeros(())).device
        kl, ce, hit, right, n = 0.0, 0.0, 0, 0, 0
        for (x, y), lt in zip(held.batches(batch_size), t_log, strict=True):
            s = student(x.to(dev)).cpu()
            ls = torch.log_softmax(s.double(), 1)
            kl += float((lt.exp() * (lt - ls)).sum())
            pred = s.argmax(1)
            hit += int((pred == lt.argmax(1)).sum())
            if y is not None:
                right += int((pred == y + label_offset).sum())
                ce -= float(ls.gather(1, (y + label_offset).long()[:, None]).sum())
            n += s.shape[0]
        labelled = held.labels is not None
        return (kl / max(n, 1), hit / max(n, 1), right / max(n, 1) if labelled else None,
                ce / max(n, 1) if labelled else None)

    return evaluate


def _teacher_at(meta: dict[str, Any]) -> dict[str, str]:
    """A BN folded into a student layer: match that layer at the teacher's BN output."""
    return {str(a): str(b) for a, b in (meta.get("bn_folded") or [])}


def retrain(student: nn.Module, info: ModelInfo, meta: dict[str, Any], teacher: nn.Module,
            data: CalibData, cfg: RetrainConfig, *, device: str = "cpu",
            checkpoint: str | None = None, checkpoint_every: int = 50, resume: bool = False,
            source: str = "compressed model") -> tuple[nn.Module, dict[str, Any], FinetuneLog]:
    """Fine-tune a copy of ``student`` (a loaded artifact's deploy-form model); returns
    (deploy-form model, new metadata, log). ``student`` and ``teacher`` are left as given."""
    _check_retrainable(meta, info, data, source)
    run = _prepare(student, teacher, data, cfg, device, checkpoint_every)
    evaluate = held_evaluator(run.teacher, run.held, info.label_offset)
    progress.info(f"fine-tune: {len(run.train)} training images, {len(run.held)} held apart, "
                  f"{cfg.epochs} epoch(s) = {run.ft.steps} steps of {cfg.batch_size}"
                  + (", learning the ternary codes" if cfg.learn_codes else ""))
    with progress.task("fine-tune", run.ft.steps) as bar:
        log = finetune(run.model, run.teacher, run.train.images, run.train.labels,
                       normalizer(run.train), run.ft, checkpoint, resume,
                       label_offset=info.label_offset,
                       on_step=lambda s, lo, ag: bar.advance(
                           1, info=f"loss {lo:.4f} agree {ag:.2f}"),
                       teacher_at=_teacher_at(meta), identity=run.identity, evaluate=evaluate)
    if distributed.active() and not distributed.is_main():
        return run.model, {"rank": distributed.rank()}, log  # rank 0 evaluates and writes
    new = _retrained_meta(meta, info, cfg, run, log, evaluate, data.source)
    _refresh_layer_errors(new, run.model, run.teacher, run.train, run.held, cfg.seed)
    return run.model, new, log


def _check_retrainable(meta: dict[str, Any], info: ModelInfo, data: CalibData,
                       source: str) -> None:
    """Refuses an int8 artifact, and data without labels or too small to hold some apart."""
    if meta.get("activation_bits", 32) == 8:
        raise InputError(f"{source}: has int8 activations; fine-tuning such an artifact is "
                         "not supported (fine-tune the float artifact, then compress with "
                         "{ab} 8)", ab="activation_bits")
    check_labels(data, info, data.source or "data")
    if len(data) < 10:
        raise InputError(f"{data.source or 'data'}: {len(data)} image(s); need at least 10 "
                         "(some are held apart for the curve and early stopping)")


@dataclass
class _Run:
    """What one fine-tune works on: copies of the models (the caller's stay as given),
    the seeded training / held-apart split, the schedule, and what the checkpoint must
    match to be resumed (``identity``)."""

    model: nn.Module
    teacher: nn.Module
    train: CalibData
    held: CalibData
    ft: FinetuneConfig
    codes_before: dict[str, int]
    identity: dict[str, Any]


def _prepare(student: nn.Module, teacher: nn.Module, data: CalibData, cfg: RetrainConfig,
             device: str, checkpoint_every: int) -> _Run:
    """Split the data (at least ``MIN_HELD`` held apart when there are enough images),
    derive the fine-tune schedule from the epochs, copy the models (codes unfrozen with
    ``learn_codes``)."""
    count = max(1, round(cfg.held_fraction * len(data)), min(MIN_HELD, len(data) // 5))
    train, held = data.split(cfg.held_fraction, seed=cfg.seed, count=count)
    steps = steps_for(len(train), cfg.epochs, cfg.batch_size)
    ft = FinetuneConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        latent_lr=cfg.latent_lr, freeze_at=1.0 if cfg.learn_codes else 0.0,
                        temperature=cfg.temperature, label_weight=cfg.label_weight,
                        feature_weight=cfg.feature_weight, warmup=min(cfg.warmup, steps),
                        seed=cfg.seed, checkpoint_every=checkpoint_every,
                        eval_every=cfg.eval_every, patience=cfg.patience,
                        stop_from=cfg.stop_from, lr_backoff=cfg.lr_backoff,
                        trainable=cfg.trainable,
                        stop_on=cfg.stop_rule, device=device)
    model = copy.deepcopy(student).eval()
    codes_before = code_counts(model)
    identity = {"command": "finetune", "epochs": cfg.epochs, "learn_codes": cfg.learn_codes,
                "held_fraction": cfg.held_fraction,
                "input model": fingerprint(model.state_dict().items()),
                "held images": fingerprint([("images", held.images),
                                            ("labels", held.labels)])}
    if cfg.learn_codes:
        unfreeze_codes(model)
    return _Run(model, copy.deepcopy(teacher).eval(), train, held, ft, codes_before, identity)


def _rounding_moments(model: nn.Module, meta: dict[str, Any], train: CalibData,
                      ) -> dict[str, torch.Tensor] | None:
    """The input moments for error-feedback int8 rounding when the artifact was rounded
    that way (``weight_rounding`` "gptq"; artifacts from before it rounded to nearest),
    on the compress stage's number of training images."""
    cfg = meta.get("config") or {}
    if int(meta.get("weight_bits", 32)) != 8 or cfg.get("weight_rounding") != "gptq":
        return None
    n = min(len(train), int(cfg.get("act_calib_images", 128)))
    seed = int(cfg.get("seed", 0))
    return input_moments(model, _batches(train, n, seed=seed), seed=seed)


def _retrained_meta(meta: dict[str, Any], info: ModelInfo, cfg: RetrainConfig, run: _Run,
                    log: FinetuneLog, evaluate: Callable[[nn.Module], tuple[float, ...]],
                    data_source: str) -> dict[str, Any]:
    """The artifact's metadata after the fine-tune: the trained weights rounded back to
    the artifact's weight bits (in ``run.model``), then the curve, the final held-apart
    figures and the cost of what ships."""
    model, train, held = run.model, run.train, run.held
    bits = int(meta.get("weight_bits", 32))
    new = copy.deepcopy(meta)
    if bits < 32:  # the trained weights back at the artifact's storage precision
        new["weight_quant"] = apply_weight_bits(model, bits, moments=_rounding_moments(
            model, meta, train))
    final = evaluate(model)  # what ships, after rounding
    curve = {"steps": list(log.eval_steps), "held_kl": list(log.held_kl),
             "held_agreement": list(log.held_agreement), "held_top1": list(log.held_top1),
             "held_ce": list(log.held_ce)}
    new["finetune_curve"] = {
        **curve, "epochs": cfg.epochs, "steps_planned": run.ft.steps,
        "steps_run": len(log.steps), "best_step": log.best_step,
        "stopped_early_at": log.stopped_early_at, "stop_on": run.ft.stop_on,
        "lr_cuts": list(log.lr_cuts),
        "learn_codes": cfg.learn_codes,
        "train_images": len(train), "held_images": len(held), "data": data_source,
        "config": {k: v for k, v in run.ft.to_dict().items()
                   if k not in ("device", "checkpoint_every")},
        "final": {"held_kl": final[0], "held_agreement": final[1], "held_top1": final[2],
                  "held_ce": final[3]},
        "codes_before": run.codes_before, "codes_after": code_counts(model),
        "world_size": log.world_size}
    new["stages"] = [*(meta.get("stages") or []),
                     {"stage": f"finetune_cmd_{len(log.steps)}", "agreement": final[1]}]
    n_held = len(held)
    k = round(final[1] * n_held)
    new["final_agreement"] = final[1]  # now on this run's held split
    new["final_agreement_interval"] = {"n": n_held, "agree": k,
                                       "ci95": list(wilson_interval(k, n_held))}
    new["cost"] = model_cost(model, info.resolution).to_dict()
    return new


def _refresh_layer_errors(meta: dict[str, Any], model: nn.Module, teacher: nn.Module,
                          train: CalibData, held: CalibData, seed: int) -> None:
    """``layer_errors`` of the fine-tuned model, replacing compress's (which describe the
    model before this fine-tune): each bank's loss in the Σ metric of the original layer
    input (Σ from a seeded sample of this run's training images, as many as compress
    used) and each layer's output error on this run's held-apart images. The fit's
    ``bank_loss_before_ft`` is history and stays; ``calibration`` says what it
    describes now."""
    from .pipeline import HeldBatches, bank_losses, output_errors
    from .stages import stage_seed
    from .stats import collect_input_stats

    old = meta.get("layer_errors") or {}
    names = [n for n in old if _has(model, n)]
    if not names:
        return
    n_stats = int((meta.get("config") or {}).get("stats_images", 256))
    sample = train.sample(n_stats, seed=stage_seed(seed, "finetune_layer_errors"))
    stats = collect_input_stats(teacher, names, (x for x, _ in sample.batches(64)),
                                seed=stage_seed(seed, "finetune_layer_errors"))
    sig = {n: stats[n].sigma if n in stats else None for n in names}
    banks = bank_losses(model, teacher, names, sig)
    out = output_errors(teacher, model, names, HeldBatches(held, 256), _teacher_at(meta))
    meta["layer_errors"] = {
        n: {**old[n], "bank_loss_after_ft": banks.get(n), "output_rel_err": out.get(n)}
        for n in old}
    meta["layer_errors_measured"] = {
        "after": "finetune command", "data": train.source or held.source,
        "sigma_images": len(sample), "held_images": len(held)}
    if isinstance(meta.get("calibration"), dict):
        meta["calibration"] = {
            **meta["calibration"],
            "describes": "the compress run (planning, fit, its fine-tune); layer_errors, "
                         "final_agreement and cost are from the later finetune command"}


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
