"""The budget planner's heuristic against the exact solution of the same knapsack.

``plan.budget_plan`` solves a multiple-choice knapsack (one (n_c, ρ) option per layer,
minimum fragility-weighted predicted error, MULs under the budget, ADDs under the cap) by
Lagrangian relaxation plus a greedy fill. Here the same options (``plan.plan_options``,
captured from a real dry run on real calibration images) go to an exact MILP
(``scipy.optimize.milp``, HiGHS), budget by budget, and both objectives and times are
recorded. Issue #16's rule: keep the heuristic only if it is within 1% of the optimum at
every budget and faster.

    python -m bench.planner_exact --tag planner   (needs scipy and HFB_SHARED)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

BUDGETS = (0.45, 0.5, 0.536, 0.6, 0.7, 0.8)
MODELS = {
    "v1-0.5-160": ("models/mobilenet_v1_0.5_160.pt", "data/imagenet/calib"),
    "cifar10-v1-0.5": ("models/mobilenet_v1_0.5_cifar10.pt", "cifar"),
    "mobilenet_v2": ("builtin:mobilenet_v2", "data/imagenet/calib"),
}


def capture(model_path: str, calib: str, n_images: int, seed: int) -> tuple[tuple, dict]:
    """The arguments ``budget_plan`` receives in a real ``compress --dry-run``."""
    import hfbconvert as hfb
    from hfbconvert import pipeline

    got: dict[str, Any] = {}
    real = pipeline.budget_plan

    def spy(*args: Any, **kwargs: Any):
        got["call"] = (args, kwargs)
        return real(*args, **kwargs)

    model, info = hfb.load_model(model_path)
    data = hfb.load_images(calib, info, size=n_images, seed=seed)
    pipeline.budget_plan = spy
    try:
        pipeline.compress(model, info, data, pipeline.CompressConfig(seed=seed), dry_run=True)
    finally:
        pipeline.budget_plan = real
    return got["call"]


def exact(opts: list, limit: float, add_cap: float) -> tuple[float, float]:
    """Optimal Σ werr of the knapsack (HiGHS MILP) and its solve time."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n = sum(len(lo) for lo in opts)
    c = np.array([o.werr for lo in opts for o in lo])
    a = lil_matrix((len(opts) + 2, n))
    j = 0
    for i, lo in enumerate(opts):
        for o in lo:
            a[i, j] = 1.0
            a[len(opts), j] = o.muls
            a[len(opts) + 1, j] = o.adds
            j += 1
    lo_b = np.r_[np.ones(len(opts)), -np.inf, -np.inf]
    hi_b = np.r_[np.ones(len(opts)), limit, add_cap]
    t = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(a.tocsr(), lo_b, hi_b),
               integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 1e-9, "time_limit": 120})
    sec = time.perf_counter() - t
    if res.x is None:
        return float("nan"), sec
    return float(res.fun), sec


def compare(args: tuple, kwargs: dict) -> list[dict[str, Any]]:
    from hfbconvert.plan import budget_plan, plan_caps, plan_options

    (layers, curves, energies, fragility, budgets, _budget, fixed_muls, original_muls,
     original_adds, max_add_increase, *rest) = args
    ratios = rest[0] if rest else kwargs.get("ratios", (1.0, 2.0))
    densities = rest[1] if len(rest) > 1 else kwargs.get("densities")
    bits = {k: kwargs[k] for k in ("weight_bits", "fp_bits", "act_bits") if k in kwargs}
    opts = plan_options(layers, curves, energies, fragility, budgets, ratios, densities,
                        **bits)
    cap = plan_caps(layers, original_adds, max_add_increase)[0]
    rows = []
    for b in BUDGETS:
        limit = b * original_muls - fixed_muls
        t = time.perf_counter()
        try:
            plans = budget_plan(layers, curves, energies, fragility, budgets, b, fixed_muls,
                                original_muls, original_adds, max_add_increase, ratios,
                                densities, **bits)
        except Exception as exc:  # an unreachable budget: say so in the row
            rows.append({"budget": b, "error": str(exc)})
            continue
        heur_s = time.perf_counter() - t
        heur = sum(fragility.get(p.name, 1.0) * p.predicted_err for p in plans)
        opt, opt_s = exact(opts, limit, cap)
        rows.append({"budget": b, "heuristic": heur, "optimum": opt,
                     "gap": (heur - opt) / opt if opt > 0 else 0.0,
                     "heuristic_s": heur_s, "milp_s": opt_s})
    return rows


def cifar_folder(shared: Path, out: Path, per_class: int = 100) -> str:
    """A CIFAR-10 train subset as an ImageFolder (extracted once)."""
    import tarfile

    root = out / "cifar10" / "train"
    if not root.exists():
        with tarfile.open(shared / "data/cifar10-jpeg.tar.gz") as tf:
            members, seen = [], {}
            for m in tf:
                parts = m.name.split("/")
                if len(parts) == 4 and parts[1] == "train" and m.isfile():
                    if seen.get(parts[2], 0) < per_class:
                        seen[parts[2]] = seen.get(parts[2], 0) + 1
                        members.append(m)
            tf.extractall(out, members=members, filter="data")
    return str(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="planner")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    shared = Path(os.environ.get("HFB_SHARED", "../shared")).resolve()
    out = {"tag": a.tag, "budgets": BUDGETS, "images": a.images, "models": {}}
    for name in a.models.split(","):
        model, calib = MODELS[name]
        model = model if model.startswith("builtin:") else str(shared / model)
        calib = cifar_folder(shared, Path("bench/results/tmp")) if calib == "cifar" else \
            str(shared / calib)
        call = capture(model, calib, a.images, a.seed)
        out["models"][name] = compare(*call)
        for r in out["models"][name]:
            print(name, json.dumps(r))
    path = Path("bench/results") / f"{a.tag}-planner-exact.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
