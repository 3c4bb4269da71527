"""BatchNorm handling after conversion: make each BN see what it saw in the original.

A hybrid pointwise layer reproduces its original layer only approximately, and the error
compounds: every layer after the first hybrid one sees slightly different inputs. Where
a BatchNorm follows a pointwise layer (models stored with BN *unfolded*), the error in
each output channel's mean and scale can be undone for free: BN's per-channel affine is
folded into the conv at export, so changing ``running_mean``/``running_var`` costs no
MUL or ADD at inference. Two ways to pick the new statistics:

``match``
    Run the calibration images through the original and the hybrid, BN by BN in network
    order (so each BN is adjusted on the hybrid's own, already-adjusted upstream
    outputs: compounding included), and set the hybrid BN's statistics so its
    normalized output has the *original's* per-channel mean and variance on those
    images. Any train/calibration distribution shift the original BN carries is kept.
``reestimate``
    The classic recipe: reset the BN statistics and recompute them on the calibration
    images in train-mode BN with ``momentum=None`` (cumulative average). Normalized
    outputs become mean 0 / variance 1 on the calibration images, whatever the
    original's were.

Models whose BN was folded into the convs have nothing to adjust here; the stage is
skipped with a reason (:func:`bn_targets` returns none).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layers import hooked_eval

BN_MODES = ("off", "match", "reestimate")
BN_SCOPES = ("pointwise", "all")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted tensor was seen."""


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES) and m.running_mean is not None


@torch.no_grad()
def bn_targets(model: nn.Module, example: torch.Tensor, pointwise: Iterable[str],
               scope: str = "pointwise") -> list[str]:
    """Names of the BatchNorms to adjust, in forward-execution order.

    ``scope="pointwise"``: only BNs whose input *is* the output tensor of one of the
    named pointwise layers (found by tracing one forward pass of ``example``, so no
    architecture is assumed). ``"all"``: every BN with running statistics, since the
    depthwise BNs downstream of a hybrid layer see compounded errors too. Empty for a
    model whose BN is folded (nothing to adjust)."""
    if scope not in BN_SCOPES:
        raise ValueError(f"bn scope must be one of {BN_SCOPES}, not {scope!r}")
    pw = set(pointwise)
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # tensor kept alive: ids stay unique
    order: list[str] = []
    hooks = []

    def after_pw(name: str):
        def hook(_m, _i, out):
            produced[id(out)] = (name, out)
        return hook

    def before_bn(name: str):
        def hook(_m, inp):
            if name in order:
                return
            src = produced.get(id(inp[0]))
            if scope == "all" or src is not None:
                order.append(name)
        return hook

    for name, m in model.named_modules():
        if name in pw:
            hooks.append(m.register_forward_hook(after_pw(name)))
        elif _is_bn(m):
            hooks.append(m.register_forward_pre_hook(before_bn(name)))
    with hooked_eval(model, hooks):
        model(example)
    return order


class _Moments:
    """Per-channel running sums (float64) of a tensor's values over all dims but dim 1."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        s, ss = x.sum(1), x.pow(2).sum(1)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += x.shape[1]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance per channel; centred by the mean, clamped at 0."""
        assert self.s is not None and self.ss is not None and self.n > 0
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean.pow(2)).clamp_min(0.0)


