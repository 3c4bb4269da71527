"""ResNet-18 with 3x3 hybrid filter banks: MULs, ADDs and energy of the dense model
against the hybrid (``--layers pointwise,linear,conv``), costs only.

The paper's argument for hybrid banks is per layer: some filters of a layer are
approximated well by a few shared ternary hidden units, the rest stay full precision.
ResNet-18's 3x3 convs hold ~99% of its MULs (its 1x1 downsamples and fc ~1%), so
pointwise/linear banks alone cannot move its cost; k×k banks over im2col rows can. This
script measures by how much, under the same planner and ADD cap as every other model.

Random weights (no ImageNet ResNet-18 weights are reachable here) and no calibration
data: the plan and the fit are in weight space (Σ = I) and nothing is fine-tuned, so
this says what the cost model counts, nothing about accuracy. ADDs are counted from the
real ternary non-zeros after fitting; the ADD cap (1.48x) is checked on those counts, and
the pipeline re-plans with the fitted codes' densities when they exceed it (each run's
``add_repair``). The stem (conv1, 7x7 on 3 channels) stays full
precision, as the first layer does in the paper.

    flock /tmp/hfb-heavy.lock python -m bench.resnet_kxk   # bench/results/resnet18-kxk.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

BUDGETS = (0.536, 0.75)
RESOLUTION = 224


def layer_rows(cost: Any, model: Any) -> dict[str, int]:
    """MULs of the dense model by layer kind (handlers' cost kinds)."""
    out: dict[str, int] = {}
    for c in cost.layers:
        out[c.kind] = out.get(c.kind, 0) + c.muls
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    import hfbconvert
    from hfbconvert.costs import model_cost
    from hfbconvert.distill import FinetuneConfig
    from hfbconvert.models import families
    from hfbconvert.models.info import ModelInfo
    from hfbconvert.pipeline import CompressConfig, compress

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="bench/results/resnet18-kxk.json",
                    help="Where to write the results JSON.")
    ap.add_argument("--resolution", type=int, default=RESOLUTION, help="Input pixels.")
    ap.add_argument("--seed", type=int, default=0, help="Weights and planner seed.")
    args = ap.parse_args(argv)

    fam, cfg = families.resolve("resnet18")
    torch.manual_seed(args.seed)
    net = families.FAMILIES[fam](**cfg).eval()
    info = ModelInfo(arch="custom", config={}, resolution=args.resolution)
    dense = model_cost(net, args.resolution)
    runs = []
    for budget in BUDGETS:
        c = CompressConfig(budget=budget, layer_kinds=("pointwise", "linear", "conv"),
                           exclude=("conv1",), seed=args.seed, weight_bits=32,
                           finetune=FinetuneConfig(steps=0))
        t0 = time.perf_counter()
        hybrid, meta = compress(net, info, None, c)
        secs = time.perf_counter() - t0
        assert hybrid is not None
        cost = model_cost(hybrid, args.resolution)
        by = {lp["name"]: lp for lp in meta["plan"]["layers"]}
        kernels = {ly["name"]: ly.get("kernel", 1) for ly in meta["layers"]}
        runs.append({
            "budget": budget,
            "totals": cost.totals(),
            "muls_ratio": cost.muls / dense.muls,
            "adds_ratio": cost.adds / dense.adds,
            "energy_ratio": cost.energy_pj / dense.energy_pj,
            "layers_converted": {k: sum(1 for n in by if kernels[n] == kk)
                                 for k, kk in (("3x3", 3), ("1x1_or_linear", 1))},
            "layers": [{"name": n, "kernel": kernels[n], "c_in": lp["c_in"],
                        "c_out": lp["c_out"], "critical": lp["n_critical"], "r": lp["r"]}
                       for n, lp in by.items()],
            "add_cap": meta.get("add_cap"),
            # re-plans after the fit counted more ADDs than the cap (stages.add_cap)
            "add_repair": meta.get("add_repair", []),
            "seconds": round(secs, 1),
        })
        print(f"budget {budget}: MULs {cost.muls / dense.muls:.4f}, ADDs "
              f"{cost.adds / dense.adds:.4f}, energy {cost.energy_pj / dense.energy_pj:.4f} "
              f"of dense ({secs:.0f} s)", file=sys.stderr)
    res = {
        "what": "ResNet-18 dense vs hybrid with 3x3 banks (--layers pointwise,linear,conv, "
                "conv1 excluded), costs only: random weights, weight-space fit, no fine-tune",
        "command": "flock /tmp/hfb-heavy.lock python -m bench.resnet_kxk "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "resolution": args.resolution, "seed": args.seed,
        "hfbconvert": hfbconvert.__version__, "torch": torch.__version__,
        "python": platform.python_version(),
        "dense": {"totals": dense.totals(), "muls_by_kind": layer_rows(dense, net)},
        "hybrid": runs,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
