"""One compress configuration through the library API: held-apart agreement after each
stage, top-1 on labelled eval images, cost ratios; writes bench/results/ablation-TAG.json.
ImageNet (shared calib/val folders) unless ``--calib``/``--eval`` name other folders.

    python -m bench.ablation --tag base --ratios 1,2 --budgets 1,2,4 --n 1000
    python -m bench.ablation --tag c10 --model $HFB_SHARED/models/mobilenet_v1_0.5_cifar10.pt \
        --calib CIFAR/train --eval CIFAR/test --n 2000 --val 2000 --bn-adjust match
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
ap.add_argument("--budget", type=float, default=0.536)
ap.add_argument("--ratios", default="1,2")
ap.add_argument("--budgets", default="1,2,4")
ap.add_argument("--n", type=int, default=1000)
ap.add_argument("--steps", type=int, default=0)
ap.add_argument("--fw", type=float, default=1.0)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--latent-lr", type=float, default=2e-3)
ap.add_argument("--cf", type=float, default=None)
ap.add_argument("--val", type=int, default=1300)
ap.add_argument("--tag", default="x")
ap.add_argument("--no-reconstruct", action="store_true")
ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"),
                help="calibration images (a seeded --n of them)")
ap.add_argument("--eval", default=os.path.join(SHARED, "data/imagenet/val"),
                help="labelled images for top-1 (a seeded --val of them)")
ap.add_argument("--bn-adjust", default="off", choices=["off", "match", "reestimate"],
                help="BatchNorm stage after the fit (CompressConfig.bn_adjust)")
ap.add_argument("--bn-scope", default="pointwise", choices=["pointwise", "all"])
a = ap.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
torch.manual_seed(0)
net, info = load_model(a.model)
prep = preset_for(info)
data = load_images(a.calib, prep, size=a.n, seed=0, classes=info.classes)
val = load_images(a.eval, prep, size=a.val, seed=0, classes=info.classes)
cfg = CompressConfig(budget=a.budget, reconstruct=not a.no_reconstruct, weight_bits=32,
                     critical_fraction=a.cf, bn_adjust=a.bn_adjust, bn_scope=a.bn_scope,
    ratios=tuple(float(x) for x in a.ratios.split(",")),
    budgets=tuple(int(x) for x in a.budgets.split(",")),
    finetune=FinetuneConfig(steps=a.steps, feature_weight=a.fw, lr=a.lr, latent_lr=a.latent_lr))
t = time.time()
h, meta = compress(net, info, data, cfg)
el = time.time() - t
ev = evaluate(h, val, info.label_offset, reference=net)
ev0 = evaluate(net, val, info.label_offset)
c, o = meta["cost"]["totals"], meta["original_cost"]["totals"]
res = {"tag": a.tag, "args": vars(a), "stages": meta["stages"], "timings": meta["timings"],
       "n_eval": len(val), "top1": ev["top1"], "top1_orig": ev0["top1"],
       "agree_val": ev["agreement"],
       "mul_ratio": c["muls"] / o["muls"], "add_ratio": c["adds"] / o["adds"],
       "bytes_ratio": c.get("bytes", 0) / max(o.get("bytes", 1), 1), "elapsed": el,
       "plan": [(l["name"], l["n_critical"], l["r"]) for l in meta["plan"]["layers"]],
       "layer_errors": meta["layer_errors"], "bn_adjust": meta.get("bn_adjust"),
       "bn_adjust_skipped": meta.get("bn_adjust_skipped")}
print(json.dumps({k: v for k, v in res.items() if k not in ("plan", "layer_errors")}, indent=1))
os.makedirs("bench/results", exist_ok=True)
with open(f"bench/results/ablation-{a.tag}.json", "w") as f:
    json.dump(res, f, indent=1)
