"""The CIFAR-10 MobileNetV3-Small (bench/train_cifar.py) compressed at budget 0.536 with the
default fine-tune, top-1 before/after on the CIFAR-10 test set with a paired interval:
``python -m bench.cifar_v3 --checkpoint /tmp/mnv3s_cifar10.pt``.

Calibration and fine-tuning use a seeded subset of the CIFAR-10 *train* images (never test).
Without the checkpoint (``--checkpoint`` or env ``HFB_CIFAR_V3``) the script exits 0 with a
"skipped" line. Results: ``bench/results/<stamp>-cifar10-v3-small.json`` and its
``-paired.json`` (bench/lite0.py's runner).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .cases import REPO, cifar10_dir
from .lite0 import run_with_pairs

PAIRS = [("hybrid-0.536", "original"), ("hybrid-0.536-int8", "original"),
         ("hybrid-0.536-int8", "int8-ptq")]


def matrix(checkpoint: str, calib_size: int, steps: str, methods: list[str]) -> dict:
    root = cifar10_dir()
    case = {"key": "cifar10-v3-small", "title": "CIFAR-10 MobileNetV3-Small (trained here)",
            "model": checkpoint, "calib": str(root / "train"), "eval_data": str(root / "test"),
            "calib_size": calib_size, "eval_total": 10000, "steps": steps}
    return {"name": "cifar10-v3-small", "models": [case], "methods": methods,
            "time_budget_min": 0, "latency_repeats": [10, 2], "torch_threads": 1, "threads": 1,
            "notes": ["MobileNetV3-Small trained on CIFAR-10 by bench/train_cifar.py (stem "
                      "stride 1, 32 px); compress cells with the default fine-tune."]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cifar_v3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.environ.get("HFB_CIFAR_V3"),
                   help="bench/train_cifar.py's checkpoint (default: env HFB_CIFAR_V3)")
    p.add_argument("--calib-size", type=int, default=2000,
                   help="seeded subset of the CIFAR-10 train images")
    p.add_argument("--steps", default="auto", help="fine-tuning steps (N or auto)")
    p.add_argument("--int8", action="store_true",
                   help="also --activation-bits 8 against onnxruntime int8 PTQ")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    if not args.checkpoint or not Path(args.checkpoint).is_file():
        print(f"skipped: checkpoint not found ({args.checkpoint or 'set HFB_CIFAR_V3'})")
        return 0
    methods = ["original", "hybrid-0.536"]
    if args.int8:
        methods += ["int8-ptq", "hybrid-0.536-int8"]
    spec = matrix(str(Path(args.checkpoint).resolve()), args.calib_size, args.steps, methods)
    return run_with_pairs(spec, args.out, PAIRS if args.int8 else PAIRS[:1], shlex.join(
        ["python", "-m", "bench.cifar_v3", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
