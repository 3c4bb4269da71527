"""Distributed fine-tuning under torchrun (2 CPU processes, gloo) and early stopping.

DDP vs one process at the same global batch: every rank takes its slice of the same
samples, so the result differs only by float summation order. Measured on the tiny model
(12 steps, lr 1e-3, labels and feature loss on): max |Δ parameter| 1.2e-7, Δ loss 2.4e-7.
The tests allow TOL = 1e-5, far below what a wrong gradient average or batch split moves.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hfbconvert.artifact import load_compressed
from hfbconvert.calib.readers import CalibData
from hfbconvert.cli import main
from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.errors import InputError
from hfbconvert.pipeline import CompressConfig, compress

from . import ddp_worker
from .test_finetune import _images, _norm, _student
from .tiny import tiny_info, tiny_v1, write_npz, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOL = 1e-5


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    return subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            worst = max(worst, float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0)
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The tiny fine-tune in this process (no process group): the reference."""
    out = tmp_path_factory.mktemp("single") / "one.pt"
    assert ddp_worker.lib(str(out)) == 0
    return torch.load(out)


def test_two_gloo_ranks_match_one_process(tmp_path, single):
    res = _torchrun([str(REPO / "tests" / "ddp_worker.py"), "lib", str(tmp_path / "two.pt")],
                    tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    two = torch.load(tmp_path / "two.pt")
    start = _student(tiny_v1()).state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in single["state"].items()
                if v.is_floating_point() and k in start and v.shape == start[k].shape)
    assert moved > 100 * TOL  # the fine-tune did something a wrong split would change
    assert _max_diff(single["state"], two["state"]) < TOL
    assert max(abs(a - b) for a, b in zip(single["log"]["loss"], two["log"]["loss"],
                                          strict=True)) < TOL
    assert two["log"]["world_size"] == 2 and single["log"]["world_size"] == 1


def test_dead_rank_stops_the_other_with_one_line_and_checkpoint_resumes(tmp_path, single):
    """Rank 1 dies at step 6 (checkpoints every 4): rank 0 stops at its next collective
    with one line, the checkpoint of step 4 stays, and one process resumes it (another
    world size: allowed, said) to the uninterrupted result within TOL."""
    ckpt = tmp_path / "ft.ckpt"
    res = _torchrun([str(REPO / "tests" / "ddp_worker.py"), "lib", str(tmp_path / "x.pt"),
                     str(ckpt)], tmp_path, DIE_AT="6")
    assert res.returncode != 0 and not (tmp_path / "x.pt").exists()
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0:"), res.stderr[-2000:]
    assert "rerun with resume=True" in ours[0]  # the library names its field
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    res = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_worker.py"), "lib",
                          str(tmp_path / "resumed.pt"), str(ckpt), "resume"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "written by a run of 2 process(es), this one has 1" in res.stderr
    resumed = torch.load(tmp_path / "resumed.pt")
    assert _max_diff(single["state"], resumed["state"]) < TOL


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {"model": write_reference_checkpoint(d / "tiny.pt"),
            "calib": write_npz(d / "calib.npz", n=80)}


def _cli_args(cli_inputs, out: Path, batch: int = 8) -> list[str]:
    return ["compress", str(cli_inputs["model"]), "--calib", str(cli_inputs["calib"]),
            "--steps", "6", "--batch-size", str(batch), "--eval-every", "2",
            "--min-agreement", "0", "-o", str(out)]


