"""The planner's MILP with its costs scaled to an optimum of about 1 (``plan._unit_objective``)
against the raw predicted errors it took before, on real dry runs, budget by budget, at
one or more relative gaps (``plan.MILP_REL_GAP``): the objective each reaches (in raw
units), whether the plan differs from the raw one, the seconds and the branch-and-bound
nodes. The raw costs' optimum can be 1e-5, where HiGHS's absolute gap (1e-6) and
tolerances decide when a plan is "optimal". Captures ``budget_plan``'s arguments from one
real ``compress --dry-run`` per model (``bench.planner_exact.capture``). It records the
node counts behind ``plan.MILP_NODE_LIMIT`` too, and replaces ``bench.milp_nodes``, whose
``bench/results/milp-nodes-20261203.json`` holds the raw-cost planner's counts.

    OMP_NUM_THREADS=1 python -m bench.milp_scale --models v1-0.5-160,cifar10-v1-0.5 \\
        --gaps 1e-6,1e-4 --tag 20261203      -> bench/results/milp-scale-TAG.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.planner_exact import MODELS, capture, cifar_folder

BUDGETS = (0.3, 0.4, 0.45, 0.5, 0.536, 0.55, 0.6, 0.65, 0.7, 0.8)


def capture_model(name: str, shared: Path, images: int) -> tuple[tuple, dict]:
    """``budget_plan``'s arguments from a real dry run of shared model ``name``."""
    rel, calib = MODELS[name]
    model = rel if rel.startswith("builtin:") else str(shared / rel)
    calib = cifar_folder(shared, Path.home() / ".cache/hfbconvert/planner") \
        if calib == "cifar" else str(shared / calib)
    return capture(model, calib, images, 0)


def write_result(name: str, out: dict) -> None:
    path = Path("bench/results") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)


def main() -> None:
    import scipy.optimize as scipy_opt

    from hfbconvert import plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="v1-0.5-160,cifar10-v1-0.5")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--gaps", default="1e-6", help="relative gaps to run the scaled MILP at")
    ap.add_argument("--tag", default="scale")
    a = ap.parse_args()
    shared = Path(os.environ.get("HFB_SHARED", "../shared")).resolve()
    scaled, gap0 = plan._unit_objective, plan.MILP_REL_GAP

    def raw(werr: list[float], *_: Any) -> np.ndarray:
        return np.asarray(werr, dtype=np.float64)

    real_choice, real_milp, picked, nodes = plan.exact_choice, scipy_opt.milp, [], []

    def milp_spy(*args: Any, **kwargs: Any):
        res = real_milp(*args, **kwargs)
        if kwargs.get("integrality") is not None and kwargs["integrality"] != 0:
            nodes.append(int(getattr(res, "mip_node_count", -1)))
        return res

    def choice_spy(*args: Any, **kwargs: Any):
        sel = real_choice(*args, **kwargs)
        picked.append(sel)
        return sel

    variants = [("raw", raw, 1e-6)] + [(f"scaled@{g}", scaled, float(g))
                                       for g in a.gaps.split(",")]
    out: dict[str, Any] = {"tag": a.tag, "images": a.images, "node_limit": plan.MILP_NODE_LIMIT,
                           "threads": os.environ.get("OMP_NUM_THREADS"), "models": {}}
    plan.exact_choice, scipy_opt.milp = choice_spy, milp_spy
    try:
        for name in a.models.split(","):
            args, kwargs = capture_model(name, shared, a.images)
            rows = []
            for b in BUDGETS:
                call = list(args)
                call[5] = b
                row: dict[str, Any] = {"budget": b}
                for label, fn, gap in variants:
                    plan._unit_objective, plan.MILP_REL_GAP = fn, gap
                    picked.clear()
                    nodes.clear()
                    t = time.perf_counter()
                    plan.budget_plan(*call, **kwargs)
                    sel = picked[-1]
                    row[label] = {
                        "seconds": round(time.perf_counter() - t, 3),
                        "nodes": nodes[-1] if nodes else None,
                        "objective": None if sel is None else float(sum(o.werr for o in sel)),
                        "choice": None if sel is None else [[o.n_c, o.r] for o in sel]}
                base = row["raw"]
                for label, *_ in variants[1:]:
                    v = row[label]
                    v["same_plan_as_raw"] = v["choice"] == base["choice"]
                    v["vs_raw"] = None if not base["objective"] or v["objective"] is None \
                        else v["objective"] / base["objective"] - 1
                for label, *_ in variants:
                    del row[label]["choice"]
                rows.append(row)
                print(name, b, json.dumps(row), flush=True)
            out["models"][name] = rows
    finally:
        plan.exact_choice, scipy_opt.milp = real_choice, real_milp
        plan._unit_objective, plan.MILP_REL_GAP = scaled, gap0
    write_result(f"milp-scale-{a.tag}.json", out)


if __name__ == "__main__":
    main()
