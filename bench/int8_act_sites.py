"""Which uint8 activation quantizers cost the int8 hybrid its fidelity: leave one out.

``compress --activation-bits 8`` runs in process up to the folded float hybrid
(:class:`bench.int8_rounding.Bench`); every weight is rounded by gptq (the
``--weight-rounding gptq`` chain), the uint8 activation quantizers are attached and
calibrated as the ``activation_calibration`` stage does. Then each quantizer in turn is
switched off (its input passes in float, every other quantizer stays on) and the network
is measured on the tuning split (300 calibration images held apart, never the evaluation
images): the paired per-image KL drop against all-on says how much of the activation
loss that one site carries. Also the all-off row (int8 weights, float activations).

    OMP_NUM_THREADS=2 python -m bench.int8_act_sites --tag v2
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from bench.int8_rounding import Bench, bench_args, versus
from hfbconvert import actquant
from hfbconvert.evaluation import evaluate_per_image, summarize
from hfbconvert.stages import stage_seed


class _Replay(nn.Module):
    """The original's logits, recorded once and replayed batch by batch (the evaluation
    batches come in a fixed order), so each of the ~60 measurements runs one network."""

    def __init__(self, orig: nn.Module, data, batch_size: int = 64) -> None:
        super().__init__()
        with torch.inference_mode():
            self.outs = [orig.eval()(x) for x, _ in data.batches(batch_size)]
        self.i = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outs[self.i % len(self.outs)]
        assert out.shape[0] == x.shape[0], "replayed batches out of step"
        self.i += 1
        return out


def main() -> None:
    a = bench_args(__doc__).parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    b = Bench(a)
    replay = _Replay(b.orig, b.val)

    def measure(m: nn.Module):
        pi = evaluate_per_image(m, b.val, b.info.label_offset, reference=replay)
        return summarize(pi), pi

    b.measure = measure
    m, _ = b.rounded(b.scopes["all"], "gptq")
    actquant.attach(m, 32)
    ranges = actquant.calibrate(m, b.images("activation_calibration"),
                                seed=stage_seed(a.seed, "activation_calibration"))
    base, base_pi = b.measure(m)
    qs = actquant.quantizers(m)
    for _, q in qs:
        q.bypass = True  # the quantizer's own float pass-through
    off, off_pi = b.measure(m)
    for _, q in qs:
        q.bypass = False
    rows = [{"site": "all on", **base},
            {"site": "all off", **off, **versus(off_pi, base_pi, "all_on")}]
    print(json.dumps(rows[-1]), flush=True)
    for name, q in qs:
        q.bypass = True
        try:
            s, pi = b.measure(m)
        finally:
            q.bypass = False
        rows.append({"site": name, "range": ranges.get(name), **s,
                     **versus(pi, base_pi, "all_on")})
        print(json.dumps({"site": name, "kl": s["kl"],
                          "d": rows[-1]["kl_vs_all_on"]}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    out = os.path.join(a.out, f"int8-act-sites-{a.tag}.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"tag": a.tag, "args": vars(a),
                   "split": {"eval": b.tune_split.record(), "calibration": b.cal_split.record()},
                   "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(out)


if __name__ == "__main__":
    main()
