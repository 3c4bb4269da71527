"""What int8 weight rounding costs the hybrid, by layer group, and what error-feedback
(GPTQ) rounding recovers. Writes bench/results/int8-rounding-TAG.json.

``compress --activation-bits 8`` runs in process up to the folded float hybrid (after
``bn_fold``, before any weight is rounded); then the network's full-precision weights are
rounded to int8 -- all of them, or one group (stem/k×k convs, depthwise/grouped convs,
the hybrid layers' critical filters, other convs and linears) -- by nearest rounding and by
:func:`hfbconvert.weightquant.quantize_int8_gptq` (moments from 128 calibration images,
as the ``weight_quant`` stage takes them). Each variant: top-1, agreement and KL to the
original with 95% intervals on the tuning split (300 calibration images held apart,
bench/splits.py), and the paired per-image KL difference gptq − nearest. Then the whole
post-training chain on all weights, as the stages run it: nearest + mean shift (the
default), gptq alone, gptq + mean shift, each followed by the uint8 activation quantizers,
paired against the default; and gptq against the quantized inputs: activation ranges on
the float weights, each weight corrected by least squares towards the float network's
outputs from its quantized inputs, rounded by gptq on E[x_q x_qᵀ], ranges re-calibrated;
``@output`` chains, whose activation ranges minimise each layer's output error
(``actquant.calibrate(..., objective="output")``), and ``@dwchan`` chains, with one range
per channel on each depthwise conv's input. ``--chains`` picks the chains.

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
from hfbconvert import actquant
from hfbconvert import weightquant as WQ
from hfbconvert.calib.presets import preset_for
from hfbconvert.calib.readers import load_images
from hfbconvert.distill import FinetuneConfig
from hfbconvert.evaluation import evaluate_per_image, summarize
from hfbconvert.handlers import is_hybrid
from hfbconvert.meanshift import correction_sites, match_output_means
from hfbconvert.metrics import bootstrap_mean_interval
from hfbconvert.models.loading import load_model
from hfbconvert.pipeline import CompressConfig, _batches, compress
from hfbconvert.stages import stage_seed

SHARED = os.environ.get("HFB_SHARED", "../shared")
MOMENT_IMAGES = CompressConfig.act_calib_images  # as the weight_quant stage takes them
# post-training chains compared; the first is what compress does by default
CHAINS = ("nearest+mean_shift", "gptq", "gptq+mean_shift", "gptq_qin",
          "nearest+mean_shift@output", "gptq@output", "nearest+mean_shift@dwchan",
          "gptq@dwchan")
# "@output": activation ranges by the least squared error of each layer's output
# (actquant.calibrate objective "output") instead of the tensor's own; "@dwchan": each
# depthwise conv's input quantized with one range per channel (actquant.fit_channels)
DAMP = 0.01  # GPTQ's dampening of E[x_q x_qᵀ], fraction of its mean diagonal


def paired_moments(flt: nn.Module, qnt: nn.Module, images: torch.Tensor, seed: int,
                   rows_per_image: int = WQ.MOMENT_ROWS_PER_IMAGE,
                   only: set[str] | None = None) -> dict[str, tuple]:
    """Per full-precision weight of ``qnt`` (int8 activations attached and calibrated;
    ``only`` those named): ``(E[x_q x_qᵀ], E[x_f x_qᵀ])`` (groups, fan_in, fan_in) over
    the same sampled output positions, ``x_q`` what the weight multiplies in ``qnt`` (its
    input after its quantizer) and ``x_f`` the same position's input in the float network
    ``flt``."""
    from hfbconvert.handlers import handler_for

    names = [n for n, _, _ in WQ.weight_params(qnt) if only is None or n in only]
    rows: dict[str, dict[str, torch.Tensor]] = {"f": {}, "q": {}}
    acc: dict[str, list] = {}

    def capture(net: nn.Module, key: str, gen: torch.Generator) -> list:
        handles = []
        for name, mod, _ in WQ.weight_params(net):
            if name not in names:
                continue
            h = handler_for(mod)

            def hook(m, inp, _n=name, _h=h):
                x = inp[0].detach()
                if key == "q" and getattr(m, "input_quant", None) is not None:
                    x = m.input_quant(x)
                rows[key][_n] = WQ.sampled_inputs(_h, m, x, rows_per_image, gen)
            handles.append(mod.register_forward_pre_hook(hook, prepend=True))
        return handles

    with torch.no_grad():
        for part in images.split(WQ.MOMENT_BATCH):
            for net, key in ((flt, "f"), (qnt, "q")):
                # one generator per net, seeded alike: the same positions in both
                gen = torch.Generator().manual_seed(seed)
                handles = capture(net, key, gen)
                try:
                    net.eval()(part)
                finally:
                    for hd in handles:
                        hd.remove()
            for n in names:
                rf, rq = rows["f"][n], rows["q"][n]
                a = acc.setdefault(n, [0.0, 0.0, 0])
                a[0] = a[0] + rq.transpose(1, 2) @ rq
                a[1] = a[1] + rf.transpose(1, 2) @ rq
                a[2] += rq.shape[1]
    return {n: (h / c, x / c) for n, (h, x, c) in acc.items()}


@torch.no_grad()
def quantized_input_gptq(hyb: nn.Module, cal: torch.Tensor, act_seed: int,
                         images: torch.Tensor, seed: int, round_codes: bool = True
                         ) -> nn.Module:
    """A copy of the float network ``hyb`` with uint8 activations and each weight
    corrected and (``round_codes``) gptq-rounded, in network order (Bench's docstring)."""
    m = copy.deepcopy(hyb)
    actquant.attach(m, 32)
    actquant.calibrate(m, cal, seed=act_seed)
    for n, mod, attr in WQ.weight_params(m):
        hq, cross = paired_moments(hyb, m, images, seed, only={n})[n]
        p = getattr(mod, attr)
        w2 = corrected_weight(p.data, hq, cross)
        if round_codes:
            codes, scale, _ = WQ.quantize_int8_gptq(w2, hq)
            w2 = WQ.dequantize_int8(codes, scale)
        p.data.copy_(w2)
    actquant.calibrate(m, cal, seed=act_seed)
    return m


def corrected_weight(w: torch.Tensor, hq: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``W (E[x_f x_qᵀ] + λI) (E[x_q x_qᵀ] + λI)⁻¹`` per group: the weight that best maps
    the quantized inputs to the float outputs (least squares), ridged towards ``W`` (where
    the inputs have no energy, a plain solve would take any value and wreck the grid), in
    ``w``'s shape."""
    g = hq.shape[0]
    rows = w.detach().double().reshape(w.shape[0], -1).reshape(g, w.shape[0] // g, -1)
    lam = DAMP * torch.diagonal(hq, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    eye = torch.eye(hq.shape[1], dtype=hq.dtype)
    # rows @ C @ H⁻¹ = (H⁻¹ Cᵀ rowsᵀ)ᵀ, H symmetric
    ridge = lam[:, None, None] * eye
    sol = torch.linalg.solve(hq + ridge, (cross + ridge).transpose(1, 2)
                             @ rows.transpose(1, 2))
    return sol.transpose(1, 2).reshape(w.shape).to(w.dtype)


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


def versus(x, y, name: str) -> dict:
    """Per-image ``x`` − ``y`` (two evaluations of the same images): KL by bootstrap, top-1
    and agreement paired (interval and McNemar's p), keyed ``*_vs_<name>``."""
    d, (lo, hi) = bootstrap_mean_interval(x.kl - y.kl)
    return {f"kl_vs_{name}": {"d": d, "lo": lo, "hi": hi},
            f"top1_vs_{name}": paired(x.correct, y.correct),
            f"agreement_vs_{name}": paired(x.agree, y.agree)}


def folded_hybrid(net: nn.Module, info, cal, seed: int) -> tuple[nn.Module, nn.Module, list]:
    """(folded float hybrid, original, folded [layer, BN] pairs) of ``compress
    --activation-bits 8 --steps 0``."""
    cfg = CompressConfig(seed=seed, activation_bits=8, finetune=FinetuneConfig(steps=0))
    got: dict = {}

    def after(name: str, st) -> None:
        if name == "bn_fold":
            got["h"], got["o"] = st.hybrid, st.original
            got["pairs"] = [tuple(p) for p in st.meta.get("bn_folded") or []]
            raise _Folded

    try:
        compress(net, info, cal, cfg, after_stage=after)
    except _Folded:
        pass
    return got["h"].eval(), got["o"].eval(), got["pairs"]


class Bench:
    """The folded float hybrid, its input moments and the tuning images of one run."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.seed = a.seed
        self.cal_split, self.tune_split = calib_splits(a.calib)
        net, self.info = load_model(a.model)
        net.eval()
        prep = preset_for(self.info)
        self.cal = load_images(self.cal_split.path, prep, size=a.calib_size, seed=a.seed,
                               classes=self.info.classes)
        self.val = load_images(self.tune_split.path, prep, seed=0, classes=self.info.classes)
        self.hyb, self.orig, self.pairs = folded_hybrid(net, self.info, self.cal, a.seed)
        t = time.perf_counter()
        self.moments = WQ.input_moments(self.hyb, [self.images("weight_quant")],
                                        seed=stage_seed(a.seed, "weight_quant"))
        self.moments_s = round(time.perf_counter() - t, 1)
        groups: dict[str, set[str]] = {}
        for name, mod, _ in WQ.weight_params(self.hyb):
            groups.setdefault(group_of(mod), set()).add(name)
        self.scopes = {"all": set().union(*groups.values()), **groups}

    def images(self, stage: str) -> torch.Tensor:
        """The calibration images the compress stage ``stage`` takes (same seeded sample)."""
        return torch.cat(_batches(self.cal, MOMENT_IMAGES, seed=stage_seed(self.seed, stage)))

    def measure(self, m: nn.Module):
        pi = evaluate_per_image(m, self.val, self.info.label_offset, reference=self.orig)
        return summarize(pi), pi

    @torch.no_grad()
    def rounded(self, names: set[str], rounding: str) -> tuple[nn.Module, int]:
        """A copy with the ``names`` weights rounded; channels that kept nearest codes."""
        m, kept = copy.deepcopy(self.hyb), 0
        for n, mod, attr in WQ.weight_params(m):
            if n in names:
                p = getattr(mod, attr)
                if rounding == "gptq":
                    codes, scale, st = WQ.quantize_int8_gptq(p.data, self.moments[n])
                    p.data.copy_(WQ.dequantize_int8(codes, scale))
                    kept += st["nearest_channels"]
                else:
                    p.data.copy_(WQ.fake_quant(p.data, 8))
        return m, kept

    def scope_rows(self) -> list[dict]:
        """Float, then each scope rounded to nearest and by gptq (paired gptq − nearest)."""
        base, _ = self.measure(self.hyb)
        rows = [{"variant": "float (folded hybrid)", "scope": None, "rounding": None, **base}]
        for scope, names in self.scopes.items():
            pis = {}
            for rounding in ("nearest", "gptq"):
                t = time.perf_counter()
                m, kept = self.rounded(names, rounding)
                secs = round(time.perf_counter() - t, 1)
                s, pis[rounding] = self.measure(m)
                rows.append({"variant": f"{scope}: {rounding}", "scope": scope,
                             "rounding": rounding, "weights": len(names),
                             "round_seconds": secs, "nearest_channels": kept, **s})
            rows[-1].update(versus(pis["gptq"], pis["nearest"], "nearest"))
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        return rows

    @torch.no_grad()
    def quantized_input_gptq(self) -> nn.Module:
        """Activation ranges on the float weights, then, layer by layer in network order,
        each full-precision weight corrected towards the float outputs from its quantized
        inputs (:func:`corrected_weight`) and rounded by gptq on ``E[x_q x_qᵀ]``, its
        moments taken with every earlier weight already rounded (all at once, each layer
        would also undo what the layers before it already corrected: measured on
        MobileNetV1-0.5-160, KL 0.063 -> 0.146 before any rounding); then the ranges
        calibrated again on the rounded network."""
        return quantized_input_gptq(self.hyb, self.images("activation_calibration"),
                                    stage_seed(self.seed, "activation_calibration"),
                                    self.images("weight_quant"),
                                    stage_seed(self.seed, "weight_quant"))

    def chain_rows(self, which: tuple[str, ...] = CHAINS) -> list[dict]:
        """The whole post-training chain as the stages run it (weights, mean shift or not,
        uint8 activations), each variant paired against the default (``which`` always
        runs the default first)."""
        chains, finals = [], {}
        which = (CHAINS[0], *[c for c in which if c != CHAINS[0]])
        for variant in which:
            if variant == "gptq_qin":
                m = self.quantized_input_gptq()
                s, finals[variant] = self.measure(m)
                chains.append({"variant": "gptq on quantized inputs (least-squares "
                               "correction, ranges re-calibrated), uint8 activations", **s})
                continue
            variant_, _, objective = variant.partition("@")
            m, _ = self.rounded(self.scopes["all"], variant_.split("+")[0])
            if variant_.endswith("+mean_shift"):
                sites, owners = correction_sites(m, self.pairs)
                match_output_means(m, self.orig, self.images("mean_shift"), sites, owners)
            actquant.attach(m, 32, depthwise_channels=objective == "dwchan")
            t = time.perf_counter()
            actquant.calibrate(m, self.images("activation_calibration"),
                               seed=stage_seed(self.seed, "activation_calibration"),
                               objective="output" if objective == "output" else "input")
            secs = round(time.perf_counter() - t, 1)
            s, finals[variant] = self.measure(m)
            ranges = {"output": " (ranges by each layer's output error)",
                      "dwchan": " (depthwise inputs: one range per channel)"}.get(objective, "")
            chains.append({"variant": f"{variant_}, uint8 activations{ranges}",
                           "calibrate_seconds": secs, **s})
        ref = finals[CHAINS[0]]
        for row, variant in zip(chains[1:], which[1:]):
            row.update(versus(finals[variant], ref, "default"))
            print(json.dumps(row), flush=True)
        return chains


def bench_args(doc: str) -> argparse.ArgumentParser:
    """The arguments :class:`Bench` reads (model, calibration folder and size, seed), and
    the results file's tag and folder."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:mobilenet_v2")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--calib-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="x")
    ap.add_argument("--out", default="bench/results")
    return ap


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--chains-only", action="store_true",
                    help="skip the by-group rows; only the post-training chains")
    ap.add_argument("--chains", default=",".join(CHAINS),
                    help=f"comma-separated chains to run, of {','.join(CHAINS)}")
    a = ap.parse_args()
    which = tuple(c for c in a.chains.split(",") if c)
    if set(which) - set(CHAINS):
        ap.error(f"unknown chain(s) {sorted(set(which) - set(CHAINS))}; of {CHAINS}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    b = Bench(a)
    rows = [] if a.chains_only else b.scope_rows()
    chains = b.chain_rows(which)
    os.makedirs(a.out, exist_ok=True)
    out = os.path.join(a.out, f"int8-rounding-{a.tag}.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"tag": a.tag, "args": vars(a),
                   "split": {"eval": b.tune_split.record(), "calibration": b.cal_split.record()},
                   "moment_images": MOMENT_IMAGES, "moments_seconds": b.moments_s,
                   "rows": rows, "chains": chains,
                   "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(out)


if __name__ == "__main__":
    main()
