"""What int8 weight rounding costs the hybrid, by layer group, and what error-feedback
(GPTQ) rounding recovers. Writes bench/results/int8-rounding-TAG.json.

``compress --activation-bits 8`` runs in process up to the folded float hybrid (after
``bn_fold``, before any weight is rounded); then the network's full-precision weights are
rounded to int8 -- all of them, or one group (stem/k×k convs, depthwise/grouped convs,
the hybrid layers' critical filters, other convs and linears) -- by nearest rounding and by
:func:`hfbconvert.weightquant.quantize_int8_gptq` (moments from 128 calibration images,
as the ``weight_quant`` stage takes them). Each variant: top-1, agreement and KL to the
original with 95% intervals on the tuning split (300 calibration images held apart,
bench/splits.py), and the paired per-image KL difference gptq − nearest.

    OMP_NUM_THREADS=2 python -m bench.int8_rounding --model builtin:mobilenet_v2 --tag v2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from bench.int8_stages import paired
from bench.splits import calib_splits
from hfbconvert import weightquant as WQ
from hfbconvert.calib.presets import preset_for
from hfbconvert.calib.readers import load_images
from hfbconvert.distill import FinetuneConfig
from hfbconvert.evaluation import evaluate_per_image, summarize
from hfbconvert.handlers import is_hybrid
from hfbconvert.metrics import bootstrap_mean_interval
from hfbconvert.models.loading import load_model
from hfbconvert.pipeline import CompressConfig, _batches, compress
from hfbconvert.stages import stage_seed

SHARED = os.environ.get("HFB_SHARED", "../shared")


class _Folded(Exception):
    """Stops compress once the float hybrid is folded (nothing rounded yet)."""


def group_of(mod: nn.Module) -> str:
    if is_hybrid(mod):
        return "critical filters"
    if isinstance(mod, nn.Conv2d) and mod.groups > 1:
        return "depthwise/grouped"
    if isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) != (1, 1):
        return "stem/kxk"
    return "other conv/linear"


def folded_hybrid(net: nn.Module, info, cal, seed: int) -> tuple[nn.Module, nn.Module]:
    """(folded float hybrid, original) of ``compress --activation-bits 8 --steps 0``."""
    cfg = CompressConfig(seed=seed, activation_bits=8, finetune=FinetuneConfig(steps=0))
    got: dict = {}

    def after(name: str, st) -> None:
        if name == "bn_fold":
            got["h"], got["o"] = st.hybrid, st.original
            raise _Folded

    try:
        compress(net, info, cal, cfg, after_stage=after)
    except _Folded:
        pass
    return got["h"].eval(), got["o"].eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:mobilenet_v2")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--calib-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="x")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    cal_split, tune_split = calib_splits(a.calib)
    net, info = load_model(a.model)
    net.eval()
    prep = preset_for(info)
    cal = load_images(cal_split.path, prep, size=a.calib_size, seed=a.seed, classes=info.classes)
    val = load_images(tune_split.path, prep, seed=0, classes=info.classes)
    hyb, orig = folded_hybrid(net, info, cal, a.seed)
    t = time.perf_counter()
    n_mom = CompressConfig.act_calib_images
    parts = [x for b in _batches(cal, n_mom, seed=stage_seed(a.seed, "weight_quant"))
             for x in b.split(8)]
    moments = WQ.input_moments(hyb, parts, seed=stage_seed(a.seed, "weight_quant"))
    moments_s = time.perf_counter() - t
    groups: dict[str, set[str]] = {}
    for name, mod, _ in WQ.weight_params(hyb):
        groups.setdefault(group_of(mod), set()).add(name)
    scopes = {"all": set().union(*groups.values()), **groups}

    def measure(m: nn.Module):
        pi = evaluate_per_image(m, val, info.label_offset, reference=orig)
        return summarize(pi), pi

    @torch.no_grad()
    def rounded(names: set[str], rounding: str) -> tuple[nn.Module, int]:
        """A copy with the ``names`` weights rounded; channels that kept nearest codes."""
        m, kept = copy.deepcopy(hyb), 0
        for n, mod, attr in WQ.weight_params(m):
            if n in names:
                p = getattr(mod, attr)
                if rounding == "gptq":
                    codes, scale, st = WQ.quantize_int8_gptq(p.data, moments[n])
                    p.data.copy_(WQ.dequantize_int8(codes, scale))
                    kept += st["nearest_channels"]
                else:
                    p.data.copy_(WQ.fake_quant(p.data, 8))
        return m, kept

    base, _ = measure(hyb)
    rows = [{"variant": "float (folded hybrid)", "scope": None, "rounding": None, **base}]
    for scope, names in scopes.items():
        pis = {}
        for rounding in ("nearest", "gptq"):
            t = time.perf_counter()
            m, kept = rounded(names, rounding)
            secs = round(time.perf_counter() - t, 1)
            s, pis[rounding] = measure(m)
            rows.append({"variant": f"{scope}: {rounding}", "scope": scope, "rounding": rounding,
                         "weights": len(names), "round_seconds": secs,
                         "nearest_channels": kept, **s})
        g, n = pis["gptq"], pis["nearest"]
        d, (lo, hi) = bootstrap_mean_interval(g.kl - n.kl)
        rows[-1]["kl_vs_nearest"] = {"d": d, "lo": lo, "hi": hi}
        rows[-1]["top1_vs_nearest"] = paired(g.correct, n.correct)
        rows[-1]["agreement_vs_nearest"] = paired(g.agree, n.agree)
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    os.makedirs(a.out, exist_ok=True)
    out = os.path.join(a.out, f"int8-rounding-{a.tag}.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"tag": a.tag, "args": vars(a), "split": {"eval": tune_split.record(),
                                                             "calibration": cal_split.record()},
                   "moment_images": n_mom, "moments_seconds": round(moments_s, 1),
                   "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(out)


if __name__ == "__main__":
    main()
