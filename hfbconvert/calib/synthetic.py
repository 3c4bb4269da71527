"""Data-free calibration: ZeroQ-style "distilled data" generated from the model itself.

When no real images are at hand, the BatchNorm layers still remember what the training
data looked like: the running mean/variance of every BN input. Optimising random inputs
until each BN layer sees batch statistics that match those running statistics (Cai et al.,
"ZeroQ", CVPR 2020) gives images whose activations are realistic enough to calibrate
quantisation/compression. The result is an ordinary :class:`CalibData` (uint8 images plus
the model's mean/std), so it flows through exactly the same pipeline as decoded photos.

Generation is costly on a CPU (a forward + input-gradient pass per iteration), so results
are cached on disk, keyed by a fingerprint of the model's tensors and every setting that
changes the bytes; a second run with the same model and settings just reads the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hfbconvert import progress
from hfbconvert.errors import ConfigError, InputError
from hfbconvert.fileio import atomic_write

from .presets import Preprocess
from .readers import CalibData, cache_dir

PREFIX = "synthetic"
DEFAULT_N = 256
MAX_N = 100_000
DEFAULT_ITERATIONS = 200
MAX_ITERATIONS = 100_000
DEFAULT_BATCH = 32
DEFAULT_LR = 0.1  # best of 0.05-0.4 on MobileNetV2 and the tiny test net (cosine decay)
CACHE_VERSION = 1
_INT = re.compile(r"[0-9]+")


# ------------------------------------------------------------------------- spec parsing


def is_synthetic(spec: str | None) -> bool:
    """True for ``synthetic`` / ``synthetic:...`` (``./synthetic`` stays a path)."""
    return spec is not None and (spec == PREFIX or spec.startswith(PREFIX + ":"))


def parse_spec(spec: str) -> tuple[int | None, int]:
    """``synthetic[:N[:ITERATIONS]]`` -> ``(N or None when not given, iterations)``.

    Every malformed value is a one-line :class:`InputError`, never a crash later on."""
    if not is_synthetic(spec):
        raise InputError(f"{spec!r}: not a synthetic calibration spec (synthetic[:N[:ITERS]])")
    parts = spec.split(":")[1:]
    if len(parts) > 2:
        raise ConfigError("calib", spec, "expected synthetic[:N[:ITERATIONS]]")
    n = _count(spec, parts[0], "number of images N", MAX_N) if parts else None
    iters = (_count(spec, parts[1], "ITERATIONS", MAX_ITERATIONS) if len(parts) > 1
             else DEFAULT_ITERATIONS)
    return n, iters


def _count(spec: str, text: str, what: str, limit: int) -> int:
    text = text.strip()
    if not _INT.fullmatch(text):
        raise ConfigError("calib", spec, f"{what} must be a positive integer, got {text!r}")
    value = int(text)
    if not 1 <= value <= limit:
        raise ConfigError("calib", spec, f"{what} must be in [1, {limit}], got {value}")
    return value


# ------------------------------------------------------------------------------ loss


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorm2d layers that carry running statistics (the generation targets)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            and m.running_mean is not None and m.running_var is not None]


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's objective for a batch of normalised inputs ``x``: the sum over BN layers of
    ``||mu_batch - running_mean||_2 + ||sigma_batch - sqrt(running_var)||_2``.

    The model should be in eval mode (BN then normalises with its running statistics, as
    at inference, and leaves them untouched)."""
    bns = bn_layers(model)
    if not bns:
        raise InputError(_no_bn_message(""), calib="calib")
    terms: list[torch.Tensor] = []

    def hook(mod: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        var, mean = torch.var_mean(args[0], dim=(0, 2, 3), unbiased=False)
        target_std = torch.sqrt(mod.running_var + mod.eps)
        terms.append(torch.linalg.vector_norm(mean - mod.running_mean)
                     + torch.linalg.vector_norm(torch.sqrt(var + mod.eps) - target_std))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()


def _no_bn_message(source: str) -> str:
    where = f"{source}: " if source else ""
    return (f"{where}synthetic calibration needs BatchNorm statistics, but this model has no "
            "BatchNorm layers (folded into the convolutions); pass real images with {calib} "
            "PATH, or omit {calib} for analyze (weight-space sensitivity)")


# ------------------------------------------------------------------------ generation


def fingerprint(model: nn.Module, n: int, seed: int, prep: Preprocess, iterations: int,
                batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
                device: str = "cpu") -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes, in key order) and
    every setting that changes the generated bytes (the device type too: a GPU's rounding
    gives other bytes; the CPU's key is the one it always was)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {"v": CACHE_VERSION, "n": n, "seed": seed, "resolution": prep.resolution,
                "iterations": iterations, "batch_size": batch_size, "lr": lr,
                "mean": list(prep.mean), "std": list(prep.std)}
    if device != "cpu":
        settings["device"] = device
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def cache_path(fp: str) -> Path:
    return cache_dir() / f"synthetic-{fp[:32]}.npz"