def test_cli_under_torchrun_rank0_writes_once_and_matches_one_process(tmp_path, cli_inputs):
    """The CLI under torchrun: one 'wrote' line, one output, nothing left beside it, and
    the same training curve and shipped weights as one process. (On this tiny net the fit
    is already exact, so the fine-tune is reverted: its per-step losses and held-KL checks
    are what compare the training; test_two_gloo_ranks_match_one_process the weights.)"""
    d2, d1 = tmp_path / "two", tmp_path / "one"
    d2.mkdir()
    d1.mkdir()
    res = _torchrun(["-m", "hfbconvert.cli", *_cli_args(cli_inputs, d2 / "out.pt")], d2)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert sum("wrote " in ln for ln in text.splitlines()) == 1, text[-3000:]
    assert sum("calibration: " in ln for ln in text.splitlines()) == 1  # rank 1 is quiet
    assert sorted(p.name for p in d2.iterdir()) == ["out.pt"]  # no .tmp, lock or .ckpt
    one = CliRunner().invoke(main, _cli_args(cli_inputs, d1 / "out.pt"))
    assert one.exit_code == 0, one.output
    m2, _, meta2 = load_compressed(d2 / "out.pt")
    m1, _, meta1 = load_compressed(d1 / "out.pt")
    assert _max_diff(m1.state_dict(), m2.state_dict()) < TOL
    l1, l2 = meta1["finetune_log"], meta2["finetune_log"]
    assert len(l1["loss"]) == len(l2["loss"]) == 6 and l2["world_size"] == 2
    assert max(abs(a - b) for a, b in zip(l1["loss"], l2["loss"], strict=True)) < TOL
    assert l1["eval_steps"] == l2["eval_steps"] == [0, 2, 4, 6]
    assert max(abs(a - b) for a, b in zip(l1["held_kl"], l2["held_kl"], strict=True)) < TOL


