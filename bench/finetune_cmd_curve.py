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
START, END = "<!-- generated:finetune-cmd -->", "<!-- /generated -->"


def cli(*args: str) -> tuple[dict, float, list[str]]:
    cmd = [sys.executable, "-m", "hfbconvert.cli", *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr[-800:]}")
    shown = ["hfbconvert", *args]
    return json.loads(res.stdout), wall, shown


def render(res: dict, name: str) -> str:
    """The BENCHMARKS section of one results file: the held-apart curve and the paired
    test-set comparison of the fit-only and the fine-tuned artifacts."""
    ft, cmp_ = res["finetune"], res["test_compare"]
    c = ft["curve"]
    d = cmp_["difference"]
    lines = ["## `hfbconvert finetune` on CIFAR-10: the curve over one epoch", "",
             f"`{res['command']}` (results: `bench/results/{name}`, "
             f"{res.get('threads') or '?'} thread). Steps:", "",
             f"1. `{res['compress']['cmd']}` ({res['compress']['wall_s']:.0f} s)",
             f"2. `{ft['cmd']}` ({ft['wall_s']:.0f} s: {ft['steps_run']} steps, "
             f"{ft['train_images']:,} training images, {ft['held_images']:,} held apart)",
             f"3. `{cmp_['cmd']}` (the 10,000 test images)", "",
             "| steps | held KL (nats) | held agreement % | held top-1 % | held CE (nats) |",
             "|---|---|---|---|---|"]
    ce = c.get("held_ce") or [None] * len(c["steps"])  # files from before --stop-on: none
    for row in zip(c["steps"], c["held_kl"], c["held_agreement"], c["held_top1"], ce):
        lines.append(f"| {row[0]} | {row[1]:.4f} | {100 * row[2]:.2f} | {100 * row[3]:.2f} | "
                     + ("—" if row[4] is None else f"{row[4]:.4f}") + " |")
    best = ft["best_step"]
    rule = {"kl": "lowest held KL", "loss": "lowest held KL + label weight × CE",
            "top1": "highest held top-1"}[ft.get("stop_on", "kl")]
    lines += ["", f"Shipped: the state after {best} steps ({rule}, `--stop-on "
              f"{ft.get('stop_on', 'kl')}`" + ("; the fit itself" if best == 0 else "")
              + "). Test set, paired: "
              f"fit only {100 * cmp_['a']['top1']:.2f}%, fine-tuned "
              f"{100 * cmp_['b']['top1']:.2f}%, fit − fine-tuned {100 * d['top1']:+.2f} "
              f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] ({d['verdict']}); "
              f"the original {100 * res['original_test']['top1']:.2f}% "
              f"[{100 * res['original_test']['top1_ci95'][0]:.2f}, "
              f"{100 * res['original_test']['top1_ci95'][1]:.2f}]. The held images come from "
              "the training set the original was trained on, so held top-1 is high; the "
              "labels pull the student away from the teacher (held KL rises): ranking by "
              "held KL (before `--stop-on`, the only rule) shipped the fit itself "
              "(`bench/results/finetune-cmd-c10-epoch.json`); `--stop-on auto` ranks by the "
              "training objective when labels are weighted."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_cifar10.pt"))
    ap.add_argument("--train", help="CIFAR-10 train ImageFolder (extracted)")
    ap.add_argument("--test", help="CIFAR-10 test ImageFolder (extracted)")
    ap.add_argument("--budget", default="0.4")
    ap.add_argument("--calib-size", default="2000")
    ap.add_argument("--data-size", default="16000")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--eval-every", default="50")
    ap.add_argument("--patience", default="1000",
                    help="large: record the whole curve (the best state still ships)")
    ap.add_argument("--learn-codes", action="store_true")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--render", action="store_true",
                    help="only regenerate BENCHMARKS.md's section from the TAG results file")
    a = ap.parse_args(argv)
    if a.render:
        from bench.rss import splice

        name = f"finetune-cmd-{a.tag}.json"
        res = json.loads((REPO / "bench" / "results" / name).read_text())
        splice(REPO / "BENCHMARKS.md", render(res, name), START, END)
        return 0
    if not (a.train and a.test):
        ap.error("--train and --test are required (unless --render)")
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
