"""Wall time of the distillation fine-tune: 2 gloo processes (torchrun) against 1 process,
same global batch, same steps, on MobileNetV1-0.5-160.

Runs ``hfbconvert compress MODEL --calib CALIB --calib-size N --steps S --batch-size B
--json`` three ways: 1 process with 1 thread, 1 process with 2 threads, and
``torchrun --nproc_per_node 2`` with 1 thread each; records the command's wall time and
the ``finetune_s`` it reports (rank 0's), and the final fine-tune loss of each (they must
agree to float tolerance: same samples). Writes bench/results/ddp-wall.json and the
``<!-- generated:ddp-wall -->`` section of BENCHMARKS.md. Heavy: run it under
``flock /tmp/hfb-heavy.lock``; on a shared 2-core machine the numbers are what 2 cores
give, not what 2 GPUs would.

    flock /tmp/hfb-heavy.lock python -m bench.ddp_wall --steps 40
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

from bench.rss import splice as _splice

SHARED = os.environ.get("HFB_SHARED", "../shared")
REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- generated:ddp-wall -->", "<!-- /generated -->"
IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images


def run_one(mode: str, args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="2" if mode == "1 process, 2 threads" else "1")
    cli = ["-m", "hfbconvert.cli", "compress", *args, "-o", str(out), "--force", "--json"]
    if mode.startswith("2 processes"):
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", *cli]
    else:
        cmd = [sys.executable, *cli]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{mode}: exit {res.returncode}: {res.stderr.strip()[-800:]}")
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    import torch

    meta = torch.load(out, weights_only=True)["meta"]
    log = meta.get("finetune_log") or {}
    return {"mode": mode, "wall_s": round(wall, 1),
            "finetune_s": round(summary["timings"].get("finetune_s", float("nan")), 1),
            "steps": len(log.get("loss", [])), "world_size": log.get("world_size"),
            "last_loss": (log.get("loss") or [None])[-1]}


def render(res: dict) -> str:
    one = next(r for r in res["rows"] if r["mode"] == "1 process, 1 thread")
    lines = ["## Distributed fine-tune: 2 gloo processes vs 1", "",
             f"`{res['command']}` (results: `bench/results/ddp-wall.json`): "
             f"{res['steps']} fine-tune steps of global batch {res['batch']} on "
             f"MobileNetV1-0.5-160 ({res['calib_size']} calibration images), 2-core CPU "
             "machine" + (f", load average {res['load_avg_start'][0]:.2f} before the first run"
                          if res.get("load_avg_start") else "") + ".", "",
             "| run | command wall (s) | fine-tune (s) | × 1 process, 1 thread | last loss |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['finetune_s']:.1f} | "
                     f"{r['finetune_s'] / one['finetune_s']:.2f} | {r['last_loss']:.6g} |")
    rel = max(abs(r["last_loss"] / one["last_loss"] - 1) for r in res["rows"])
    lines += ["", "Same samples per step in every run (each rank takes its slice of the "
              "global batch, BatchNorm on running statistics), so the runs differ only in "
              "float summation order: the last losses differ by at most "
              f"{100 * rel:.2f}% of the 1-process loss after {res['steps']} optimizer steps. "
              "One measurement each: on a shared machine treat differences under ~10% as "
              "noise."]
    best = min(res["rows"], key=lambda r: r["finetune_s"])
    per_step = best["finetune_s"] / res["steps"]
    steps = -(-IMAGENET_TRAIN // res["batch"])
    lines += ["", "What a full ImageNet fine-tune would take at these speeds (arithmetic on "
              f"the fastest row, {best['mode']}: {per_step:.2f} s per step of "
              f"{res['batch']}): one epoch of the {IMAGENET_TRAIN:,} training images is "
              f"{steps:,} steps, {steps * per_step / 3600:.1f} h on this machine for "
              "MobileNetV1-0.5-160 alone, before decoding the images and the held-apart "
              "checks; MobileNetV2-224 has about 4x its MACs. The paper's regime (many "
              "epochs) is GPU work: `--device cuda` and torchrun over GPUs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ddp-wall.json"))
    ap.add_argument("--write-md", action="store_true")
    a = ap.parse_args(argv)
    args = [a.model, "--calib", a.calib, "--calib-size", str(a.calib_size), "--steps",
            str(a.steps), "--batch-size", str(a.batch), "--eval-every", "0",
            "--min-agreement", "0", "-q"]
    rows = []
    load = os.getloadavg()  # what else ran: the ratios mean little on a busy machine
    with tempfile.TemporaryDirectory() as d:
        for mode in ("1 process, 1 thread", "1 process, 2 threads",
                     "2 processes (gloo), 1 thread each"):
            rows.append(run_one(mode, args, Path(d) / "m.hfb.pt"))
            print(json.dumps(rows[-1]), flush=True)
    res = {"command": "python -m bench.ddp_wall " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
           "steps": a.steps, "batch": a.batch, "calib_size": a.calib_size, "rows": rows,
           "load_avg_start": [round(x, 2) for x in load]}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.write_md:
        _splice(REPO / "BENCHMARKS.md", render(res), START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