@torch.no_grad()
def bn_input_moments(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                     stop_after: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mean, variance) per channel of each named BN's *input* over ``batches``, in eval
    mode. ``stop_after`` ends each forward pass at that BN (the rest is not needed)."""
    acc = {n: _Moments() for n in names}
    hooks = []

    def grab(name: str):
        def hook(_m, inp):
            acc[name].add(inp[0])
            if name == stop_after:
                raise _Stop
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(grab(n)))
    with hooked_eval(model, hooks):
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    return {n: a.mean_var() for n, a in acc.items()}


@torch.no_grad()
def matched_stats(bn: nn.Module, orig: tuple[torch.Tensor, torch.Tensor],
                  hyb: tuple[torch.Tensor, torch.Tensor],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """New (running_mean, running_var) for a BN whose input now has moments ``hyb``
    instead of ``orig``, so that (x - m') / sqrt(v' + eps) has the same per-channel mean
    and variance on the hybrid input as the original normalization had on the original
    input. With s = sqrt(v_h / v_o):  v' + eps = (v + eps)·s²,  m' = μ_h − (μ_o − m)·s.
    Channels that are (near) constant in either network keep their scale and only get
    the mean shift (a ratio of two ~0 variances means nothing)."""
    mo, vo = orig
    mh, vh = hyb
    m = bn.running_mean.double()
    v = bn.running_var.double()
    eps = float(bn.eps)
    tiny = 1e-12 * (v + eps)
    ok = (vo > tiny) & (vh > tiny)
    ratio = torch.where(ok, vh / vo.clamp_min(1e-300), torch.ones_like(vh))
    v_new = ((v + eps) * ratio - eps).clamp_min(0.0)
    s = ((v_new + eps) / (v + eps)).sqrt()  # = sqrt(ratio) unless the clamp bit
    m_new = mh - (mo - m) * s
    dt = bn.running_mean.dtype
    return m_new.to(dt), v_new.to(dt)


def _set_matched(bn: nn.Module, ref: tuple[torch.Tensor, torch.Tensor],
                 hyb: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Apply :func:`matched_stats` to ``bn``; returns the mean |log(v_h / v_o)| over
    channels before the change (how far off the BN's input scale was)."""
    rm, rv = matched_stats(bn, ref, hyb)
    bn.running_mean.copy_(rm)
    bn.running_var.copy_(rv)
    vo, vh = ref[1], hyb[1]
    ok = (vo > 0) & (vh > 0)
    return float((vh[ok] / vo[ok]).log().abs().mean()) if bool(ok.any()) else 0.0


@torch.no_grad()
def _peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the largest leaf-module output for the batch ``x`` (from a 1-image pass)."""
    peak = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            peak[0] = max(peak[0], out.numel() * out.element_size())

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        model(x[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return peak[0] * x.shape[0]


@torch.no_grad()
def match_bn(original: nn.Module, hybrid: nn.Module, names: list[str],
             batches: list[torch.Tensor], max_bytes: int = 1 << 30) -> dict[str, float]:
    """``match`` mode, in place on ``hybrid``: BN by BN in network order, the hybrid's
    BN input moments are measured with every earlier BN already adjusted, and the BN's
    running statistics are set by :func:`matched_stats`. Returns, per BN, the mean
    |log(v_h / v_o)| over channels before the adjustment (how far off it was).

    When all images fit in one batch (its largest activation, x8 for the temporaries,
    under ``max_bytes``) this is one forward pass: a pre-hook adjusts each BN from the
    whole batch just before the BN runs, so every later BN already sees adjusted
    inputs. Otherwise one (truncated) pass per BN: same result, more time."""
    ref = bn_input_moments(original, names, batches)
    report: dict[str, float] = {}
    x_all = torch.cat(batches) if len(batches) > 1 else batches[0]
    if 8 * _peak_activation_bytes(hybrid, x_all) <= max_bytes:
        wanted = set(names)

        def adjust(name: str):
            def hook(m, inp):
                if name in wanted and name not in report:
                    acc = _Moments()
                    acc.add(inp[0])
                    report[name] = _set_matched(m, ref[name], acc.mean_var())
            return hook

        hooks = [hybrid.get_submodule(n).register_forward_pre_hook(adjust(n)) for n in names]
        with hooked_eval(hybrid, hooks):
            hybrid(x_all)
        return {n: report[n] for n in names}
    for name in names:
        hyb = bn_input_moments(hybrid, [name], batches, stop_after=name)[name]
        report[name] = _set_matched(hybrid.get_submodule(name), ref[name], hyb)
    return report


@torch.no_grad()
def reestimate_bn(hybrid: nn.Module, names: list[str], batches: list[torch.Tensor]) -> None:
    """``reestimate`` mode, in place: reset the named BNs and average their batch
    statistics over ``batches`` in train-mode BN (``momentum=None``: a plain cumulative
    average, so the order of batches does not matter). Everything else stays in eval
    mode (hybrid layers keep their deploy-form forward)."""
    if len(batches) > 1 and batches[-1].shape[0] == 1:  # train-mode BN needs 2+ values
        batches = [*batches[:-2], torch.cat(batches[-2:])]
    bns = [hybrid.get_submodule(n) for n in names]
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = hybrid.training
    hybrid.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for x in batches:
            hybrid(x)
    finally:
        for bn, (mom, tr) in zip(bns, saved, strict=True):
            bn.momentum = mom
            bn.train(tr)
        hybrid.train(was_training)
