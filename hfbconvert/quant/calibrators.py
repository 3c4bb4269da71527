"""Range calibrators, in the manner of onnxruntime's ``calibrate.py``: ``collect`` the
tensors a quantizer sees, then ``compute`` its range as ``(scale, zero_point)``.

* :class:`MinMaxCalibrator`: the observed [min, max] ∪ {0}.
* :class:`MSEClipCalibrator`: MinMax shrunk by the clip ratio with the smallest squared
  quantization error on a seeded sample of the values; the ratios include 1, so it is
  never worse than MinMax in squared error.
* :class:`PercentileCalibrator`: the [p, 100 − p] percentiles (onnxruntime's percentile
  method; for comparisons, not used by default).

The clip ratios searched live here, once. Activations and weights search different sets
on purpose: per-tensor uint8 activations are heavy-tailed (ReLU6 outputs, residual sums)
and deep clipping wins, while per-channel int8 weight rows rarely gain below 0.7 (each
row already has its own scale). Changing either set changes every int8 benchmark number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from . import primitives as P

# per-tensor uint8 activations, widest first (ties keep the widest)
ACTIVATION_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)
# per-output-channel symmetric int8 weights (weightquant searches them row by row)
WEIGHT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
SAMPLE_VALUES = 1 << 18  # values per tensor the clipping search is run on


@dataclass(frozen=True)
class Range:
    """A calibrated per-tensor range: the qparams and what they came from."""

    scale: float
    zero_point: int
    clip_ratio: float
    lo: float  # observed minimum
    hi: float  # observed maximum


class Calibrator(ABC):
    """Collects one quantizer's inputs, then computes its (per-tensor) range."""

    def __init__(self, qmin: int = P.UINT8[0], qmax: int = P.UINT8[1]) -> None:
        self.qmin, self.qmax = qmin, qmax
        self.lo, self.hi = float("inf"), float("-inf")

    def collect(self, x: torch.Tensor) -> None:
        """Observe a tensor (any shape); may be called for several batches."""
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        self._collect(flat)

    def _collect(self, flat: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """What a subclass keeps beyond the min and max."""

    def compute(self) -> Range:
        if self.lo > self.hi:
            raise ValueError("calibrator has seen no values")
        return self._compute()

    @abstractmethod
    def _compute(self) -> Range: ...

    def _range(self, lo: float, hi: float, ratio: float = 1.0) -> Range:
        scale, zp = P.choose_qparams(lo, hi, self.qmin, self.qmax)
        return Range(float(scale), int(zp), ratio, self.lo, self.hi)


class MinMaxCalibrator(Calibrator):
    def _compute(self) -> Range:
        return self._range(self.lo, self.hi)


class MSEClipCalibrator(Calibrator):
    """MSE-optimal clipping among ``ratios · [lo, hi]``, searched on at most
    ``sample_values`` values per collected tensor, drawn with ``generator`` (share one
    generator across a model's calibrators for one reproducible stream)."""

    def __init__(self, ratios: tuple[float, ...] = ACTIVATION_CLIP_RATIOS,
                 generator: torch.Generator | None = None,
                 sample_values: int = SAMPLE_VALUES, qmin: int = P.UINT8[0],
                 qmax: int = P.UINT8[1]) -> None:
        super().__init__(qmin, qmax)
        self.ratios = tuple(ratios)
        self.generator = generator if generator is not None else torch.Generator()
        self.sample_values = sample_values
        self.samples: list[torch.Tensor] = []

    def _collect(self, flat: torch.Tensor) -> None:
        if flat.numel() > self.sample_values:
            idx = torch.randint(flat.numel(), (self.sample_values,), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        self.samples.append(flat.cpu())

    def _compute(self) -> Range:
        values = self.samples[0] if len(self.samples) == 1 else torch.cat(self.samples)
        scale, zp, ratio = mse_clip(values, self.lo, self.hi, self.ratios, self.qmin,
                                    self.qmax)
        return Range(scale, zp, ratio, self.lo, self.hi)


class PercentileCalibrator(MSEClipCalibrator):
    """The range [q(p), q(100 − p)] of the sampled values (``percentile`` p in %)."""

    def __init__(self, percentile: float = 0.01, **kw) -> None:
        super().__init__(ratios=(1.0,), **kw)
        self.percentile = percentile

    def _compute(self) -> Range:
        v = torch.cat(self.samples)
        q = torch.quantile(v, torch.tensor([self.percentile, 100 - self.percentile]) / 100)
        return self._range(float(q[0]), float(q[1]))


def mse_clip(values: torch.Tensor, lo: float, hi: float, ratios: tuple[float, ...],
             qmin: int = P.UINT8[0], qmax: int = P.UINT8[1]) -> tuple[float, int, float]:
    """(scale, zero_point, clip ratio) minimising Σ (x − q(x))² over ``values`` among the
    ranges ``ratio · [lo, hi]``; all ratios are tried at once; ties keep the first."""
    r = torch.tensor(ratios, dtype=torch.float32)
    scale, zp = P.choose_qparams(lo, hi, qmin, qmax, clip_ratio=r)
    v = values.float()[None, :]
    q = P.fake_quantize(v, scale[:, None], zp[:, None].float(), qmin, qmax, ste=False)
    k = int(torch.argmin((q - v).pow(2).sum(1)))
    return float(scale[k]), int(zp[k]), float(r[k])
