"""Brief knowledge-distillation fine-tuning of a hybrid model against the original.

Deterministic and resumable: the batch and augmentation of step s depend only on
(seed, s), and a checkpoint holds the student, optimizer and step, so a run that is
killed and resumed ends bit-identical to one that was not. The checkpoint also records
what the result depends on (options, teacher weights, training images, student layout), and
a resume with anything else is refused: it would otherwise continue one run's weights under
another run's options.

By default the ternary codes stay as the fit chose them (``freeze_at`` 0) and only the
continuous parameters learn: ``a``, biases, the critical rows and every layer outside the
banks (stem, depthwise convs, classifier). Measured on MobileNetV1-0.5-160 (budget 0.536,
2,000 calibration images, 1,300 val images; fit alone 71.85 top-1): 300 steps at lr 1e-4
gave 72.77 with every continuous parameter trained, 71.69 with only the hybrid layers'
parameters; lr 3e-4 72.46, lr 1e-3 66.92. Learning the codes too (StrassenNets' two phases,
``freeze_at`` > 0, latent codes with straight-through rounding) never beat the fit on a CPU
budget: flipped codes undo the fit and change the ADD count the plan was made for.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, progress
from .errors import CheckFailed, ConfigError, InputError
from .fileio import load_torch, save_torch
from .handlers import hybrid_modules

# ``steps=None`` ("auto", the default of compress): as many steps as 300 batches of 32 on
# MobileNetV1-0.5-160 cost in student MACs (measured there: +0.9 top-1 over the fit), at most
# 300 and at most AUTO_EPOCHS passes over the training images (more overfits a small set)
AUTO_MAX_STEPS = 300
AUTO_EPOCHS = 6
AUTO_MACS = 300 * 32 * 76_530_000


def auto_steps(macs_per_image: int, n_images: int, batch_size: int) -> int:
    """Fine-tuning steps of the "auto" schedule: bounded compute (so a 300 M-MAC model gets
    a quarter of the steps a 76 M-MAC one does), bounded epochs. ``trainable="norm"`` gets
    the same: twice the steps left MobileNetV2's int8 top-1 and KL within noise on three
    seeds (bench/results/recheck/v2-int8-norm-steps152-vs-auto-20261204.txt)."""
    if n_images <= 0 or macs_per_image <= 0:
        return 0
    by_compute = AUTO_MACS // (macs_per_image * batch_size)
    by_epochs = AUTO_EPOCHS * math.ceil(n_images / batch_size)
    return int(min(AUTO_MAX_STEPS, by_compute, by_epochs))


TRAINABLE = ("all", "norm", "bias")
STOP_ON = ("kl", "loss", "top1")

# An lr too high for a model shows as the training objective rising while it is trained on:
# MobileNetV2 at lr 1e-4, mean loss per 4 steps 0.039 -> 0.071 -> 0.111 -> 0.224 and held KL
# 0.028 -> 0.147; at 3e-5 the loss rises less (0.034 -> 0.057), at 1e-5 the held KL stays
# level (bench/results/finetune-probe-v2.json). MobileNetV1-0.5-160 at 1e-4: the loss per
# 25 steps falls (0.085, 0.084, 0.077, ...) while its held KL rises for the first checks
# (finetune-probe-v1.json), so the held KL alone cannot tell the two apart; the loss can.
# When the last ``eval_every`` steps' mean loss is above BACKOFF_RISE x the mean of the
# first ``eval_every`` steps (since the start or the last cut) at a check that is no new
# best, the run goes back to the best state checked and continues at BACKOFF_FACTOR x lr.
BACKOFF_RISE = 1.5
BACKOFF_FACTOR = 0.1


def loss_rise(loss: Sequence[float], since: int, done: int, window: int) -> float | None:
    """Mean training loss of steps [done - window, done) over that of [since, since +
    window); None until two whole windows lie in [since, done) (``loss[i]``: step i's)."""
    if window <= 0 or done - since < 2 * window or len(loss) < done:
        return None
    first = sum(loss[since:since + window]) / window
    last = sum(loss[done - window:done]) / window
    return last / first if first > 0 and math.isfinite(last / first) else None


@dataclass
class FinetuneConfig:
    steps: int | None = 300  # None: auto_steps (resolved by compress)
    batch_size: int = 32
    lr: float = 1e-4  # full-precision parameters and `a`
    latent_lr: float = 2e-3  # latent ternary codes (threshold ±0.5)
    freeze_at: float = 0.0  # fraction of steps after which codes are frozen (0: from start)
    temperature: float = 1.0
    label_weight: float = 0.0  # cross-entropy weight when labels exist
    feature_weight: float = 1.0  # weight of the per-layer feature-map distillation term
    flip: bool = True
    warmup: int = 10
    seed: int = 0
    checkpoint_every: int = 50
    # early stopping on the held-apart KL (when the caller gives an evaluator): checked
    # every ``eval_every`` steps (0: only before and after), stop after ``patience``
    # checks in a row above the best, ship the best state checked
    eval_every: int = 25
    patience: int = 3
    # no early stop before this fraction of the steps (1.0: never; the best state checked
    # is shipped either way): the first steps at full lr raise the held KL, and it falls
    # only as the lr decays. MobileNetV1-0.5-160 at lr 1e-4: 300 steps, KL 0.055 (fit) ->
    # 0.076 at step 50 -> 0.039 at step 300 (bench/results/finetune-probe-v1.json); 150
    # steps (compress's auto on 1,000 images), 0.054 -> 0.085 at 25 -> 0.044 at 150
    # (recheck/v1-stop-from-20261203.json). Stopping after 3 checks from the first (the old
    # rule) shipped the fit in both, and 0.5 still did at 150 steps
    stop_from: float = 1.0
    # what the checks rank states by: "kl" (KL to the teacher on the held-apart images),
    # "loss" (the training objective's output terms there, at temperature 1: KL +
    # label_weight x cross-entropy with the labels) or "top1" (held-apart top-1). With
    # labels the student is pulled away from the teacher on purpose, so its KL rises as
    # its accuracy does: ranking by KL shipped the input after a CIFAR-10 epoch that raised
    # held top-1 from 93.34 to 93.58 % (bench/results/finetune-cmd-c10-epoch.json)
    stop_on: str = "kl"
    # times the lr may be cut (x BACKOFF_FACTOR, from the best state checked) when the
    # training loss rises while being trained on; 0: never (needs held-apart checks)
    lr_backoff: int = 2
    # which parameters are trained: "all" continuous ones, or "norm" (the normalization
    # layers' affine parameters alone). Measured on MobileNetV2 (BatchNorm unfolded),
    # 12-step probes from one fit: every other parameter set raised the held-apart KL at
    # lr 3e-5 (all 0.028 -> 0.042), BatchNorm alone lowered it (0.028 -> 0.024)
    # (bench/results/finetune-probe-v2-bn.json). "bias": every bias (layers' and the
    # normalization shifts), what a BatchNorm-folded int8 network still has to move
    trainable: str = "all"
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Refuse nonsense before any work: a NaN lr used to train NaN weights for the
        whole run."""
        def bad(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise InputError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def count(v: Any, least: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        bad("steps", self.steps is None or count(self.steps, 0), "an integer >= 0 or None")
        bad("batch_size", count(self.batch_size, 1), "an integer >= 1")
        for name in ("lr", "latent_lr", "temperature"):
            bad(name, num(getattr(self, name)) and getattr(self, name) > 0,
                "a finite number > 0")
        for name in ("label_weight", "feature_weight"):
            bad(name, num(getattr(self, name)) and getattr(self, name) >= 0,
                "a finite number >= 0")
        bad("freeze_at", num(self.freeze_at) and 0 <= self.freeze_at <= 1, "in [0, 1]")
        bad("warmup", count(self.warmup, 0), "an integer >= 0")
        bad("checkpoint_every", count(self.checkpoint_every, 1), "an integer >= 1")
        bad("eval_every", count(self.eval_every, 0), "an integer >= 0")
        bad("patience", count(self.patience, 1), "an integer >= 1")
        bad("lr_backoff", count(self.lr_backoff, 0), "an integer >= 0")
        bad("stop_from", num(self.stop_from) and 0 <= self.stop_from <= 1, "in [0, 1]")
        bad("stop_on", self.stop_on in STOP_ON, f"one of {', '.join(STOP_ON)}")
        bad("trainable", self.trainable in TRAINABLE, f"one of {', '.join(TRAINABLE)}")

    def to_dict(self) -> dict:
        return asdict(self)


# how a run is carried out, not what it computes: may differ between a run and its resume
RESUME_MAY_DIFFER = ("device", "checkpoint_every")


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor | None]]) -> str:
    """Short sha256 over named tensors (name, dtype, shape, bytes), in order."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}|".encode())
        if t is None:
            h.update(b"None;")
            continue
        if hasattr(t, "chunks"):  # images on disk: hashed as read, same bytes, same hash
            h.update(f"{t.dtype}|{tuple(t.shape)};".encode())
            for c in t.chunks():
                h.update(c.contiguous().reshape(-1).numpy().tobytes())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def layout_fingerprint(model: nn.Module) -> str:
    """Parameter/buffer names, dtypes and shapes only: the values are replaced on resume,
    the layout must fit."""
    return fingerprint((f"{k}|{v.dtype}|{tuple(v.shape)}", None)
                       for k, v in model.state_dict().items())


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists), so the value survives a weights-only load
    and compares equal after it."""
    return json.loads(json.dumps(value))


def run_identity(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor | None, cfg: FinetuneConfig, label_offset: int,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the fine-tuned weights depend on, field by field; ``extra``: the caller's
    (e.g. compress's options, which decide the starting student)."""
    ident: dict[str, Any] = dict(_plain(dict(extra or {})))
    ident.update({f"finetune.{k}": v for k, v in _plain(cfg.to_dict()).items()
                  if k not in RESUME_MAY_DIFFER})
    ident["label_offset"] = int(label_offset)
    ident["source model weights"] = fingerprint(teacher.state_dict().items())
    ident["calibration images"] = fingerprint([("images", images), ("labels", labels)])
    ident["student layout"] = layout_fingerprint(student)
    return ident


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def check_identity(path: Path, recorded: Any, now: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint made with other options or inputs, naming each."""
    if not isinstance(recorded, dict):
        raise InputError(f"{path}: checkpoint does not record the options it was made with "
                         "(older hfbconvert?); delete it or run without {resume}",
                         resume="resume=True")
    diffs = [f"{k}: checkpoint {_show(recorded.get(k))}, now {_show(now.get(k))}"
             for k in list(recorded) + [k for k in now if k not in recorded]
             if recorded.get(k) != now.get(k)]
    if diffs:
        raise InputError(f"{path}: checkpoint made with other options or inputs, not "
                         f"resuming ({'; '.join(diffs)}); rerun with the checkpoint's "
                         "options, or without {resume} to start over", resume="resume=True")


@dataclass
class FinetuneLog:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)  # on the training batch
    # the held-apart curve (steps done, KL, agreement), checked every cfg.eval_every steps
    eval_steps: list[int] = field(default_factory=list)
    held_kl: list[float] = field(default_factory=list)
    held_agreement: list[float] = field(default_factory=list)
    # top-1 on the held-apart images, where the evaluator has labels (None where not)
    held_top1: list[float | None] = field(default_factory=list)
    # mean cross-entropy with the labels on the held-apart images (None without labels)
    held_ce: list[float | None] = field(default_factory=list)
    stop_on: str = "kl"  # what ranked the checks (FinetuneConfig.stop_on)
    best_step: int | None = None  # the state shipped (0: the student as given)
    stopped_early_at: int | None = None  # steps done when the held KL stopped improving
    world_size: int = 1  # processes of the run that produced the last steps
    # each lr cut: steps done, the loss rise that caused it, the lr scale after it, the
    # step whose state the run went back to (None: codes still learning, not restored)
    lr_cuts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _schedule(opt: torch.optim.Optimizer, cfg: FinetuneConfig, step: int,
              ) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr scheduler of ``opt``, positioned so that the next ``opt.step()`` is step
    ``step``'s. ``LambdaLR`` over the closed form, not ``SequentialLR(LinearLR,
    CosineAnnealingLR)``: those update the lr recursively, which drifts from the closed
    form by up to 1.6e-14 (relative, 300 steps), enough to change every fine-tuned weight's
    bits, and a resumed or re-created (code-freeze) optimizer would need them replayed
    from step 0."""
    for g in opt.param_groups:
        g["initial_lr"] = g["base_lr"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(k, cfg),
                                             last_epoch=step - 1)


def _batch(images: torch.Tensor, labels: torch.Tensor | None, step: int, cfg: FinetuneConfig,
           normalize: Callable[[torch.Tensor], torch.Tensor], part: tuple[int, int] = (0, 1)):
    """Step ``step``'s global batch, or slice ``part`` = (rank, world size) of it: the
    samples and flips depend on (seed, step) only, never on the number of processes."""
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)
    flip = torch.rand(cfg.batch_size, generator=g) < 0.5 if cfg.flip else None
    r, w = part
    if w > 1:
        n = cfg.batch_size // w
        idx = idx[r * n:(r + 1) * n]
        flip = flip[r * n:(r + 1) * n] if flip is not None else None
    x = normalize(images[idx])
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = labels[idx] if labels is not None else None
    return x, y


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def trainable_parameters(model: nn.Module, trainable: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a fine-tune with ``trainable`` trains: every parameter
    ("all"), those of BatchNorm/GroupNorm/LayerNorm modules ("norm"), or every module's
    ``bias`` ("bias")."""
    if trainable == "all":
        return list(model.named_parameters())
    if trainable == "bias":
        return [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
    return [(f"{mn}.{pn}" if mn else pn, p) for mn, m in model.named_modules()
            if isinstance(m, NORM_LAYERS) for pn, p in m.named_parameters(recurse=False)]


def _param_groups(model: nn.Module, cfg: FinetuneConfig, scale: float = 1.0) -> list[dict]:
    """Adam groups at ``scale`` x the configured lrs (``scale`` < 1 after lr cuts), over
    the parameters ``cfg.trainable`` selects."""
    latent, rest = [], []
    for n, p in trainable_parameters(model, cfg.trainable):
        (latent if n.endswith(("wb_latent", "wc_latent")) else rest).append(p)
    if not latent and not rest:
        what = "biases" if cfg.trainable == "bias" else \
            "normalization layer parameters (BatchNorm folded?)"
        raise ConfigError("trainable", cfg.trainable, f"the model has no {what} to train")
    groups = [{"params": rest, "lr": cfg.lr * scale, "base_lr": cfg.lr * scale}]
    if latent:
        groups.append({"params": latent, "lr": cfg.latent_lr * scale,
                       "base_lr": cfg.latent_lr * scale})
    return groups


class _FeatureTap:
    """Captures the outputs of the hybrid layers and of the teacher's layers of the same
    name, so the loss can match every intermediate feature map, not only the logits: with
    a few thousand images, logits alone are too weak a signal to pull early layers back."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 teacher_at: dict[str, str] | None = None) -> None:
        """``teacher_at``: the teacher module whose output a student layer matches, where
        it is not the layer of the same name (a BN folded into the student's layer: the
        teacher's BN after it)."""
        teacher_at = teacher_at or {}
        self.names = [n for n, _ in hybrid_modules(student)]
        self.s: dict[str, torch.Tensor] = {}
        self.t: dict[str, torch.Tensor] = {}
        self.hooks = []
        for n in self.names:
            t_mod = teacher.get_submodule(teacher_at.get(n, n))
            self.hooks.append(student.get_submodule(n).register_forward_hook(self._grab(self.s, n)))
            self.hooks.append(t_mod.register_forward_hook(self._grab(self.t, n)))

    @staticmethod
    def _grab(store: dict, name: str):
        def hook(_m, _i, out):
            store[name] = out
        return hook

    def loss(self, world: int = 1) -> torch.Tensor:
        """Mean over layers of ‖s − t‖² / ‖t‖² (scale-free, so every layer counts). With
        ``world`` > 1 ranks the sums run over the global batch: ‖t‖² is all-reduced and
        the local term scaled by ``world``, so DDP's gradient average is the gradient of
        the single-process loss."""
        names = [n for n in self.names if n in self.s and n in self.t]
        if not names:
            return torch.zeros(())
        if world == 1:
            return torch.stack([(self.s[n] - self.t[n].detach()).pow(2).sum()
                                / self.t[n].detach().pow(2).sum().clamp_min(1e-12)
                                for n in names]).mean()
        den = distributed.all_sum(torch.stack([self.t[n].detach().pow(2).sum()
                                               for n in names]), "feature-loss all-reduce")
        num = torch.stack([(self.s[n] - self.t[n].detach()).pow(2).sum() for n in names])
        return (num * world / den.clamp_min(1e-12)).mean()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _freeze_all(model: nn.Module) -> None:
    for _, m in hybrid_modules(model):
        m.freeze()


def _is_frozen(model: nn.Module) -> bool:
    return any(m.frozen for _, m in hybrid_modules(model))


def _set_eval_parts(model: nn.Module) -> None:
    """Keep BN on running statistics (calibration batches are small and few) and dropout
    off: the student learns the teacher's eval-mode function. (Dropout left on in
    MobileNetV2's classifier made 76 steps lower held agreement 0.95 -> 0.92.)"""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()


# student -> (held KL, agreement) or (held KL, agreement, top-1 or None)
Evaluator = Callable[[nn.Module], tuple[float, ...]]


def finetune(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
             labels: torch.Tensor | None, normalize: Callable[[torch.Tensor], torch.Tensor],
             cfg: FinetuneConfig, checkpoint: str | os.PathLike | None = None,
             resume: bool = False, on_step: Callable[[int, float, float], None] | None = None,
             label_offset: int = 0, teacher_at: dict[str, str] | None = None,
             identity: Mapping[str, Any] | None = None,
             evaluate: Evaluator | None = None) -> FinetuneLog:
    """Distill ``teacher`` into ``student`` in place; returns the loss/agreement log.
    ``teacher_at``: see :class:`_FeatureTap`. ``identity``: the caller's options that
    decide the starting student, recorded in the checkpoint and checked on resume.
    ``evaluate``: student -> (held-apart KL, agreement); with it the KL is checked every
    ``cfg.eval_every`` steps, the run stops after ``cfg.patience`` checks without a new
    best, and the best state checked (step 0 included) is what the student ends as.

    Under torchrun (a process group initialized, see :mod:`.distributed`) the student is
    wrapped in DDP: each rank takes its slice of the global batch, gradients are averaged,
    rank 0 alone evaluates and writes checkpoints."""
    if cfg.steps is None:
        raise ValueError("FinetuneConfig.steps is None (auto): resolve it with auto_steps")
    world = distributed.world_size() if distributed.active() else 1
    if world > 1:
        distributed.check_batch(cfg.batch_size)
    dev = distributed.device_for(cfg.device) if world > 1 else torch.device(cfg.device)
    ckpt_path = Path(checkpoint) if checkpoint else None
    ident = run_identity(student, teacher, images, labels, cfg, label_offset, identity) \
        if ckpt_path is not None else {}
    home = next(iter(student.parameters()), torch.zeros(())).device
    student.to(dev)  # and back to ``home`` at the end
    freeze_step = int(cfg.freeze_at * cfg.steps)
    state = _resumed_state(student, ckpt_path, ident, resume, cfg, world)
    if state is None and freeze_step <= 0:
        _freeze_all(student)
    log = FinetuneLog(world_size=world) if state is None else \
        FinetuneLog(**{**state["log"], "world_size": world})
    distributed.broadcast_state(student)  # every rank starts from rank 0's student
    with _only_trainable(student, cfg.trainable):
        opt = _optimizer(student, cfg, state, ckpt_path)
        start = 0 if state is None else int(state["step"])
        stop = _EarlyStop(evaluate, cfg, log, dev, state.get("best") if state else None)
        with _borrowed_teacher(teacher, dev) as run_teacher:
            tap = _FeatureTap(student, run_teacher, teacher_at) \
                if cfg.feature_weight > 0 else None
            try:
                if start == 0 and cfg.steps > 0:
                    stop.check(student, 0)  # the student as given: shipped if none beats it
                run = _Run(student, run_teacher, images, labels, normalize, cfg, log,
                           ckpt_path, on_step, label_offset, tap, state is not None, ident,
                           dev, stop, world, freeze_step)
                _loop(run, opt, start)
            finally:
                if tap is not None:
                    tap.close()
    _freeze_all(student)
    if stop.best is not None:
        log.best_step = int(stop.best["step"])
        if log.best_step != (log.eval_steps[-1] if log.eval_steps else None):
            student.load_state_dict(stop.best["student"])
    student.to(home)  # the caller evaluates it where it was given
    student.eval()
    return log


@contextlib.contextmanager
def _only_trainable(student: nn.Module, trainable: str) -> Iterator[None]:
    """Parameters outside ``trainable`` need no gradient: the backward then skips their
    weight gradients. Their flags are restored on the way out."""
    trained = {id(p) for _, p in trainable_parameters(student, trainable)}
    held = [(p, p.requires_grad) for p in student.parameters() if id(p) not in trained]
    try:
        for p, _ in held:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in held:
            p.requires_grad_(flag)


def _resumed_state(student: nn.Module, ckpt_path: Path | None, ident: Mapping[str, Any],
                   resume: bool, cfg: FinetuneConfig, world: int) -> dict | None:
    """With ``resume`` and a checkpoint there: its state, loaded into ``student`` (frozen
    first when the checkpoint was); None: start from step 0."""
    if not resume or ckpt_path is None:
        return None
    if not ckpt_path.exists():
        progress.info(f"no checkpoint at {ckpt_path}; starting from step 0")
        return None
    state = _load_checkpoint(ckpt_path, ident)
    start, was = int(state["step"]), int(state.get("world_size", 1))
    progress.info(f"resuming from step {start} of {cfg.steps} (checkpoint {ckpt_path})"
                  + ("" if was == world else
                     f"; it was written by a run of {was} process(es), this one has "
                     f"{world}: same global batch and samples, so the result matches an "
                     "uninterrupted run within float tolerance, not bit for bit"))
    if state["frozen"]:
        _freeze_all(student)
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as exc:  # the identity matched, yet the layout does not
        raise InputError(f"{ckpt_path}: checkpoint does not fit this model "
                         f"({str(exc).splitlines()[0]})") from None
    return state


def _optimizer(student: nn.Module, cfg: FinetuneConfig, state: dict | None,
               ckpt_path: Path | None) -> torch.optim.Optimizer:
    """Adam over the student's parameter groups, with a resumed run's state."""
    opt = torch.optim.Adam(_param_groups(student, cfg))
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise InputError(f"{ckpt_path}: checkpoint's optimizer state does not fit this "
                             f"model ({exc})") from None
    return opt


@contextlib.contextmanager
def _borrowed_teacher(teacher: nn.Module, dev: torch.device) -> Iterator[nn.Module]:
    """The teacher for the run: in eval mode without gradients, on ``dev``. The caller's
    model is never moved (a copy goes to ``dev`` when it is elsewhere); its training flags
    and requires_grad are switched for the run and restored after it."""
    run_teacher = teacher if _on_device(teacher, dev) else copy.deepcopy(teacher).to(dev)
    modes = [(m, m.training) for m in run_teacher.modules()]
    grad_flags = [(p, p.requires_grad) for p in run_teacher.parameters()]
    try:
        run_teacher.eval()
        for p in run_teacher.parameters():
            p.requires_grad_(False)
        yield run_teacher
    finally:
        for p, flag in grad_flags:  # the caller's model comes back as it was given
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


class _EarlyStop:
    """Held-apart KL checks: rank 0 evaluates, every rank gets its numbers (one decision
    for all), the best state is kept in memory (deploy form, so a best from before a
    code freeze still loads into the frozen student)."""

    def __init__(self, evaluate: Evaluator | None, cfg: FinetuneConfig, log: FinetuneLog,
                 dev: torch.device, best: dict | None) -> None:
        self.evaluate, self.cfg, self.log, self.dev, self.best = evaluate, cfg, log, dev, best
        log.stop_on = cfg.stop_on

    def due(self, done: int) -> bool:
        return self.evaluate is not None and (
            done == self.cfg.steps or (self.cfg.eval_every > 0 and done % self.cfg.eval_every == 0))

    def check(self, student: nn.Module, done: int) -> bool:
        """Record the held-apart figures after ``done`` steps; True: stop (no new best by
        ``cfg.stop_on`` for ``patience`` checks in a row, and ``stop_from`` of the steps
        done)."""
        if self.evaluate is None:
            return False
        got = tuple(self.evaluate(student)) if distributed.is_main() else (0.0, 0.0)
        extra = [math.nan if len(got) <= i or got[i] is None else got[i] for i in (2, 3)]
        kl, ag, top1, ce = distributed.broadcast_floats([got[0], got[1], *extra], self.dev)
        self.log.eval_steps.append(done)
        self.log.held_kl.append(kl)
        self.log.held_agreement.append(ag)
        self.log.held_top1.append(None if math.isnan(top1) else top1)
        self.log.held_ce.append(None if math.isnan(ce) else ce)
        score = self.score(kl, top1, ce)
        if self.best is None or score < self.best.get("score", self.best.get("kl")):
            self.best = {"step": done, "kl": kl, "score": score,
                         "student": _deploy_state(student)}
            return False
        after = max([self.best["step"]] + [c["step"] for c in self.log.lr_cuts])
        since = sum(1 for s in self.log.eval_steps if s > after)
        return since >= self.cfg.patience and done >= self.cfg.stop_from * self.cfg.steps


    def score(self, kl: float, top1: float, ce: float) -> float:
        """Lower is better. ``loss``/``top1`` need labels on the held-apart images: the
        caller's evaluator gives them (refused before any step otherwise)."""
        if self.cfg.stop_on == "loss":
            return kl + self.cfg.label_weight * ce  # both at temperature 1
        if self.cfg.stop_on == "top1":
            return -top1
        return kl


def _deploy_state(student: nn.Module) -> dict[str, torch.Tensor]:
    src = student
    if not _is_frozen(student):
        src = copy.deepcopy(student)
        _freeze_all(src)
    return {k: v.detach().clone() for k, v in src.state_dict().items()}


def _on_device(module: nn.Module, dev: torch.device) -> bool:
    """Every parameter and buffer of ``module`` is on ``dev`` (``cuda`` matches any
    ``cuda:N``)."""
    return all(t.device.type == dev.type and (dev.index is None or t.device.index == dev.index)
               for t in [*module.parameters(), *module.buffers()])


_CHECKPOINT_KEYS = ("step", "student", "optimizer", "frozen", "log")


def _load_checkpoint(path: Path, ident: Mapping[str, Any]) -> dict:
    """Weights-only load, then the checks that make resuming safe."""
    state = load_torch(path)
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        raise InputError(f"{path}: not a fine-tuning checkpoint (expected the keys "
                         f"{', '.join(_CHECKPOINT_KEYS)})")
    check_identity(path, state.get("identity"), ident)
    return state


def _snapshot(student: nn.Module, opt: torch.optim.Optimizer, done: int, log: FinetuneLog,
              cfg: FinetuneConfig, ident: Mapping[str, Any], best: dict | None) -> dict:
    """Copies, not references: the live tensors move on with the next step, and a
    snapshot written later (after a divergence) must still hold this step's state."""
    return {"step": done,
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()), "frozen": _is_frozen(student),
            "log": copy.deepcopy(log.to_dict()), "config": cfg.to_dict(),
            "identity": dict(ident), "world_size": log.world_size,
            "best": copy.deepcopy(best)}


