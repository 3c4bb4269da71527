"""Fine-tuning ablation: the whole ``compress`` (library API) at several fine-tune lengths,
top-1 and agreement on labelled eval images, compress wall time; writes
bench/results/finetune-TAG.json. One compress per length, so every row is what a user gets
from ``compress --steps N`` (fit, fine-tune, freeze, storage rounding).

    OMP_NUM_THREADS=1 python -m bench.finetune_curve --tag v1-s0 --steps 0,100,300,1000
"""

import argparse
import json
import os
import time

import torch

from hfbconvert.calib.presets import preset_for
from hfbconvert.calib.readers import load_images
from hfbconvert.distill import FinetuneConfig
from hfbconvert.evaluation import evaluate
from hfbconvert.models.loading import load_model
from hfbconvert.pipeline import CompressConfig, compress

SHARED = os.environ.get("HFB_SHARED", "../shared")
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
ap.add_argument("--eval", default=os.path.join(SHARED, "data/imagenet/val"))
ap.add_argument("--n", type=int, default=2000, help="calibration images (seeded sample)")
ap.add_argument("--val", type=int, default=1300, help="eval images (seeded sample)")
ap.add_argument("--budget", type=float, default=0.536)
ap.add_argument("--steps", default="0,100,300,1000")
ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
ap.add_argument("--feature-weight", type=float, default=FinetuneConfig.feature_weight,
                help="weight of the per-layer feature-map term (0: logits only)")
ap.add_argument("--freeze-at", type=float, default=FinetuneConfig.freeze_at)
ap.add_argument("--eval-every", type=int, default=FinetuneConfig.eval_every,
                help="held-apart check every N steps (FinetuneConfig.eval_every)")
ap.add_argument("--patience", type=int, default=FinetuneConfig.patience,
                help="checks without a new best before early stopping; a large value "
                     "runs every step (the curve without early stopping)")
ap.add_argument("--seed", type=int, default=0, help="calibration sample and compress seed")
ap.add_argument("--stats-images", type=int, default=CompressConfig.stats_images,
                help="images behind each layer's input statistics (CompressConfig)")
ap.add_argument("--critical-fraction", type=float, default=None,
                help="paper-style uniform plan: this fraction of every layer stays FP")
ap.add_argument("--hidden-units-ratio", type=float, default=1.0,
                help="uniform plan: hidden units per tolerant filter")
ap.add_argument("--size-budget", type=float, default=None,
                help="cap on stored bytes, fraction of the FP32 weights (CompressConfig)")
ap.add_argument("--energy-budget", type=float, default=None,
                help="cap on arithmetic energy, fraction of the original's (CompressConfig)")
ap.add_argument("--activation-bits", type=int, default=32, help="8: int8 (weights int8 too)")
ap.add_argument("--tag", default="x")
a = ap.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
net, info = load_model(a.model)
prep = preset_for(info)
data = load_images(a.calib, prep, size=a.n, seed=a.seed, classes=info.classes)
val = load_images(a.eval, prep, size=a.val, seed=0, classes=info.classes)
orig = evaluate(net, val, info.label_offset)["top1"]
rows = []
out = f"bench/results/finetune-{a.tag}.json"
os.makedirs("bench/results", exist_ok=True)
for steps in (int(s) for s in a.steps.split(",")):
    ft = FinetuneConfig(steps=steps, lr=a.lr, freeze_at=a.freeze_at, seed=a.seed,
                        feature_weight=a.feature_weight, eval_every=a.eval_every,
                        patience=a.patience)
    cfg = CompressConfig(budget=a.budget, seed=a.seed, stats_images=a.stats_images, finetune=ft,
                         critical_fraction=a.critical_fraction,
                         hidden_units_ratio=a.hidden_units_ratio, size_budget=a.size_budget,
                         energy_budget=a.energy_budget,
                         activation_bits=a.activation_bits,
                         weight_bits=8 if a.activation_bits == 8 else CompressConfig.weight_bits)
    t = time.perf_counter()
    h, meta = compress(net, info, data, cfg)
    wall = time.perf_counter() - t
    ev = evaluate(h, val, info.label_offset, reference=net)
    c, o = meta["cost"]["totals"], meta["original_cost"]["totals"]
    rows.append({"steps": steps, "top1": ev["top1"], "drop_points": 100 * (orig - ev["top1"]),
                 "agreement": ev["agreement"], "compress_s": wall,
                 "finetune_s": meta["timings"].get("finetune_s", 0.0),
                 "held_agreement": meta["stages"][-1]["agreement"],
                 "mul_ratio": c["muls"] / o["muls"], "add_ratio": c["adds"] / o["adds"],
                 "bytes_ratio": c["bytes"] / o["bytes"], "energy_pj": c["energy_pj"],
                 "held_kl": meta.get("finetune_held_kl"),
                 "reverted": meta.get("finetune_reverted"),
                 "held_curve": {k: meta.get("finetune_log", {}).get(k) for k in
                                ("eval_steps", "held_kl", "held_agreement", "held_top1",
                                 "best_step", "stopped_early_at")}})
    print(json.dumps(rows[-1]), flush=True)
    with open(out, "w") as f:  # after every row: a killed run keeps what it measured
        json.dump({"tag": a.tag, "args": vars(a), "top1_original": orig, "n_eval": len(val),
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
