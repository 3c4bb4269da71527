"""Every option documented and named consistently; every unenforceable value refused."""

from __future__ import annotations

import click
import pytest

from hfbconvert.cli import main
from hfbconvert.pipeline import CompressConfig, held_count

from .test_cli import FASTEST, one_error, run
from .tiny import write_reference_checkpoint


def _commands(group: click.Group = main, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{prefix}{name} ")
        else:
            out.append((prefix + name, cmd))
    return out


COMMANDS = _commands()


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_help(name: str, cmd: click.Command) -> None:
    missing = [p.opts[0] for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, f"{name}: {missing}"


def test_option_names_are_consistent_across_commands() -> None:
    seen: dict[str, set[str]] = {}
    for _, cmd in COMMANDS:
        for p in cmd.params:
            if isinstance(p, click.Option):
                for o in p.opts + p.secondary_opts:
                    seen.setdefault(o, set()).add(p.name)
    # one flag, one meaning; -q is --quiet and -o an output *file* wherever they appear
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items()
                                                     if len(v) > 1}
    assert seen["-q"] == {"quiet"} and seen["-o"] == {"output"}
    assert "--critical-bits" not in seen and "--size" not in seen
    for _, cmd in COMMANDS:  # negatable flags come in --x/--no-x pairs
        for p in cmd.params:
            for o in p.opts:
                assert not o.startswith("--no-") or not getattr(p, "is_flag", False) or \
                    p.secondary_opts, o
    report = dict(COMMANDS)["report"]
    names = {p.name for p in report.params}
    assert {"force", "trust_pickle", "quiet"} <= names and "seed" not in names


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("opts") / "tiny.pt")


@pytest.mark.parametrize("args,needle", [
    (["--max-add-increase", "-1"], "--max-add-increase"),
    (["--max-add-increase", "-5"], "--max-add-increase"),
    (["--max-add-increase", "nan"], "--max-add-increase"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--hidden-bits", "8"], "--hidden-bits"),
    (["--critical-fraction", "0.5", "--budget", "0.5"], "--critical-fraction"),
    (["--min-agreement", "nan"], "--min-agreement"),
    (["--weight-bits", "4"], "--weight-bits"),
])
def test_compress_refuses_unenforceable_values(model, tmp_path, args, needle) -> None:
    out = tmp_path / "o.hfb.pt"
    one_error(run("compress", model, *FASTEST, *args, "-o", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1"])
def test_analyze_refuses_a_threshold_that_is_not_a_number(model, tmp_path, value) -> None:
    out = tmp_path / "a.json"
    one_error(run("analyze", model, "--threshold", value, "-o", out), "--threshold")
    assert not out.exists()


def test_analyze_says_when_threshold_budget_is_not_evaluated(model, tmp_path) -> None:
    one_error(run("analyze", model, "--budgets", "1,4", "--threshold-budget", "2"),
              "--threshold-budget 2", "--budgets")
    res = run("analyze", model, "--budgets", "1,4", "--json")  # default 2: said, not silent
    assert res.exit_code == 0 and "counted at r=1" in res.stderr


def test_held_apart_set_is_big_enough_to_gate_on() -> None:
    cfg = CompressConfig()
    assert held_count(1000, cfg) == 200 and held_count(5000, cfg) == 500
    assert held_count(100, cfg) == 20 and held_count(48, cfg) == 9
    assert CompressConfig().min_agreement == 0.75


def test_quiet_does_not_outlive_its_command(model) -> None:
    """A -q command run in-process (a notebook, a test) must not silence later library
    calls: --quiet belongs to one command."""
    from hfbconvert import progress

    assert not progress.is_quiet()
    run("analyze", model, "--budgets", "1,2", "--json", "-q")
    assert not progress.is_quiet()


@pytest.mark.parametrize("cmd", [["analyze"], ["compress"], ["eval", "--data", "x.npz"],
                                 ["export", "onnx", "-o", "x.onnx"]])
def test_device_cuda_without_cuda_is_refused_before_work(model, cmd, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [*cmd[:2], model, *cmd[2:]] if cmd[0] == "export" else [cmd[0], model, *cmd[1:]]
    one_error(run(*args, "--device", "cuda"), "--device cuda")