@pytest.mark.parametrize("steps", [4, 0])
def test_rank_1_runs_nothing_after_the_fine_tune(tmp_path, steps):
    """Rank 1 exists for the fine-tune's collectives: it runs the stages up to the last
    fine-tune (same network as rank 0, so the same losses), then stops; weight rounding,
    the final checks and metadata are rank 0's alone (its stage log and timings show
    them, rank 1's do not). With no fine-tune (--steps 0) rank 1 runs nothing at all."""
    res = _torchrun([str(REPO / "tests" / "ddp_worker.py"), "compress", str(tmp_path),
                     str(steps)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["rank"] is None and r0["has_layer_errors"]
    assert "weights_16bit" in r0["stages"] and "weight_bits_s" in r0["timings"]
    assert "finish_s" in r0["timings"] and all(a is not None for a in r0["agreements"])
    assert r1["rank"]["rank"] == 1 and not r1["has_layer_errors"]
    assert "weights_16bit" not in r1["stages"] and "weight_bits_s" not in r1["timings"]
    assert "finish_s" not in r1["timings"]
    if steps:
        assert r1["rank"]["ran"][-1] == "finetune"
        assert {"freeze", "weight_quant", "finish"} <= set(r1["rank"]["skipped"])
        # everything before the fine-tune that shapes the network (fit, the ADD-cap
        # check/repair), the fine-tune itself, nothing after it
        k = r0["stages"].index(f"finetune_{steps}") + 1
        assert r1["stages"] == r0["stages"][:k] and r1["stages"][0] == "fit"
        assert len(r0["stages"]) > k  # rank 0 went on (weight rounding, checks)
        assert all(a is None for a in r1["agreements"])  # no held-apart checks on rank 1
        assert max(abs(a - b) for a, b in zip(r0["loss"], r1["loss"], strict=True)) < TOL
    else:
        assert r1["rank"]["ran"] == [] and r1["stages"] == [] and r1["timings"] == []


def test_world_size_not_dividing_the_batch_is_refused_in_one_line(tmp_path, cli_inputs):
    """Both ranks refuse before joining the group (no rendezvous, no wait): exit 2, and
    one line in all (rank 0's)."""
    procs = [subprocess.Popen([sys.executable, "-m", "hfbconvert.cli",
                               *_cli_args(cli_inputs, tmp_path / "out.pt", batch=7)],
                              cwd=tmp_path, env=_env(RANK=str(r), LOCAL_RANK=str(r),
                                                     WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                     MASTER_PORT=str(_free_port())),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    lines = [ln for o in outs for ln in (o[0] + o[1]).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --batch-size 7"), lines
    assert "2 processes" in lines[0] and not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------ early stopping
def test_early_stop_ships_the_best_state_checked():
    """Scripted held KL: best at step 2, then higher twice (patience 2): the run stops
    after 6 of 20 steps and the student is exactly what it was at step 2."""
    teacher = tiny_v1()
    student = _student(teacher)
    kls = iter([1.0, 0.5, 0.7, 0.8, 0.4, 0.3])
    seen: dict[int, dict] = {}

    def evaluate(m):
        seen[len(seen)] = copy.deepcopy(m.state_dict())
        return next(kls), 0.5

    cfg = FinetuneConfig(steps=20, batch_size=8, lr=1e-3, warmup=2, eval_every=2, patience=2,
                         stop_from=0.0)
    log = finetune(student, teacher, _images(), None, _norm, cfg, evaluate=evaluate)
    assert log.stopped_early_at == 6 and len(log.steps) == 6
    assert log.eval_steps == [0, 2, 4, 6] and log.held_kl == [1.0, 0.5, 0.7, 0.8]
    assert log.best_step == 2 and log.held_agreement == [0.5] * 4
    assert _max_diff(seen[1], student.state_dict()) == 0.0  # frozen form from the start
    assert _max_diff(seen[3], student.state_dict()) > 0  # not the last state


def test_no_early_stop_before_stop_from_so_a_late_best_is_shipped():
    """The MobileNetV1 shape (held KL up for three checks at full lr, then below the start):
    with patience 3 from the first check the run stopped at step 6 and shipped the input;
    with stop_from 0.5 it runs on and ships the later best; past half the steps it still
    stops after ``patience`` checks without one. compress's default never stops early."""
    teacher = tiny_v1()
    figures = [1.0, 1.3, 1.4, 1.2, 0.9, 0.8, 0.85, 0.9, 0.95, 0.99, 0.99]
    runs = {}
    for stop_from in (0.0, 0.5):
        kls = iter(figures)
        cfg = FinetuneConfig(steps=20, batch_size=8, lr=1e-3, warmup=2, eval_every=2,
                             patience=3, stop_from=stop_from)
        runs[stop_from] = finetune(_student(teacher), teacher, _images(), None, _norm, cfg,
                                   evaluate=lambda m, kls=kls: (next(kls), 0.5))
    early, late = runs[0.0], runs[0.5]
    assert early.stopped_early_at == 6 and early.best_step == 0
    assert late.best_step == 10 and late.stopped_early_at == 16
    assert late.held_kl == figures[:9]
    with pytest.raises(InputError, match="stop_from"):
        FinetuneConfig(stop_from=1.5)
    assert FinetuneConfig().stop_from == 1.0


def test_harmful_lr_stops_early_ships_the_fit_and_times_add_up():
    teacher = tiny_v1()
    data = CalibData(_images(120), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(120)], source="random")
    fit_only, _ = compress(teacher, tiny_info(), data,
                           CompressConfig(budget=0.6, finetune=FinetuneConfig(steps=0)))
    bad = CompressConfig(budget=0.6, finetune=FinetuneConfig(
        steps=40, batch_size=16, lr=0.3, eval_every=2, patience=2, stop_from=0.5,
        lr_backoff=0))
    hybrid, meta = compress(teacher, tiny_info(), data, bad)
    log = meta["finetune_log"]
    assert log["stopped_early_at"] is not None and log["stopped_early_at"] < 40
    assert len(log["steps"]) == log["stopped_early_at"]
    assert log["eval_steps"][0] == 0 and len(log["eval_steps"]) == len(log["held_kl"]) \
        == len(log["held_agreement"]) >= 3
    assert log["best_step"] == 0 and "kept the fit" in meta["finetune_reverted"]
    a, b = fit_only.state_dict(), hybrid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = meta["timings"]
    parts = sum(v for k, v in t.items() if k != "total_s")
    assert "other_s" in t and parts == pytest.approx(t["total_s"], rel=1e-9)
    # every named stage has its own line, the planner's MILP included (it was in other_s)
    assert {"sensitivity_s", "fragility_s", "plan_s", "fit_s", "finetune_s"} <= set(t)
