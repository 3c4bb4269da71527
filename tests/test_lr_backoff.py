"""The fine-tune's lr cut: when its training loss rises while it trains (an lr too high
for the model, as 1e-4 is for MobileNetV2), it goes back to the best state checked and
continues at a tenth of the lr, instead of training on and reverting everything."""

from __future__ import annotations

import copy

import pytest
import torch

from hfbconvert.distill import BACKOFF_RISE, FinetuneConfig, finetune, loss_rise
from hfbconvert.errors import InputError
from hfbconvert.pipeline import held_evaluator

from .test_finetune import _images, _norm, _student
from .tiny import tiny_v1

pytestmark = pytest.mark.usefixtures("one_thread")


def _mean(xs):
    return sum(xs) / len(xs)


def test_loss_rise_against_a_plain_reference():
    """Windows of ``window`` steps: the newest over the first since ``since``; None until
    two whole windows exist. The MobileNetV1 shape (25-step means 0.085, 0.084, 0.077)
    stays below the cut threshold; the MobileNetV2 shape at lr 1e-4 (4-step means 0.039,
    0.071) is above it."""
    v1 = [0.085] * 25 + [0.084] * 25 + [0.077] * 25
    assert loss_rise(v1, 0, 50, 25) == pytest.approx(0.084 / 0.085)
    assert loss_rise(v1, 0, 75, 25) == pytest.approx(0.077 / 0.085)
    assert loss_rise(v1, 0, 75, 25) < BACKOFF_RISE
    v2 = [0.036, 0.041, 0.031, 0.046, 0.059, 0.048, 0.110, 0.068]
    assert loss_rise(v2, 0, 8, 4) == pytest.approx(_mean(v2[4:]) / _mean(v2[:4]))
    assert loss_rise(v2, 0, 8, 4) > BACKOFF_RISE
    assert loss_rise(v2, 0, 7, 4) is None  # one window and three steps
    assert loss_rise(v2, 4, 8, 4) is None  # since a cut at 4: one window
    assert loss_rise(v2, 0, 8, 0) is None  # no checks between start and end
    assert loss_rise(v2, 0, 12, 4) is None  # fewer losses than steps claimed
    assert loss_rise([0.0] * 8, 0, 8, 4) is None  # a zero baseline has no ratio
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random series against the obvious formula
        xs = (torch.rand(30, generator=g) + 0.01).tolist()
        since, w = int(torch.randint(0, 10, (1,), generator=g)), 5
        done = since + 2 * w + int(torch.randint(0, 10, (1,), generator=g))
        assert loss_rise(xs, since, done, w) == pytest.approx(
            _mean(xs[done - w:done]) / _mean(xs[since:since + w]))


def _run(lr: float, lr_backoff: int, **kw):
    teacher = tiny_v1()
    student = _student(teacher)
    cfg = FinetuneConfig(steps=40, batch_size=8, lr=lr, warmup=2, eval_every=5,
                         lr_backoff=lr_backoff, **kw)
    log = finetune(student, teacher, _images(120), None, _norm, cfg,
                   evaluate=held_evaluator(teacher, [_norm(_images(40))]))
    return student, log


def test_a_rising_loss_cuts_the_lr_from_the_best_state_and_a_later_best_ships():
    """lr 0.3 on the tiny model: without the cut every check is worse than the start and
    the start ships; with it the run goes back to step 0 at the first check where two
    windows show the loss up by more than BACKOFF_RISE, continues at 0.03, and ships a
    later state better than the start."""
    _, plain = _run(0.3, 0)
    assert plain.lr_cuts == [] and plain.best_step == 0
    assert min(plain.held_kl[1:]) > plain.held_kl[0]
    _, cut = _run(0.3, 2)
    assert cut.held_kl[:4] == plain.held_kl[:4]  # the same run until the cut
    assert len(cut.lr_cuts) == 1
    c = cut.lr_cuts[0]
    assert c["step"] in cut.eval_steps and c["step"] >= 10  # two windows of 5 at least
    assert c["rise"] == pytest.approx(loss_rise(cut.loss, 0, c["step"], 5))
    assert c["rise"] > BACKOFF_RISE and c["lr_scale"] == pytest.approx(0.1)
    assert c["restored_step"] == 0
    assert cut.best_step > c["step"] and min(cut.held_kl) < cut.held_kl[0]


def test_a_healthy_lr_is_never_cut_and_the_count_is_bounded():
    """lr 0.05 trains down (no cut, identical to a run that forbids cuts); the cut count
    never exceeds lr_backoff; a negative count is refused."""
    s1, a = _run(0.05, 2)
    s2, b = _run(0.05, 0)
    assert a.lr_cuts == [] and a.loss == b.loss
    assert all(torch.equal(v, s2.state_dict()[k]) for k, v in s1.state_dict().items())
    _, one = _run(0.3, 1)
    assert len(one.lr_cuts) <= 1
    with pytest.raises(InputError, match="lr_backoff"):
        FinetuneConfig(lr_backoff=-1)


def test_resume_after_a_cut_matches_an_uninterrupted_run(tmp_path):
    """The cut's lr scale lives in the optimizer state and the log, the best state in the
    checkpoint: a run killed after a cut and resumed ends bit-identical."""
    teacher = tiny_v1()
    held = [_norm(_images(40))]
    cfg = FinetuneConfig(steps=40, batch_size=8, lr=0.3, warmup=2, eval_every=5,
                         checkpoint_every=5)
    ref = _student(teacher)
    s1, s2 = copy.deepcopy(ref), copy.deepcopy(ref)
    log1 = finetune(s1, teacher, _images(120), None, _norm, cfg,
                    evaluate=held_evaluator(teacher, held))
    assert log1.lr_cuts, "the setting must cut the lr for this test to mean anything"
    stop_at = log1.lr_cuts[0]["step"] + 2
    ckpt = tmp_path / "ft.ckpt"

    def boom(step, loss, agree):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(s2, teacher, _images(120), None, _norm, cfg, checkpoint=ckpt, on_step=boom,
                 evaluate=held_evaluator(teacher, held))
    s3 = copy.deepcopy(ref)
    log3 = finetune(s3, teacher, _images(120), None, _norm, cfg, checkpoint=ckpt,
                    resume=True, evaluate=held_evaluator(teacher, held))
    assert log3.lr_cuts == log1.lr_cuts and log3.best_step == log1.best_step
    sd1, sd3 = s1.state_dict(), s3.state_dict()
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_the_report_and_the_cli_say_where_the_lr_was_cut():
    """The report's held-apart curve marks the check where the lr was cut; both commands
    take --lr-backoff."""
    from click.testing import CliRunner

    from hfbconvert.cli import main
    from hfbconvert.report.tables import held_curve_table

    rep = {"held_curve": {"steps": [0, 25, 50, 75], "held_kl": [0.03, 0.05, 0.09, 0.027],
                          "held_agreement": [0.9] * 4, "held_top1": [None] * 4,
                          "best_step": 75, "lr_cuts": [{"step": 50, "rise": 2.1,
                                                        "lr_scale": 0.1, "restored_step": 0}]}}
    _, rows = held_curve_table(rep)
    assert [r[0] for r in rows] == ["0", "25", "50 (lr cut to x0.1)", "75 (shipped)"]
    for cmd in ("compress", "finetune"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--lr-backoff" in out, cmd