def _wrap(student: nn.Module, world: int, dev: torch.device) -> nn.Module:
    """DDP around ``student`` under torchrun (BN runs on running statistics, so no buffer
    broadcast; a static graph, so parameters a model leaves unused are found once,
    not traversed for every step)."""
    if world == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    with distributed.collective("setting up DDP"), warnings.catch_warnings():
        # newer torch renames broadcast_buffers; False still means what is wanted here
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None,
                   broadcast_buffers=False, static_graph=True)


@dataclass
class _Run:
    """What every step of one fine-tune reads (the optimizer and schedule change)."""

    student: nn.Module
    teacher: nn.Module
    images: torch.Tensor
    labels: torch.Tensor | None
    normalize: Callable[[torch.Tensor], torch.Tensor]
    cfg: FinetuneConfig
    log: FinetuneLog
    ckpt_path: Path | None
    on_step: Callable[[int, float, float], None] | None
    label_offset: int
    tap: _FeatureTap | None
    resumed: bool
    ident: Mapping[str, Any]
    dev: torch.device
    stop: _EarlyStop
    world: int
    freeze_step: int


def _loop(run: _Run, opt: torch.optim.Optimizer, start: int) -> None:
    """Steps ``start`` .. ``cfg.steps`` (or an early stop): train, log, check, checkpoint."""
    cfg, student, log, stop = run.cfg, run.student, run.log, run.stop
    last_good = None  # the newest checkpoint written by this run
    main = distributed.is_main()
    net = _wrap(student, run.world, run.dev)
    sched = _schedule(opt, cfg, start)
    for step in range(start, cfg.steps):
        if step == run.freeze_step and step > 0:
            _freeze_all(student)
            opt = torch.optim.Adam(_param_groups(student, cfg, _lr_scale(log)))
            sched = _schedule(opt, cfg, step)
            net = _wrap(student, run.world, run.dev)  # the parameters changed
        loss, loss_value, agree = _step_loss(run, net, step)
        if not math.isfinite(loss_value):
            _diverged(run, step, last_good)
        opt.zero_grad(set_to_none=True)
        with distributed.collective("gradient all-reduce"):
            loss.backward()
        opt.step()
        sched.step()
        log.steps.append(step)
        log.loss.append(loss_value)
        log.agreement.append(agree)
        if run.on_step is not None:
            run.on_step(step, loss_value, agree)
        done = step + 1
        checked = stop.due(done)
        halt = checked and stop.check(student, done)
        if checked and _cut_lr(run, done):
            halt = False  # a fresh start at the lower lr: the optimizer and schedule too
            opt = torch.optim.Adam(_param_groups(student, cfg, _lr_scale(log)))
            sched = _schedule(opt, cfg, done)
        if main and run.ckpt_path is not None and (done % cfg.checkpoint_every == 0
                                                   or done == cfg.steps):
            last_good = _snapshot(student, opt, done, log, cfg, run.ident, stop.best)
            save_torch(run.ckpt_path, last_good)
        if halt and done < cfg.steps:
            log.stopped_early_at = done
            progress.info(f"  fine-tune stopped early after {done} of {cfg.steps} steps: "
                          f"held-apart {cfg.stop_on} not better than its best at step "
                          f"{stop.best['step']} for {cfg.patience} or more checks")
            return


