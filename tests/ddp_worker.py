"""Run under ``torchrun`` by tests/test_distributed.py (not a test module itself).

``lib OUT [CKPT [resume]]``: fine-tune the tiny student of test_finetune under DDP (or in
one process when not launched distributed) and let rank 0 save the result to OUT; with
``DIE_AT=S`` in the environment rank 1 dies (os._exit) after step S.
``compress DIR STEPS``: library compress on every rank; each writes rank{R}.json (the
stages it ran, its timing keys) into DIR.
"""

from __future__ import annotations

import os
import sys

import torch

from hfbconvert import distributed
from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.errors import HfbError
from tests.test_finetune import _images, _norm, _student
from tests.tiny import tiny_v1

LIB_CFG = {"steps": 12, "batch_size": 8, "lr": 1e-3, "warmup": 2, "checkpoint_every": 4,
           "label_weight": 0.5}


def lib(out: str, ckpt: str | None = None, resume: bool = False, die_at: int = -1) -> int:
    torch.set_num_threads(1)
    teacher = tiny_v1()
    student = _student(teacher)
    labels = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(2))

    def on_step(step: int, loss: float, agree: float) -> None:
        if step == die_at and distributed.rank() == 1:
            os._exit(3)

    try:
        with distributed.session("cpu"):
            log = finetune(student, teacher, _images(), labels, _norm,
                           FinetuneConfig(**LIB_CFG), checkpoint=ckpt, resume=resume,
                           on_step=on_step)
            if distributed.is_main():
                torch.save({"state": student.state_dict(), "log": log.to_dict()}, out)
    except HfbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def compress_ranks(out_dir: str, steps: int) -> int:
    """Library ``compress`` on every rank; each writes what it ran to rank{R}.json."""
    import json
    from pathlib import Path

    from hfbconvert.calib.readers import CalibData
    from hfbconvert.pipeline import CompressConfig, compress
    from tests.test_finetune import _images
    from tests.tiny import tiny_info

    torch.set_num_threads(1)
    data = CalibData(_images(120), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(120)], source="random")
    cfg = CompressConfig(budget=0.6, stats_images=32, weight_bits=16, finetune=FinetuneConfig(
        steps=steps, batch_size=8, eval_every=2))
    with distributed.session("cpu"):
        _, meta = compress(tiny_v1(), tiny_info(), data, cfg)
        rec = {"stages": [s["stage"] for s in meta.get("stages", [])],
               "agreements": [s["agreement"] for s in meta.get("stages", [])],
               "timings": sorted(meta.get("timings", {})), "rank": meta.get("rank"),
               "has_layer_errors": "layer_errors" in meta}
        if "finetune_log" in meta:
            rec["loss"] = meta["finetune_log"]["loss"]
        Path(out_dir, f"rank{distributed.rank()}.json").write_text(json.dumps(rec))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "compress":
        sys.exit(compress_ranks(sys.argv[2], int(sys.argv[3])))
    assert sys.argv[1] == "lib", sys.argv
    rest = sys.argv[2:]
    sys.exit(lib(rest[0], rest[1] if len(rest) > 1 else None, "resume" in rest[2:],
                 int(os.environ.get("DIE_AT", "-1"))))
