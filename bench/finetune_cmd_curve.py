"""The ``hfbconvert finetune`` curve on CIFAR-10 (CPU): compress MobileNetV1-0.5-CIFAR-10
(fit only), fine-tune the artifact with labels on a seeded subset of the training set for
one epoch or more (held-apart curve every N steps), then compare both artifacts on the
10,000 test images, paired (``eval --compare``). Every command is recorded with its output
in bench/results/finetune-cmd-TAG.json. Heavy: run it under ``flock /tmp/hfb-heavy.lock``.

    tar -xzf $HFB_SHARED/data/cifar10-jpeg.tar.gz -C /tmp/c10    # never into shared/
    flock /tmp/hfb-heavy.lock python -m bench.finetune_cmd_curve --train /tmp/c10/cifar10/train \\
        --test /tmp/c10/cifar10/test --tag c10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = os.environ.get("HFB_SHARED", "../shared")
REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> tuple[dict, float, list[str]]:
    cmd = [sys.executable, "-m", "hfbconvert.cli", *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr[-800:]}")
    shown = ["hfbconvert", *args]
    return json.loads(res.stdout), wall, shown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_cifar10.pt"))
    ap.add_argument("--train", required=True, help="CIFAR-10 train ImageFolder (extracted)")
    ap.add_argument("--test", required=True, help="CIFAR-10 test ImageFolder (extracted)")
    ap.add_argument("--budget", default="0.4")
    ap.add_argument("--calib-size", default="2000")
    ap.add_argument("--data-size", default="16000")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--eval-every", default="50")
    ap.add_argument("--patience", default="1000",
                    help="large: record the whole curve (the best state still ships)")
    ap.add_argument("--learn-codes", action="store_true")
    ap.add_argument("--tag", required=True)
    a = ap.parse_args(argv)
    out: dict = {"command": "python -m bench.finetune_cmd_curve " + " ".join(
        argv if argv is not None else sys.argv[1:]), "threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as d:
        art, ft = str(Path(d) / "c10.hfb.pt"), str(Path(d) / "c10.ft.hfb.pt")
        comp, t_comp, c_cmd = cli("compress", a.model, "--calib", a.train, "--calib-size",
                                  a.calib_size, "--budget", a.budget, "--steps", "0", "-o", art,
                                  "--json", "-q", "--min-agreement", "0")
        out["compress"] = {"cmd": " ".join(c_cmd), "wall_s": round(t_comp, 1),
                           "final_agreement": comp["final_agreement"], "cost": comp["cost"],
                           "original_cost": comp["original_cost"]}
        print(json.dumps(out["compress"])[:400], flush=True)
        ft_args = ["finetune", art, "--data", a.train, "--data-size", a.data_size, "--epochs",
                   a.epochs, "--eval-every", a.eval_every, "--patience", a.patience, "-o", ft,
                   "--json", "-q"] + (["--learn-codes"] if a.learn_codes else [])
        res, t_ft, f_cmd = cli(*ft_args)
        out["finetune"] = {"cmd": " ".join(f_cmd), "wall_s": round(t_ft, 1), **res}
        print(json.dumps(res["curve"]), flush=True)
        cmp_, t_cmp, e_cmd = cli("eval", "--compare", art, ft, "--data", a.test, "--json", "-q")
        out["test_compare"] = {"cmd": " ".join(e_cmd), "wall_s": round(t_cmp, 1), **cmp_}
        orig, _, o_cmd = cli("eval", a.model, "--data", a.test, "--json", "-q")
        out["original_test"] = {"cmd": " ".join(o_cmd), "top1": orig["top1"],
                                "top1_ci95": orig["top1_ci95"]}
    dest = REPO / "bench" / "results" / f"finetune-cmd-{a.tag}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    d_ = out["test_compare"]["difference"]
    print(f"wrote {dest}: test top-1 A(fit) {out['test_compare']['a']['top1']:.4f} "
          f"B(finetuned) {out['test_compare']['b']['top1']:.4f}; A-B {d_}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
