"""Resuming a fine-tune never silently mixes runs, and a checkpoint is never lost or wrong.

* a checkpoint records the options and inputs that determine the result; resuming with
  others is refused, naming the file and every differing field;
* the "last good" checkpoint kept after a divergence holds the state of its step;
* a divergence only reports a checkpoint that exists;
* nonsense learning rates are refused before any work.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from hfbconvert import distill as finetune_mod
from hfbconvert import fileio
from hfbconvert import pipeline as compress_mod
from hfbconvert.calib.readers import CalibData
from hfbconvert.cli import main
from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.errors import CheckFailed, InputError
from hfbconvert.pipeline import CompressConfig, compress

from .test_finetune import _images, _norm, _student
from .tiny import tiny_info, tiny_v1, write_npz, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 1) -> CalibData:
    imgs = torch.randint(0, 256, (60, 3, 32, 32), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)
    return CalibData(imgs, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(60)], source="random")


def _cfg(**kw) -> CompressConfig:
    ft = kw.pop("finetune", {})
    base = dict(budget=0.6, stats_images=32, fragility=False,
                finetune=FinetuneConfig(**{"steps": 4, "batch_size": 8, **ft}))
    base.update(kw)
    return CompressConfig(**base)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, every: int = 2) -> None:
    """compress's fine-tune checkpoints every ``every`` steps and is killed at ``step``."""
    real = finetune_mod.finetune

    def killed(student, teacher, images, labels, normalize, cfg, checkpoint=None,
               resume=False, on_step=None, **kw):
        def hook(s: int, loss: float, agree: float) -> None:
            if on_step is not None:
                on_step(s, loss, agree)
            if s == step:
                raise KeyboardInterrupt

        return real(student, teacher, images, labels, normalize,
                    replace(cfg, checkpoint_every=every), checkpoint, resume, on_step=hook,
                    **kw)

    monkeypatch.setattr(compress_mod, "finetune", killed)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint left by a finished 4-step fine-tune (lr 1e-4, budget 0.6)."""
    ckpt = tmp_path_factory.mktemp("finished") / "run.ckpt"
    compress(tiny_v1(), tiny_info(), _data(), _cfg(), checkpoint=str(ckpt))
    assert ckpt.exists()
    return ckpt


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dest = tmp_path / ckpt.name
    dest.write_bytes(ckpt.read_bytes())
    return dest


# ------------------------------------------------------------- 1. changed options refused


def test_resume_with_another_lr_is_refused_naming_file_and_field(finished, tmp_path):
    """It used to resume with the weights of lr 1e-4 and record lr 0.01."""
    ckpt = _copy(finished, tmp_path)
    before = ckpt.read_bytes()
    with pytest.raises(InputError) as exc:
        compress(tiny_v1(), tiny_info(), _data(), _cfg(finetune={"lr": 0.01}),
                 checkpoint=str(ckpt), resume=True)
    msg = str(exc.value)
    assert "\n" not in msg and str(ckpt) in msg
    assert "finetune.lr: checkpoint 0.0001, now 0.01" in msg
    assert ckpt.read_bytes() == before  # the user's work is still there


@pytest.mark.parametrize("change, fields", [
    ({"budget": 0.4}, ["budget: checkpoint 0.6, now 0.4", "plan: checkpoint"]),
    ({"method": "twn"}, ["method: checkpoint hybrid, now twn"]),
    ({"hidden_units_ratio": 2.0}, ["hidden_units_ratio: checkpoint 1.0, now 2.0"]),
    ({"activation_bits": 8, "weight_bits": 8}, ["activation_bits: checkpoint 32, now 8",
                                                "weight_bits: checkpoint 16, now 8"]),
])
def test_resume_with_other_shapes_is_refused_not_a_traceback(finished, tmp_path, change,
                                                             fields):
    ckpt = _copy(finished, tmp_path)
    with pytest.raises(InputError) as exc:
        compress(tiny_v1(), tiny_info(), _data(), _cfg(**change), checkpoint=str(ckpt),
                 resume=True)
    msg = str(exc.value)
    assert "\n" not in msg and str(ckpt) in msg
    for f in fields:
        assert f in msg, (f, msg)


def test_resume_with_other_plan_file_is_refused(finished, tmp_path):
    ckpt = _copy(finished, tmp_path)
    override = {"layers": {"blocks.3.conv_pw": {"critical": 0}}}
    with pytest.raises(InputError, match=r"plan: checkpoint sha256:\w+, now sha256:\w+"):
        compress(tiny_v1(), tiny_info(), _data(), _cfg(), checkpoint=str(ckpt), resume=True,
                 plan_override=override)


@pytest.mark.parametrize("what", ["model", "data", "labels"])
def test_resume_with_other_model_or_calibration_data_is_refused(finished, tmp_path, what):
    ckpt = _copy(finished, tmp_path)
    model, data = tiny_v1(), _data()
    if what == "model":
        with torch.no_grad():
            model.classifier.weight[0, 0] += 1e-3
        needle = "source model weights: checkpoint sha256:"
    elif what == "data":
        data.images[5, 0, 0, 0] ^= 1
        needle = "calibration images: checkpoint sha256:"
    else:
        data = replace(data, labels=torch.zeros(len(data), dtype=torch.long))
        needle = "calibration images: checkpoint sha256:"
    with pytest.raises(InputError) as exc:
        compress(model, tiny_info(), data, _cfg(), checkpoint=str(ckpt), resume=True)
    assert needle in str(exc.value) and str(ckpt) in str(exc.value)


def test_resume_ignores_what_may_legitimately_change(finished, tmp_path, capsys):
    """--min-agreement (a check after the run) and the device do not change the weights."""
    ckpt = _copy(finished, tmp_path)
    compress(tiny_v1(), tiny_info(), _data(), _cfg(min_agreement=0.1), checkpoint=str(ckpt),
             resume=True)
    assert f"resuming from step 4 of 4 (checkpoint {ckpt})" in capsys.readouterr().err


def test_resumed_compress_is_bit_identical_and_says_where_it_resumed(monkeypatch, tmp_path,
                                                                     capsys):
    ref, ref_meta = compress(tiny_v1(), tiny_info(), _data(), _cfg(finetune={"steps": 6}))
    ckpt = tmp_path / "run.ckpt"
    with monkeypatch.context() as m:
        _interrupt_at(m, step=3)
        with pytest.raises(KeyboardInterrupt):
            compress(tiny_v1(), tiny_info(), _data(), _cfg(finetune={"steps": 6}),
                     checkpoint=str(ckpt))
    assert ckpt.exists()
    capsys.readouterr()
    got, meta = compress(tiny_v1(), tiny_info(), _data(), _cfg(finetune={"steps": 6}),
                         checkpoint=str(ckpt), resume=True)
    assert f"resuming from step 2 of 6 (checkpoint {ckpt})" in capsys.readouterr().err
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["finetune_log"] == ref_meta["finetune_log"]


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    ckpt = tmp_path / "none.ckpt"
    teacher = tiny_v1()
    finetune(_student(teacher), teacher, _images(), None, _norm,
             FinetuneConfig(steps=2, batch_size=4), checkpoint=ckpt, resume=True)
    assert f"no checkpoint at {ckpt}; starting from step 0" in capsys.readouterr().err


def test_checkpoint_without_recorded_options_is_refused(tmp_path):
    """A checkpoint that cannot say what it was made with cannot be trusted to match."""
    teacher = tiny_v1()
    ckpt = tmp_path / "old.ckpt"
    cfg = FinetuneConfig(steps=4, batch_size=4, checkpoint_every=2)
    finetune(_student(teacher), teacher, _images(), None, _norm, cfg, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["identity"]
    torch.save(state, ckpt)
    with pytest.raises(InputError, match=re.escape(str(ckpt)) + ".*does not record"):
        finetune(_student(teacher), teacher, _images(), None, _norm, cfg, checkpoint=ckpt,
                 resume=True)


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


# --------------------------------------------------------------- 3. atomic, safe checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write killed before its rename leaves the previous checkpoint whole."""
    teacher = tiny_v1()
    ckpt = tmp_path / "c.ckpt"
    cfg = FinetuneConfig(steps=6, batch_size=4, checkpoint_every=2)
    real_replace = fileio.os.replace
    calls = []

    def dies_second_time(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        finetune(_student(teacher), teacher, _images(), None, _norm, cfg, checkpoint=ckpt)
    assert int(torch.load(ckpt, weights_only=True)["step"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temp file left


class _Evil:
    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


def test_checkpoint_is_loaded_weights_only(tmp_path, capsys):
    ckpt = tmp_path / "c.ckpt"
    torch.save({"step": 1, "payload": _Evil()}, ckpt)
    teacher = tiny_v1()
    with pytest.raises(InputError, match=re.escape(str(ckpt))):
        finetune(_student(teacher), teacher, _images(), None, _norm,
                 FinetuneConfig(steps=2, batch_size=4), checkpoint=ckpt, resume=True)
    assert "code from the checkpoint ran" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------- CLI


def _run(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {"model": write_reference_checkpoint(d / "tiny.pt"),
            "calib": write_npz(d / "calib.npz")}


def test_cli_resume_refuses_changed_lr_then_resumes(cli_inputs, tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    ckpt = Path(str(out) + ".ckpt")
    args = ["compress", cli_inputs["model"], "--calib", cli_inputs["calib"], "--steps", "4",
            "--batch-size", "8", "--min-agreement", "0", "-o", out]
    with monkeypatch.context() as m:
        _interrupt_at(m, step=3)
        res = _run(*args, "--lr", "1e-4")
    assert res.exit_code == 130 and ckpt.exists()
    res = _run(*args, "--lr", "0.01", "--resume")
    assert res.exit_code == 2 and "Traceback" not in res.output
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and str(ckpt) in err[0]
    assert "finetune.lr: checkpoint 0.0001, now 0.01" in err[0]
    assert ckpt.exists() and not out.exists()
    res = _run(*args, "--lr", "1e-4", "--resume")
    assert res.exit_code == 0, res.output
    assert f"resuming from step 2 of 4 (checkpoint {ckpt})" in res.stderr
    assert out.exists() and not ckpt.exists()


def test_cli_resume_without_checkpoint_says_so(cli_inputs, tmp_path):
    out = tmp_path / "out.pt"
    res = _run("compress", cli_inputs["model"], "--calib", cli_inputs["calib"], "--steps", "2",
               "--batch-size", "8", "--min-agreement", "0", "-o", out, "--resume")
    assert res.exit_code == 0, res.output
    assert f"no checkpoint at {out}.ckpt; starting from step 0" in res.stderr


@pytest.mark.parametrize("lr", ["nan", "-0.001", "inf"])
def test_cli_rejects_nonsense_lr(cli_inputs, tmp_path, lr):
    res = _run("compress", cli_inputs["model"], "--calib", cli_inputs["calib"], "--steps", "2",
               "-o", tmp_path / "out.pt", "--lr", lr)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "lr" in err[0], res.stderr
    assert not (tmp_path / "out.pt.ckpt").exists()

