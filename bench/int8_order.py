"""Int8 post-training stages applied to the *original* model, in a chosen order: which
stage costs what, and where the mean-shift correction belongs. Writes
bench/results/int8-order-TAG.json.

A variant is a string of stage letters run left to right after BN folding:
``w`` per-channel int8 weights (MSE clip search), ``X`` the same with max-abs scales,
``a`` uint8 activations (``compress``'s calibration), ``s`` the mean-shift correction;
flags anywhere in it: ``m`` MinMax activation ranges instead of the clip search, ``L``
no mean shift on Linear layers. ``wsa`` is what ``compress --activation-bits 8`` does.

    OMP_NUM_THREADS=1 python -m bench.int8_order --model builtin:mobilenet_v2 \\
        --variants w,a,ws,wa,was,wsa --tag v2

``--split tune`` calibrates on the calibration folder minus its tuning split and
evaluates on the tuning split (bench/splits.py): for choosing a stage order without
touching the evaluation images. Each row then also stores its per-image results and its
paired difference against the original and against the row before it (the stage
added), with McNemar's exact p.
"""

import argparse
import copy
import json
import os
import time

import torch

from hfbconvert import actquant
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.calib.presets import preset_for
from hfbconvert.calib.readers import load_images
from hfbconvert.meanshift import correction_sites, match_output_means
from hfbconvert.models.loading import load_model
from hfbconvert.pipeline import CompressConfig, normalizer
from hfbconvert.weightquant import CLIP_RATIOS as W_CLIP
from hfbconvert.weightquant import apply_weight_bits

SHARED = os.environ.get("HFB_SHARED", "../shared")
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
ap.add_argument("--eval", default=os.path.join(SHARED, "data/imagenet/val"))
ap.add_argument("--n", type=int, default=1000, help="calibration images (seeded sample)")
ap.add_argument("--val", type=int, default=1300, help="eval images (seeded sample)")
ap.add_argument("--variants", default="w,a,ws,wa,was,wsa")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tag", default="x")
ap.add_argument("--split", choices=("eval", "tune"), default="eval",
                help="eval: --eval images; tune: the tuning split (calibration without it)")
a = ap.parse_args()
splits = {}
if a.split == "tune":
    from bench.splits import calib_splits

    _cal, _tune = calib_splits(a.calib)
    splits = {"calibration": _cal.record(), "tuning": _tune.record()}
    a.calib, a.eval, a.val = str(_cal.path), str(_tune.path), len(_tune.names)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
net, info = load_model(a.model)
net.eval()
prep = preset_for(info)
cal = load_images(a.calib, prep, size=a.n, seed=a.seed, classes=info.classes)
val = load_images(a.eval, prep, size=a.val, seed=0, classes=info.classes)
norm = normalizer(cal)
n_act = CompressConfig.act_calib_images


def sample(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return norm(cal.images[torch.randperm(len(cal), generator=g)[:n_act]])


def mean_shift(m: torch.nn.Module, pairs: list, variant: str) -> None:
    layers, owners = correction_sites(m, [tuple(p) for p in pairs])
    if "L" in variant:
        for k in [k for k, o in owners.items() if isinstance(o, torch.nn.Linear)]:
            layers.pop(k)
            owners.pop(k)
    match_output_means(m, net, sample(a.seed + 4), layers, owners)


from hfbconvert.evaluation import evaluate_per_image, per_image_record, summarize  # noqa: E402
from hfbconvert.metrics import discordant, mcnemar_exact, paired_difference_interval  # noqa: E402


def paired(x, y) -> dict:
    """x - y over the same images: bootstrap interval and McNemar's exact p."""
    d, (lo, hi) = paired_difference_interval(x, y)
    b, c = discordant(x, y)
    return {"d": d, "lo": lo, "hi": hi, "p": mcnemar_exact(b, c), "only_x": b, "only_y": c}


orig_pi = evaluate_per_image(net, val, info.label_offset)
orig = float(orig_pi.correct.mean())
rows: list[dict] = []
os.makedirs("bench/results", exist_ok=True)
out = f"bench/results/int8-order-{a.tag}.json"


def save() -> None:
    """Rewritten after every row (atomically), so a stopped run keeps what it measured."""
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"tag": a.tag, "args": vars(a), "top1_original": orig, "n_eval": len(val),
                   "split": a.split, "splits": splits,
                   "original_per_image": per_image_record(orig_pi, val), "rows": rows}, f,
                  indent=1)
    os.replace(tmp, out)


prev = orig_pi.correct
for v in a.variants.split(","):
    t = time.perf_counter()
    m = copy.deepcopy(net).eval()
    pairs = fold_batchnorms(m)
    ranges = (1.0,) if "m" in v else actquant.CLIP_RATIOS
    for stage in v:
        if stage in "wX":
            apply_weight_bits(m, 8, clip_ratios=(1.0,) if stage == "X" else W_CLIP)
        elif stage == "a":
            actquant.attach(m)
            actquant.calibrate(m, sample(a.seed + 3), seed=a.seed, clip_ratios=ranges)
        elif stage == "s":
            mean_shift(m, pairs, v)
    pi = evaluate_per_image(m, val, info.label_offset, reference=net)
    r = summarize(pi)
    rows.append({"variant": v, "top1": r["top1"], "agreement": r["agreement"], "kl": r["kl"],
                 "seconds": round(time.perf_counter() - t, 1),
                 "vs_original": paired(pi.correct, orig_pi.correct),
                 "vs_previous_row": paired(pi.correct, prev),
                 "per_image": per_image_record(pi, val)})
    prev = pi.correct
    save()
    print(json.dumps({k: x for k, x in rows[-1].items() if k != "per_image"}), flush=True)
print(out)