def _lr_scale(log: FinetuneLog) -> float:
    return log.lr_cuts[-1]["lr_scale"] if log.lr_cuts else 1.0


def _cut_lr(run: _Run, done: int) -> bool:
    """After a check at ``done`` steps: when the training loss rose (``loss_rise`` above
    BACKOFF_RISE) and the check is no new best, go back to the best state checked and
    cut the lr by BACKOFF_FACTOR, at most ``cfg.lr_backoff`` times. Every rank decides
    alike (the logged loss is the global one, the best state is on every rank)."""
    cfg, log, stop = run.cfg, run.log, run.stop
    if len(log.lr_cuts) >= cfg.lr_backoff or stop.best is None or stop.best["step"] == done:
        return False
    since = log.lr_cuts[-1]["step"] if log.lr_cuts else 0
    rise = loss_rise(log.loss, since, done, cfg.eval_every)
    if rise is None or rise <= BACKOFF_RISE:
        return False
    restored = None
    if _is_frozen(run.student):  # a best from the code-learning phase would not fit
        run.student.load_state_dict(stop.best["student"])
        restored = int(stop.best["step"])
    scale = _lr_scale(log) * BACKOFF_FACTOR
    log.lr_cuts.append({"step": done, "rise": rise, "lr_scale": scale,
                        "restored_step": restored})
    progress.info(f"  fine-tune: training loss rose x{rise:.2f} by step {done} at lr "
                  f"{cfg.lr * scale / BACKOFF_FACTOR:.3g}; continuing at lr "
                  f"{cfg.lr * scale:.3g}"
                  + (f" from the state at step {restored}" if restored is not None else ""))
    return True


