"""Branch-and-bound nodes and seconds the planner's MILP needs on real dry runs, budget by
budget: the evidence for ``plan.MILP_NODE_LIMIT`` (a node limit gives the same plan on
any machine; a time limit does not). Captures ``budget_plan``'s arguments from one real
``compress --dry-run`` per model (``bench.planner_exact.capture``), then plans each budget
with ``scipy.optimize.milp`` wrapped to record HiGHS's node count and wall time.

    OMP_NUM_THREADS=1 python -m bench.milp_nodes --models v1-0.5-160,cifar10-v1-0.5 \\
        --tag 20261203      -> bench/results/milp-nodes-TAG.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

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
    import scipy.optimize as so

    from hfbconvert import plan
    from hfbconvert.plan import MILP_NODE_LIMIT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="v1-0.5-160,cifar10-v1-0.5")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--tag", default="nodes")
    a = ap.parse_args()
    shared = Path(os.environ.get("HFB_SHARED", "../shared")).resolve()
    real, calls = so.milp, []

    def spy(*args: Any, **kwargs: Any):
        t = time.perf_counter()
        res = real(*args, **kwargs)
        calls.append({"nodes": int(getattr(res, "mip_node_count", -1)),
                      "seconds": time.perf_counter() - t, "status": int(res.status)})
        return res

    out: dict[str, Any] = {"tag": a.tag, "images": a.images, "node_limit": MILP_NODE_LIMIT,
                           "threads": os.environ.get("OMP_NUM_THREADS"), "models": {}}
    for name in a.models.split(","):
        args, kwargs = capture_model(name, shared, a.images)
        rows = []
        so.milp = spy
        try:
            for b in BUDGETS:
                calls.clear()
                call = list(args)
                call[5] = b
                plan.budget_plan(*call, **kwargs)
                rows.append({"budget": b, **calls[-1]})
        finally:
            so.milp = real
        out["models"][name] = rows
        print(name, max(r["nodes"] for r in rows), "nodes at most", flush=True)
    write_result(f"milp-nodes-{a.tag}.json", out)


if __name__ == "__main__":
    main()