def synthesize(
    model: nn.Module,
    prep: Preprocess,
    n: int = DEFAULT_N,
    seed: int = 0,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    cache: bool = True,
    source: str = "",
    device: str | torch.device = "cpu",
) -> CalibData:
    """``n`` distilled images at ``prep.resolution`` for ``model`` as uint8 CalibData.

    Starts from seeded Gaussian noise in normalised input space and runs Adam on the BN
    statistics loss, one batch of ``batch_size`` images at a time (batch statistics are
    what BN remembers, so images are optimised jointly per batch). After each step the
    images are clamped to the range that maps back to valid [0, 255] pixels, so the uint8
    result is (up to rounding) what was optimised. Same model, settings and seed give the
    same bytes on the same machine. ``source`` names the model in error messages;
    ``device``: where the optimisation runs (on a copy of ``model``).
    """
    if not 1 <= n <= MAX_N:
        raise InputError(f"synthetic calibration: N must be in [1, {MAX_N}], got {n}")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InputError(f"synthetic calibration: iterations must be in [1, {MAX_ITERATIONS}], "
                         f"got {iterations}")
    if batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise InputError(f"synthetic calibration: bad batch size {batch_size} or lr {lr}")
    if not bn_layers(model):
        raise InputError(_no_bn_message(source), calib="calib")
    dev = torch.device(device)
    fp = fingerprint(model, n, seed, prep, iterations, batch_size, lr, dev.type)
    path = cache_path(fp)
    images = _cache_read(path, fp) if cache else None
    if images is not None:
        progress.info(f"calibration: {n} synthetic images from cache {path}")
    else:
        progress.info(f"generating {n} synthetic calibration images from the BatchNorm "
                      f"statistics ({math.ceil(n / batch_size)} batch(es) x {iterations} "
                      "iterations; slow on a CPU, cached for the next run)")
        images, loss0, loss1 = _generate(model, prep, n, seed, iterations, batch_size, lr,
                                         dev)
        progress.info(f"calibration: {n} synthetic images, BN-statistics loss "
                      f"{loss0:.3g} -> {loss1:.3g} (mean per batch)")
        if cache:
            _cache_write(path, fp, images)
    return CalibData(
        images=torch.from_numpy(images),
        labels=None,
        mean=tuple(float(v) for v in prep.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep.std),  # type: ignore[arg-type]
        files=[f"{PREFIX}[{i}]" for i in range(n)],
        source=f"{PREFIX}:{n}",
    )


def _generate(model: nn.Module, prep: Preprocess, n: int, seed: int, iterations: int,
              batch_size: int, lr: float, device: torch.device | None = None,
              ) -> tuple[np.ndarray, float, float]:
    """Optimise batch by batch; returns (uint8 NCHW, mean initial loss, mean final loss)."""
    # A private copy: eval mode, no parameter gradients, channels_last (faster depthwise
    # convs on CPU) -- none of which may leak into the caller's model.
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    device = device or next(net.parameters()).device
    net = net.to(device)
    net = net.to(memory_format=torch.channels_last)
    res = prep.resolution
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std  # valid pixel range, normalised
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((n, 3, res, res), dtype=np.uint8)
    first: list[float] = []
    last: list[float] = []
    n_batches = math.ceil(n / batch_size)
    with progress.task("synthesizing calibration images", n_batches * iterations) as bar:
        for b, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            noise = torch.randn(size, 3, res, res, generator=gen).to(device)
            x = noise.clamp(lo, hi).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            # cosine decay: large steps first, then settle (converges in fewer iterations
            # than a constant rate, which matters on a CPU)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, lr * 0.01)
            for it in range(iterations):
                loss = bn_statistics_loss(net, x)
                (x.grad,) = torch.autograd.grad(loss, [x])
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
                value = float(loss.detach())
                if it == 0:
                    first.append(value)
                bar.advance(1, info=f"batch {b + 1}/{n_batches} loss {value:.3g}")
            with torch.no_grad():
                last.append(float(bn_statistics_loss(net, x)))
                pix = (x * std + mean).mul_(255.0).round_().clamp_(0, 255)
            out[start:start + size] = pix.to(torch.uint8).cpu().contiguous().numpy()
    return out, float(np.mean(first)), float(np.mean(last))


# ------------------------------------------------------------------------------ cache


def _cache_read(path: Path, fp: str) -> np.ndarray | None:
    """The cached images, None on a miss or a damaged file; a readable file generated for
    another model or other settings is refused (it would silently calibrate wrongly)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["fingerprint"])
            images = z["images"]
    except Exception:  # damaged or foreign file: regenerate and overwrite
        return None
    if stored != fp:
        raise InputError(f"{path}: cached synthetic images were generated for a different "
                         "model or settings (fingerprint mismatch); delete the file to "
                         "regenerate")
    return images


def _cache_write(path: Path, fp: str, images: np.ndarray) -> None:
    """Best effort, atomic: a read-only or full cache folder must never fail the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=images, fingerprint=np.array(fp))

        atomic_write(path, write)
    except OSError as exc:
        progress.warn(f"{path}: could not cache synthetic images ({exc.strerror or exc})")
