"""Where the int8 hybrid loses accuracy: ``compress --activation-bits 8`` run in process,
the network evaluated after each building stage, paired against the original and against
the stage before. Writes bench/results/int8-stages-TAG.json.

The stages (``hfbconvert.stages.stages_for``): ``add_cap`` (the one-shot hybrid fit, ADD
cap repaired), ``weight_quant`` (int8 weights), ``mean_shift``, ``activation_calibration``
(uint8 activations, int32 or uint8 hidden units), ``int8_finetune`` (distillation with
the quantizers in the forward); a float run (``--set activation_bits=32``) shows
``finetune`` instead. Evaluated on the tuning split by default (300 calibration images
held apart from calibration, bench/splits.py): for choosing a fix without touching the
evaluation images. Each row stores per-image results, top-1, agreement and KL with their
95% intervals, and the paired difference (bootstrap interval, McNemar's exact p) against
the original and against the previous row.

    OMP_NUM_THREADS=1 python -m bench.int8_stages --model builtin:mobilenet_v2 --tag v2
    ... --set hidden_bits=8 --tag v2-h8       # any CompressConfig field
    ... --set qat=false --set finetune.trainable=norm --tag v2-norm   # FinetuneConfig
    ... --set qat=false --set finetune.trainable=norm --then-int8-finetune bias  # both
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import fields, replace

import torch

from bench.splits import calib_splits, folder_split
from hfbconvert import stages
from hfbconvert.calib.presets import preset_for
from hfbconvert.calib.readers import load_images
from hfbconvert.distill import FinetuneConfig
from hfbconvert.evaluation import evaluate_per_image, per_image_record, summarize
from hfbconvert.metrics import discordant, mcnemar_exact, paired_difference_interval
from hfbconvert.models.loading import load_model
from hfbconvert.pipeline import CompressConfig, compress

SHARED = os.environ.get("HFB_SHARED", "../shared")
# the stages that change the network's function (bn_fold and freeze are exact rewrites)
EVALUATED = ("add_cap", "reconstruct", "finetune", "bn", "weight_quant", "mean_shift",
             "activation_calibration", "int8_finetune")


def paired(x, y) -> dict:
    """x - y over the same images: bootstrap interval and McNemar's exact p."""
    d, (lo, hi) = paired_difference_interval(x, y)
    b, c = discordant(x, y)
    return {"d": d, "lo": lo, "hi": hi, "p": mcnemar_exact(b, c), "only_x": b, "only_y": c}


def _typed(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() in ("none", ""):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_set(items: list[str]) -> tuple[dict, dict]:
    """``field=value`` pairs for CompressConfig (``finetune.field=value`` for its
    FinetuneConfig), values typed as written (bool, None, int, float, else str)."""
    top = {f.name for f in fields(CompressConfig)}
    sub = {f.name for f in fields(FinetuneConfig)}
    out: dict = {}
    ft: dict = {}
    for item in items:
        k, _, v = item.partition("=")
        if k.startswith("finetune."):
            if k[len("finetune."):] not in sub:
                raise SystemExit(f"--set {item}: no FinetuneConfig field {k[9:]!r}")
            ft[k[len("finetune."):]] = _typed(v)
        elif k in top and k != "finetune":
            out[k] = _typed(v)
        else:
            raise SystemExit(f"--set {item}: no CompressConfig field {k!r}")
    return out, ft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:mobilenet_v2")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--eval", default=os.path.join(SHARED, "data/imagenet/val"))
    ap.add_argument("--calib-size", type=int, default=1000)
    ap.add_argument("--split", choices=("tune", "eval"), default="tune",
                    help="tune: the tuning split; eval: --eval (reported figures only)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="CompressConfig override (default: activation_bits=8)")
    ap.add_argument("--steps", default="auto", help="fine-tune steps (auto: the CLI default)")
    ap.add_argument("--then-int8-finetune", choices=("bias", "all"), default=None,
                    help="after activation calibration (a --set qat=false run), fine-tune "
                         "these parameters with the quantizers in the loop as well")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="x")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cal_split, tune_split = calib_splits(a.calib)
    ev_split = tune_split if a.split == "tune" else folder_split("eval", a.eval)
    net, info = load_model(a.model)
    net.eval()
    prep = preset_for(info)
    cal = load_images(cal_split.path, prep, size=a.calib_size, seed=a.seed,
                      classes=info.classes)
    val = load_images(ev_split.path, prep, seed=0, classes=info.classes)
    top, ft = parse_set(a.set)
    overrides = {"activation_bits": 8, **top}
    steps = None if a.steps == "auto" else int(a.steps)
    cfg = CompressConfig(seed=a.seed, finetune=FinetuneConfig(steps=steps, **ft), **overrides)

    orig_pi = evaluate_per_image(net, val, info.label_offset)
    rows: list[dict] = []
    out = os.path.join(a.out, f"int8-stages-{a.tag}.json")
    os.makedirs(a.out, exist_ok=True)
    t_run = time.perf_counter()
    meta: dict = {}

    def save() -> None:
        """Rewritten after every row (atomically): a stopped run keeps what it measured."""
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"tag": a.tag, "args": vars(a), "config": cfg.to_dict(),
                       "split": {"eval": ev_split.record(), "calibration": cal_split.record()},
                       "top1_original": float(orig_pi.correct.mean()), "n_eval": len(val),
                       "original_per_image": per_image_record(orig_pi, val), "rows": rows,
                       "stages_log": meta.get("stages"), "timings": meta.get("timings"),
                       "seconds": round(time.perf_counter() - t_run, 1)}, f, indent=1)
        os.replace(tmp, out)

    prev = [orig_pi.correct]

    def after(name: str, st) -> None:
        if name not in EVALUATED:
            return
        measure(name, st)
        if name == "activation_calibration" and a.then_int8_finetune and st.finetune:
            # a second fine-tune, with the quantizers in the loop (the --no-qat path
            # already fine-tuned in float): the stage itself, on these parameters
            st.finetune = replace(st.finetune, trainable=a.then_int8_finetune)
            stages.int8_finetune(st)
            measure("int8_finetune", st)

    def measure(name: str, st) -> None:
        t = time.perf_counter()
        pi = evaluate_per_image(st.hybrid, val, info.label_offset, reference=st.original)
        r = summarize(pi)
        rows.append({"stage": name, "top1": r["top1"], "top1_ci": r["top1_ci95"],
                     "agreement": r["agreement"], "agreement_ci": r["agreement_ci95"],
                     "kl": r["kl"], "kl_ci": r["kl_ci95"],
                     "eval_seconds": round(time.perf_counter() - t, 1),
                     "at_seconds": round(time.perf_counter() - t_run, 1),
                     "vs_original": paired(pi.correct, orig_pi.correct),
                     "vs_previous_row": paired(pi.correct, prev[0]),
                     "per_image": per_image_record(pi, val)})
        prev[0] = pi.correct
        save()
        print(json.dumps({k: x for k, x in rows[-1].items() if k != "per_image"}), flush=True)

    _, meta = compress(net, info, cal, cfg, after_stage=after)
    save()
    print(out)


if __name__ == "__main__":
    main()