def _step_loss(run: _Run, net: nn.Module, step: int) -> tuple[torch.Tensor, float, float]:
    """Step ``step``'s batch through teacher and student: (loss to back-propagate, the
    global loss, the global top-1 agreement with the teacher)."""
    cfg, student, dev, world = run.cfg, run.student, run.dev, run.world
    student.train()
    _set_eval_parts(student)
    x, y = _batch(run.images, run.labels, step, cfg, run.normalize, (distributed.rank(), world))
    x = x.to(dev)
    with torch.no_grad():
        t_logits = run.teacher(x)
    s_logits = net(x)
    T = cfg.temperature
    # per rank: batch means over the local slice; their average over ranks (DDP's
    # gradient average) is the global batch mean
    loss = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1),
                    reduction="batchmean", log_target=True) * T * T
    if run.tap is not None:
        loss = loss + cfg.feature_weight * run.tap.loss(world)
    if cfg.label_weight > 0 and y is not None:
        loss = loss + cfg.label_weight * F.cross_entropy(s_logits, y.to(dev) + run.label_offset)
    hits = (s_logits.argmax(1) == t_logits.argmax(1)).sum().double()
    if world > 1:  # the global loss and agreement, the same on every rank
        tot = distributed.all_sum(torch.stack([loss.detach().double(), hits]),
                                  "loss all-reduce")
        return loss, float(tot[0]) / world, float(tot[1]) / cfg.batch_size
    return loss, float(loss.detach()), float(hits) / x.shape[0]


def _diverged(run: _Run, step: int, last_good: dict | None) -> NoReturn:
    """A non-finite loss: keep the last good checkpoint of this run, then stop."""
    ckpt_path = run.ckpt_path
    if ckpt_path is not None and last_good is not None:  # rank 0's only
        save_torch(ckpt_path, last_good)
    # only a checkpoint of this run (or the one it resumed) that is really there
    kept = ckpt_path is not None and (last_good is not None or run.resumed) \
        and ckpt_path.exists()
    raise CheckFailed(f"fine-tuning diverged: non-finite loss at step {step}"
                      + (f"; last good checkpoint kept at {ckpt_path}" if kept else ""))
