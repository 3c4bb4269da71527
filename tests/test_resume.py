"""Resuming a fine-tune never silently mixes runs, and a checkpoint is never lost or wrong.

* the "last good" checkpoint kept after a divergence holds the state of its step;
* a divergence only reports a checkpoint that exists;
* nonsense learning rates are refused before any work.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from hfbconvert.cli import main
from hfbconvert.errors import CheckFailed, InputError
from hfbconvert.finetune import FinetuneConfig, finetune

from .test_finetune import _images, _norm, _student
from .tiny import tiny_v1, write_npz, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------- 2. divergence keeps genuine state


def _poison_after(student: torch.nn.Module, step: int, seen: dict | None = None):
    """An on_step that records the state after each step and, after ``step``, sets a
    weight to NaN: the next loss is non-finite (an overflow, made deterministic)."""

    def on_step(s: int, loss: float, agree: float) -> None:
        if seen is not None:
            seen[s + 1] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if s == step:
            with torch.no_grad():
                student.blocks[0].conv_dw.weight.view(-1)[0] = math.nan

    return on_step


def test_last_good_checkpoint_holds_the_state_of_its_step(tmp_path):
    """It held references to the live weights: the weights of step 3, NaN included, were
    written under step 2 over the genuine checkpoint."""
    teacher = tiny_v1()
    student = _student(teacher)
    ckpt = tmp_path / "c.ckpt"
    seen: dict[int, dict[str, torch.Tensor]] = {}
    cfg = FinetuneConfig(steps=8, batch_size=4, checkpoint_every=2)
    with pytest.raises(CheckFailed, match="non-finite loss at step 3") as exc:
        finetune(student, teacher, _images(), None, _norm, cfg, checkpoint=ckpt,
                 on_step=_poison_after(student, 2, seen))
    assert f"last good checkpoint kept at {ckpt}" in str(exc.value)
    state = torch.load(ckpt, weights_only=True)
    assert int(state["step"]) == 2
    for k, v in state["student"].items():
        assert torch.equal(v, seen[2][k]), k
    assert not torch.equal(seen[2]["blocks.0.conv_dw.weight"], seen[3]["blocks.0.conv_dw.weight"])


def test_divergence_reports_only_a_checkpoint_that_exists(tmp_path):
    """``--lr nan --steps 3`` said "last good checkpoint kept at" a file never written."""
    teacher = tiny_v1()
    student = _student(teacher)
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(CheckFailed) as exc:
        finetune(student, teacher, _images(), None, _norm,
                 FinetuneConfig(steps=3, batch_size=4), checkpoint=ckpt,
                 on_step=_poison_after(student, 0))
    assert not ckpt.exists()
    assert "checkpoint" not in str(exc.value)


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", -1e-4), ("lr", math.inf),
                                          ("latent_lr", math.nan), ("batch_size", 0),
                                          ("temperature", 0.0), ("steps", -1)])
def test_nonsense_finetune_options_are_refused_up_front(field, value):
    with pytest.raises(InputError, match=rf"^{field} must be") as exc:
        FinetuneConfig(**{field: value})
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------- CLI


def _run(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {"model": write_reference_checkpoint(d / "tiny.pt"),
            "calib": write_npz(d / "calib.npz")}


@pytest.mark.parametrize("lr", ["nan", "-0.001", "inf"])
def test_cli_rejects_nonsense_lr(cli_inputs, tmp_path, lr):
    res = _run("compress", cli_inputs["model"], "--calib", cli_inputs["calib"], "--steps", "2",
               "-o", tmp_path / "out.pt", "--lr", lr)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "lr" in err[0], res.stderr
    assert not (tmp_path / "out.pt.ckpt").exists()

