"""One compress configuration on an ImageNet model through the library API: held-apart
agreement after each stage, val top-1, cost ratios; writes bench/results/ablation-TAG.json.

    python -m bench.ablation --tag base --ratios 1,2 --budgets 1,2,4 --n 1000
"""

import argparse
import json
import os
import time

import torch

from calib.presets import preset_for
from calib.readers import load_images
from hfbconvert.compress import CompressConfig, compress
from hfbconvert.evaluate import evaluate
from hfbconvert.finetune import FinetuneConfig
from hfbconvert.models.loading import load_model

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
a = ap.parse_args()
torch.manual_seed(0)
net, info = load_model(a.model)
prep = preset_for(info)
data = load_images(os.path.join(SHARED, "data/imagenet/calib"), prep, size=a.n, seed=0)
val = load_images(os.path.join(SHARED, "data/imagenet/val"), prep, size=a.val, seed=0)
cfg = CompressConfig(budget=a.budget, reconstruct=not a.no_reconstruct, weight_bits=32,
                     critical_fraction=a.cf,
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
       "top1": ev["top1"], "top1_orig": ev0["top1"], "agree_val": ev["agreement"],
       "mul_ratio": c["muls"] / o["muls"], "add_ratio": c["adds"] / o["adds"],
       "bytes_ratio": c.get("bytes", 0) / max(o.get("bytes", 1), 1), "elapsed": el,
       "plan": [(l["name"], l["n_critical"], l["r"]) for l in meta["plan"]["layers"]],
       "layer_errors": meta["layer_errors"]}
print(json.dumps({k: v for k, v in res.items() if k not in ("plan", "layer_errors")}, indent=1))
os.makedirs("bench/results", exist_ok=True)
with open(f"bench/results/ablation-{a.tag}.json", "w") as f:
    json.dump(res, f, indent=1)
