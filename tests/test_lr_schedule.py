"""The fine-tune's lr schedule (torch.optim.lr_scheduler) equals the closed form it
replaced, step for step and bit for bit, across the code freeze (a new optimizer) and a
resume from a checkpoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hfbconvert.distill import FinetuneConfig, finetune

from .test_finetune import _images, _norm, _student
from .tiny import tiny_v1


def _old_factor(step: int, warmup: int, steps: int) -> float:
    """The hand-written schedule the scheduler replaced (kept verbatim)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@pytest.fixture
def lrs(monkeypatch):
    """Every Adam step's per-group lrs, in order."""
    seen: list[list[float]] = []
    step = torch.optim.Adam.step

    def record(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    return seen


def test_lr_sequence_equals_the_closed_form(lrs, tmp_path):
    teacher = tiny_v1()
    cfg = FinetuneConfig(steps=12, batch_size=4, freeze_at=0.5, warmup=3, lr=3e-4,
                         latent_lr=2e-3, checkpoint_every=4)
    student = _student(teacher)
    finetune(copy.deepcopy(student), teacher, _images(16), None, _norm, cfg)
    want = [[base * _old_factor(k, 3, 12) for base in (3e-4, 2e-3)] for k in range(12)]
    assert len(lrs) == 12
    for k in range(12):  # before the freeze: two groups (latent codes), after it: one
        assert lrs[k] == (want[k] if k < 6 else want[k][:1]), k
    assert lrs[0][0] == pytest.approx(1e-4) and lrs[2][0] == 3e-4  # warmup to the base lr
    # resumed after step 8 (past the freeze): the schedule continues where it was
    ckpt = tmp_path / "c.ckpt"

    def stop(step, loss, agree):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(student), teacher, _images(16), None, _norm, cfg,
                 checkpoint=ckpt, on_step=stop)
    lrs.clear()
    finetune(copy.deepcopy(student), teacher, _images(16), None, _norm, cfg,
             checkpoint=ckpt, resume=True)
    assert lrs == [want[k][:1] for k in range(8, 12)]
