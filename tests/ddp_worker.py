"""Run under ``torchrun`` by tests/test_distributed.py (not a test module itself).

``lib OUT [CKPT [resume]]``: fine-tune the tiny student of test_finetune under DDP (or in
one process when not launched distributed) and let rank 0 save the result to OUT; with
``DIE_AT=S`` in the environment rank 1 dies (os._exit) after step S.
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


if __name__ == "__main__":
    assert sys.argv[1] == "lib", sys.argv
    rest = sys.argv[2:]
    sys.exit(lib(rest[0], rest[1] if len(rest) > 1 else None, "resume" in rest[2:],
                 int(os.environ.get("DIE_AT", "-1"))))
