"""Short fine-tune probes on one fitted hybrid: does the distillation loss fall or rise at
a learning rate, with which parameters trained, with BatchNorm folded or not? Fits once
(``compress`` to the "fit" stage, library API, defaults otherwise), then runs each variant
for ``--steps`` steps from that same fit (same batches), checking the held-apart KL every
``--eval-every`` steps. Writes bench/results/finetune-probe-TAG.json. Calibration images
come from the tuning split's complement (``bench.splits``), so nothing here touches the
evaluation images.

Why: MobileNetV2's float fine-tune at the default lr 1e-4 is reverted (held KL 0.028 ->
0.081 in bench/results/recheck/v2-float-hybrid-20261203T143907Z.json); this says whether
the optimiser or the held-apart check is at fault.

    OMP_NUM_THREADS=1 python -m bench.finetune_probe --model builtin:mobilenet_v2 \\
        --variants all@1e-4,all@3e-5,all@1e-5,fold@1e-4 --tag v2

Variants are ``WHAT@LR``. WHAT: ``all`` (every continuous parameter, the default),
``no-bn`` (all but BatchNorm affine parameters), ``bn-only``, ``hybrid-only``, ``fold``
(BatchNorm folded into the layers first, as the int8 path does; all parameters), ``rel``
(per-tensor lr = LR x max(RMS of the tensor, 0.01): a scale-relative step), ``no17``
(all but the modules feeding MobileNetV2's amplifying BatchNorm, :data:`AMPLIFIED`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn

import hfbconvert.api as api
import hfbconvert.distill as D
from bench.splits import calib_splits
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.handlers import is_hybrid
from hfbconvert.pipeline import CompressConfig, compress, held_evaluator, normalizer

SHARED = os.environ.get("HFB_SHARED", "../shared")


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


# the modules upstream of MobileNetV2's amplifying BatchNorm (features.17.conv.1.1: 689 of
# 960 channels with running variance <= 1e-5, gain gamma/sqrt(var + eps) up to 107)
AMPLIFIED = ("features.17.conv.0", "features.17.conv.1")

KEEP: dict[str, Callable[[str, nn.Module], bool]] = {
    "all": lambda n, m: True, "fold": lambda n, m: True, "rel": lambda n, m: True,
    "no-bn": lambda n, m: not _is_bn(m), "bn-only": lambda n, m: _is_bn(m),
    "hybrid-only": lambda n, m: is_hybrid(m),
    "no17": lambda n, m: not n.startswith(AMPLIFIED),
}


def groups_for(what: str) -> Callable[[nn.Module, FinetuneConfig], list[dict]]:
    """A replacement for ``distill._param_groups``: the parameters ``what`` trains."""
    def groups(model: nn.Module, cfg: FinetuneConfig, scale: float = 1.0) -> list[dict]:
        out = []
        for name, m in model.named_modules():
            for _, p in m.named_parameters(recurse=False):
                if not KEEP[what](name, m):
                    continue
                lr = cfg.lr * scale
                if what == "rel":
                    rms = float(p.detach().pow(2).mean().sqrt()) if p.numel() else 0.0
                    lr = cfg.lr * scale * max(rms, 0.01)
                out.append({"params": [p], "lr": lr, "base_lr": lr})
        return out
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:mobilenet_v2")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"),
                    help="calibration folder; its tuning split is left out")
    ap.add_argument("--calib-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--variants", default="all@1e-4,all@1e-5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="x")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    net, info = api.load_model(a.model)
    split, _ = calib_splits(a.calib)
    data = api.load_images(split.path, info, size=a.calib_size, seed=a.seed)
    got: dict = {}

    def grab(name: str, st) -> None:
        if name == "fit" and "hybrid" not in got:
            got.update(hybrid=copy.deepcopy(st.hybrid), train=st.train, held=list(st.held))

    t = time.perf_counter()
    compress(net, info, data, CompressConfig(finetune=FinetuneConfig(steps=0), seed=a.seed),
             after_stage=grab)
    fit_s = time.perf_counter() - t
    teacher = copy.deepcopy(net).eval()
    ev = held_evaluator(teacher, got["held"])
    out = f"bench/results/finetune-probe-{a.tag}.json"
    res = {"tag": a.tag, "args": vars(a), "calib": {"split": split.name, "images": len(split.names),
                                             "list_sha256": split.sha256}, "fit_s": fit_s,
           "train_images": len(got["train"]), "held_images": sum(len(x) for x in got["held"]),
           "threads": torch.get_num_threads(), "variants": {}}
    default_groups = D._param_groups
    for spec in a.variants.split(","):
        what, lr = spec.split("@")
        student = copy.deepcopy(got["hybrid"])
        teacher_at = dict(fold_batchnorms(student)) if what == "fold" else None
        D._param_groups = groups_for(what)
        cfg = FinetuneConfig(steps=a.steps, lr=float(lr), eval_every=a.eval_every,
                             patience=10**6, seed=a.seed)
        t = time.perf_counter()
        try:
            log = finetune(student, teacher, got["train"].images, got["train"].labels,
                           normalizer(got["train"]), cfg, evaluate=ev, teacher_at=teacher_at)
        finally:
            D._param_groups = default_groups
        res["variants"][spec] = {"eval_steps": log.eval_steps, "held_kl": log.held_kl,
                                 "held_agreement": log.held_agreement, "loss": log.loss,
                                 "folded": len(teacher_at or {}),
                                 "seconds": time.perf_counter() - t}
        print(spec, json.dumps({k: res["variants"][spec][k] for k in ("held_kl", "seconds")}),
              flush=True)
        os.makedirs("bench/results", exist_ok=True)
        with open(out, "w") as f:  # after every variant: a killed run keeps what it measured
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
