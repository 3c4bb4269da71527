"""Run under ``torchrun`` by tests/test_distributed.py (not a test module itself).

``lib OUT [CKPT [resume]]``: fine-tune the tiny student of test_finetune under DDP (or in
one process when not launched distributed) and let rank 0 save the result to OUT.
``cli-die STEP ARGS...``: the compress CLI, with rank 1 dying (os._exit) at fine-tune
step STEP.
"""

from __future__ import annotations

import os
import sys

import torch

from hfbconvert import distributed
from hfbconvert.errors import HfbError
from hfbconvert.finetune import FinetuneConfig, finetune
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


def cli_die(step: int, args: list[str]) -> None:
    from hfbconvert import pipeline
    from hfbconvert.cli import main

    real = pipeline.finetune

    def dying(*a, on_step=None, **kw):
        def hook(s: int, loss: float, agree: float) -> None:
            if on_step is not None:
                on_step(s, loss, agree)
            if s == step and distributed.rank() == 1:
                os._exit(3)
        return real(*a, on_step=hook, **kw)

    pipeline.finetune = dying
    main(args, prog_name="hfbconvert")


if __name__ == "__main__":
    if sys.argv[1] == "lib":
        rest = sys.argv[2:]
        die = int(os.environ.get("DIE_AT", "-1"))
        sys.exit(lib(rest[0], rest[1] if len(rest) > 1 else None, "resume" in rest[2:], die))
    cli_die(int(sys.argv[2]), sys.argv[3:])
