"""``analyze``: per-filter sensitivity of every pointwise layer, as versioned JSON.

The JSON is the contract ``compress`` reuses (``schema_version`` bumps on change).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hfbconvert.calib.readers import CalibData

from . import __version__, progress
from .costs import model_cost
from .layers import PointwiseLayer, find_pointwise, layer_weight, select_layers
from .models.info import ModelInfo
from .sensitivity import loss_curves
from .stats import collect_input_stats

SCHEMA_VERSION = 1
DEFAULT_THRESHOLD = 0.05  # a filter is critical if L_j(r_ref) exceeds this
DEFAULT_THRESHOLD_BUDGET = 2  # r_ref: the poster's "2 hidden units"


def _r6(x: float) -> float:
    return float(f"{x:.6g}")


def _input_sigmas(model: nn.Module, layers: list[PointwiseLayer], data: CalibData | None,
                  stats_images: int, seed: int, dev: torch.device,
                  ) -> dict[str, torch.Tensor | None]:
    """Each layer's input second moment Σ on a seeded sample of ``stats_images`` images
    (None per layer without data: weight-space losses)."""
    if data is None:
        return {ly.name: None for ly in layers}
    sub = data.sample(stats_images, seed=seed)
    with progress.task("statistics", None):
        st = collect_input_stats(model, [ly.name for ly in layers],
                                 (x.to(dev) for x, _ in sub.batches(64)), seed=seed)
    return {n: s.sigma.to(dev) for n, s in st.items()}


def _curve_summary(curves: torch.Tensor, ref_col: int, threshold: float) -> dict[str, Any]:
    """A layer's JSON fields from its (c_out, budgets) loss curves: median and p90 per
    budget, filters over ``threshold`` and the ranking at the reference budget."""
    med = curves.median(0).values
    p90 = torch.quantile(curves, 0.9, dim=0)
    return {"median_loss": [_r6(v) for v in med.tolist()],
            "p90_loss": [_r6(v) for v in p90.tolist()],
            "critical_at_threshold": int((curves[:, ref_col] > threshold).sum()),
            "ranking": torch.argsort(curves[:, ref_col], descending=True, stable=True).tolist(),
            "loss": [[_r6(v) for v in row] for row in curves.tolist()]}


def analyze(model: nn.Module, info: ModelInfo, data: CalibData | None,
            budgets: tuple[int, ...] = (1, 2, 4, 8, 16), stats_images: int = 512,
            threshold: float = DEFAULT_THRESHOLD, threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
            seed: int = 0, source: str = "model",
            device: str | torch.device = "cpu", include: tuple[str, ...] = (),
            exclude: tuple[str, ...] = (), kinds: tuple[str, ...] | None = None
            ) -> dict[str, Any]:
    """Rank every pointwise filter by L_j(r) for each r in ``budgets``.

    ``device``: where the statistics pass and the ternary fits run; the user's ``model``
    is never moved (a copy is), and the JSON is the same on any device up to float
    rounding of the losses.
    """
    layers = select_layers(find_pointwise(model, info.resolution, source, kinds), include,
                           exclude,
                           source)
    dev = torch.device(device)
    if dev.type != "cpu":
        model = copy.deepcopy(model).to(dev)
    was_training = model.training
    model.eval()
    cost = model_cost(model, info.resolution)
    total_muls = cost.muls
    by = cost.by_name()
    sig = _input_sigmas(model, layers, data, stats_images, seed, dev)
    ref_col = min(range(len(budgets)), key=lambda i: abs(budgets[i] - threshold_budget))
    out_layers = []
    with progress.task("sensitivity", len(layers)) as bar:
        for ly in layers:
            w = layer_weight(model, ly.name).float()
            curves = loss_curves(w, sig[ly.name], budgets).cpu()  # (c_out, len(budgets))
            out_layers.append({
                "name": ly.name, "kind": ly.kind, "c_in": ly.c_in, "c_out": ly.c_out,
                **({"kernel": ly.kernel} if ly.kernel > 1 else {}),
                "height": ly.height, "width": ly.width,
                "muls": by[ly.name].muls, "mul_share": _r6(by[ly.name].muls / total_muls),
                **_curve_summary(curves, ref_col, threshold)})
            bar.advance(1, info=ly.name)
    model.train(was_training)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": f"hfbconvert {__version__}",
        "kind": "sensitivity",
        "model": {"source": source, "arch": info.arch, "resolution": info.resolution,
                  "num_classes": info.num_classes},
        "budgets": list(budgets),
        "threshold": {"loss": threshold, "budget": budgets[ref_col]},
        "activation_aware": data is not None,
        "calibration": None if data is None else {
            "source": data.source, "images": min(stats_images, len(data)), "seed": seed},
        "totals": cost.totals(),
        "pointwise_mul_share": _r6(sum(by[ly.name].muls for ly in layers) / total_muls),
        "layers": out_layers,
    }
