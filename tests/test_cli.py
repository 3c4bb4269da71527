"""CLI conventions, end to end on the tiny model (no shared data needed).

* ``--help`` works on every command;
* exit 2 with one ``error:`` line naming the file/option and the problem, never a
  traceback, for unusable input; exit 1 for a failed check;
* ``--json`` output is pure JSON on stdout, progress goes to stderr and ``--quiet`` silences it;
* outputs are refused when they exist (unless ``--force``), written atomically and
  byte-identical for the same inputs and ``--seed``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from hfbconvert import cli, fileio
from hfbconvert.cli import main

from .tiny import tiny_v1, write_npz, write_reference_checkpoint

REPO = Path(__file__).resolve().parent.parent
FAST = ["--steps", "4", "--batch-size", "8"]  # a real (short) fine-tune
FASTEST = ["--steps", "0", "--no-reconstruct"]  # fit only


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: str | os.PathLike) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(res: Result, *needles: str, code: int = 2, stdout: bool = False) -> str:
    """The run failed with ``code`` and exactly one ``error:`` line (other stderr lines,
    if any, are warnings) containing every needle; no traceback, nothing on stdout unless
    ``stdout`` (a failed check after a finished run still prints its summary)."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert all(ln.startswith("warning: ") for ln in lines if ln not in errors), res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert stdout or res.stdout == ""
    return errors[0]


def ok(res: Result) -> Result:
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    return res


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and p.name.endswith(".tmp"))


def _write_healthy_checkpoint(path: Path, npz: Path) -> Path:
    """The tiny reference checkpoint with BatchNorm statistics measured on ``npz``: with
    random statistics its logits are the same for every image (agreement trivially 1)."""
    write_reference_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    model = tiny_v1()
    x = torch.from_numpy(np.load(npz)["images"]).permute(0, 3, 1, 2).float()
    x = (x / 255.0 - 0.5) / 0.25  # the checkpoint's normalize mean/std
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one batch
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        assert model(x).argmax(1).unique().numel() > 1, "degenerate test model"
    ckpt["state_dict"] = model.state_dict()
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    npz = write_npz(d / "calib.npz")
    files = {"dir": d, "calib": npz, "model": _write_healthy_checkpoint(d / "tiny.pt", npz)}
    (d / "notes.pt").write_text("just some text\nnot a model\n")
    files["notes"] = d / "notes.pt"
    (d / "garbage.pt").write_bytes(bytes((i * 97 + 13) % 256 for i in range(4096)))
    files["garbage"] = d / "garbage.pt"
    data = files["model"].read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated"] = d / "truncated.pt"
    torch.save(tiny_v1(), d / "pickled.pt")  # a whole nn.Module
    files["pickled"] = d / "pickled.pt"
    (d / "empty_folder").mkdir()
    files["empty_folder"] = d / "empty_folder"
    return files


@pytest.fixture(scope="module")
def chain(inputs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """compress -> export onnx, once for the module (absolute paths: ``eval`` finds the
    original through the artifact's metadata)."""
    out_dir = tmp_path_factory.mktemp("chain")
    out = out_dir / "out.pt"
    res = ok(run("compress", inputs["model"], "--calib", inputs["calib"], *FAST, "-o", out,
                 "--json", "--min-agreement", "0", "--seed", "3"))
    onnx_dir = out_dir / "onnx1"
    onnx_dir.mkdir()
    onnx = onnx_dir / "m.onnx"
    exp = ok(run("export", "onnx", out, "-o", onnx))
    return {"dir": out_dir, "out": out, "compress": res, "onnx": onnx, "export": exp}


# --------------------------------------------------------------------------- help


def _all_commands() -> list[tuple[list[str], click.Command]]:
    """Every command and subcommand of the CLI, found by walking the click groups."""
    found: list[tuple[list[str], click.Command]] = []

    def walk(path: list[str], cmd: click.Command) -> None:
        found.append((path, cmd))
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=path[-1] if path else "hfbconvert")
            for name in cmd.list_commands(ctx):
                walk([*path, name], cmd.get_command(ctx, name))

    walk([], main)
    return found


def test_command_tree_is_complete() -> None:
    names = {" ".join(p) for p, _ in _all_commands()}
    # the walker itself must find nested commands, or the help test proves little
    assert {"", "analyze", "compress", "eval", "export", "export onnx", "report"} <= names


@pytest.mark.parametrize("path,cmd", _all_commands(),
                         ids=[" ".join(p) or "main" for p, _ in _all_commands()])
def test_help_everywhere(path: list[str], cmd: click.Command) -> None:
    for flag in ("--help", "-h"):
        res = ok(run(*path, flag))
        assert res.stdout.startswith("Usage:") and res.stderr == ""
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0] in res.stdout, (path, param.opts[0])
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(click.Context(cmd)):
                assert sub in res.stdout


def test_version() -> None:
    from hfbconvert import __version__

    assert __version__ in ok(run("--version")).stdout


# ------------------------------------------------------------------ bad model files


@pytest.mark.parametrize("cmd", [["compress", "{}", "--dry-run"], ["analyze", "{}"],
                                 ["export", "onnx", "{}", "-o", "{out}"],
                                 ["eval", "{}", "--data", "{calib}"], ["report", "{}"]])
@pytest.mark.parametrize("kind,needle", [
    ("missing", "no such file"), ("notes", "text file"), ("garbage", "not a PyTorch checkpoint"),
    ("truncated", "truncated or corrupt"), ("empty_folder", "is a directory")])
def test_unusable_model_file(inputs, tmp_path, cmd, kind, needle) -> None:
    path = inputs["dir"] / "missing.pt" if kind == "missing" else inputs[kind]
    args = [a.format(path, out=tmp_path / "m.onnx", calib=inputs["calib"]) for a in cmd]
    msg = one_error(run(*args), str(path), needle)
    assert "--trust-pickle" not in msg  # garbage is not "pickled objects"
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("cmd", [["compress", "{}", "--dry-run"], ["analyze", "{}"],
                                 ["export", "onnx", "{}", "-o", "{out}"],
                                 ["eval", "{}", "--data", "{calib}"]])
def test_pickled_module_needs_trust_pickle(inputs, tmp_path, cmd) -> None:
    args = [a.format(inputs["pickled"], out=tmp_path / "m.onnx", calib=inputs["calib"])
            for a in cmd]
    one_error(run(*args), str(inputs["pickled"]), "--trust-pickle", "pickled")


def test_pickled_module_loads_with_trust_pickle(inputs) -> None:
    res = ok(run("analyze", inputs["pickled"], "--trust-pickle", "--budgets", "1", "--json",
                 "-q"))
    assert json.loads(res.stdout)["layers"]


def test_report_of_a_pickled_module_does_not_suggest_a_missing_flag(inputs) -> None:
    # `report` has no --trust-pickle; our artifacts never contain pickled code
    msg = one_error(run("report", inputs["pickled"]), str(inputs["pickled"]))
    assert "--trust-pickle" not in msg and "not an hfbconvert compressed model" in msg


def test_report_of_an_uncompressed_model(inputs) -> None:
    one_error(run("report", inputs["model"]), str(inputs["model"]), "not an hfbconvert")


# ------------------------------------------------------------------ calibration data


@pytest.mark.parametrize("cmd", ["analyze", "compress"])
def test_missing_calibration_path(inputs, tmp_path, cmd) -> None:
    where = tmp_path / "no_such_images"
    extra = ["-o", tmp_path / "o.pt"] if cmd == "compress" else []
    one_error(run(cmd, inputs["model"], "--calib", where, *extra), str(where), "no such")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("cmd", ["analyze", "compress"])
def test_empty_calibration_folder(inputs, tmp_path, cmd) -> None:
    extra = ["-o", tmp_path / "o.pt"] if cmd == "compress" else []
    one_error(run(cmd, inputs["model"], "--calib", inputs["empty_folder"], *extra),
              str(inputs["empty_folder"]), "no images")


def test_eval_data_missing(inputs, tmp_path) -> None:
    one_error(run("eval", inputs["model"], "--data", tmp_path / "nope"), str(tmp_path / "nope"))


# ----------------------------------------------------------------------- outputs


@pytest.mark.parametrize("cmd", [["compress", "{model}", "-o", "{out}", *FASTEST],
                                 ["analyze", "{model}", "-o", "{out}"],
                                 ["export", "onnx", "{model}", "-o", "{out}", "--no-verify"]])
def test_output_folder_missing(inputs, tmp_path, cmd) -> None:
    out = tmp_path / "no" / "such" / "folder" / "x.out"
    one_error(run(*[a.format(model=inputs["model"], out=out) for a in cmd]), str(out),
              "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("cmd", [["compress", "{model}", "--calib", "{calib}", "-o", "{out}",
                                  *FASTEST, "--min-agreement", "0"],
                                 ["analyze", "{model}", "--budgets", "1,2", "-o", "{out}"],
                                 ["export", "onnx", "{model}", "-o", "{out}", "--no-verify"]])
def test_existing_output_needs_force(inputs, tmp_path, cmd) -> None:
    out = tmp_path / "existing.out"
    out.write_bytes(b"precious")
    args = [a.format(model=inputs["model"], calib=inputs["calib"], out=out) for a in cmd]
    one_error(run(*args), str(out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    ok(run(*args, "--force", "-q"))
    assert out.read_bytes() != b"precious" and out.stat().st_size > 100
    assert temp_leftovers(tmp_path) == []


def test_failed_write_is_atomic(inputs, tmp_path, monkeypatch) -> None:
    """A write that fails at the last step leaves the old file intact and no temp file."""
    out = tmp_path / "out.pt"
    out.write_bytes(b"old version")

    def no_space(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(fileio.os, "replace", no_space)
    res = run("compress", inputs["model"], "--calib", inputs["calib"], *FASTEST, "-o", out,
              "--force", "--min-agreement", "0", "-q")
    one_error(res, str(out), "No space left")
    assert out.read_bytes() == b"old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


# ------------------------------------------------------------------------ options


@pytest.mark.parametrize("budget", ["0", "-0.5", "1.5", "nan", "inf"])
def test_budget_out_of_range(inputs, tmp_path, budget) -> None:
    one_error(run("compress", inputs["model"], "--budget", budget, "-o", tmp_path / "o.pt"),
              "--budget", "(0, 1]")


def test_unreachable_budget_names_the_smallest_reachable(inputs, tmp_path) -> None:
    res = run("compress", inputs["model"], "--calib", inputs["calib"], "--budget", "0.01",
              "-o", tmp_path / "o.pt", "-q")
    msg = one_error(res, "--budget 0.01", "unreachable", "smallest reachable budget")
    smallest = float(msg.split("smallest reachable budget is ")[1].split()[0])
    assert 0.01 < smallest < 1
    # ... and that budget is indeed reachable
    plan = json.loads(ok(run("compress", inputs["model"], "--calib", inputs["calib"],
                             "--budget", str(smallest), "--dry-run", "--json", "-q")).stdout)
    p = plan["plan"]
    assert p["predicted_muls"] <= smallest * p["original_muls"] + 1
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("flag", ["--size-budget", "--energy-budget"])
@pytest.mark.parametrize("value", ["0", "-0.2", "1.5", "nan"])
def test_cap_out_of_range(inputs, tmp_path, flag, value) -> None:
    one_error(run("compress", inputs["model"], flag, value, "-o", tmp_path / "o.pt"), flag,
              "(0, 1]")


def test_size_budget_caps_stored_bytes(inputs, tmp_path) -> None:
    """The planner meets the byte cap (cost model) as well as the MUL budget, or refuses."""
    def plan(*extra: str) -> dict:
        res = ok(run("compress", inputs["model"], "--calib", inputs["calib"], "--dry-run",
                     "--json", "-q", "--weight-bits", "8", *extra))
        return json.loads(res.stdout)["plan"]

    free = plan()
    cap = plan("--size-budget", "0.2")
    assert free != cap
    assert any(n.startswith("size budget 20.0%: ") for n in cap["notes"])
    one_error(run("compress", inputs["model"], "--calib", inputs["calib"], "--dry-run",
                  "--critical-fraction", "0.5", "--size-budget", "0.5"),
              "--size-budget 0.5", "does not apply", "--critical-fraction")
    assert cap["predicted_muls"] <= 0.536 * cap["original_muls"] + 1
    res = run("compress", inputs["model"], "--calib", inputs["calib"], "--weight-bits", "8",
              "--size-budget", "0.01", "-o", tmp_path / "o.pt", "-q")
    one_error(res, "--size-budget 0.01", "unreachable", "smallest plan needs")
    out = tmp_path / "c.pt"
    summary = json.loads(ok(run("compress", inputs["model"], "--calib", inputs["calib"],
                                *FASTEST, "--weight-bits", "8", "--size-budget", "0.2",
                                "--min-agreement", "0", "-o", out, "--json", "-q")).stdout)
    assert summary["cost"]["bytes"] <= 0.2 * summary["original_cost"]["bytes"]


def test_energy_budget_caps_int8_energy(inputs, tmp_path) -> None:
    """int8: --energy-budget 1 keeps the arithmetic energy at or below the int8 original's
    (int8 PTQ under the same cost model), which the MUL budget alone does not."""
    from hfbconvert.costs import model_cost
    from hfbconvert.models.loading import load_model

    net, info = load_model(str(inputs["model"]))
    int8_original = model_cost(net, info.resolution, act_bits=8).energy_pj
    energy = {}
    for cap in ([], ["--energy-budget", "1"], ["--energy-budget", "0.9"]):
        out = tmp_path / f"e{len(energy)}.pt"
        summary = json.loads(ok(run(
            "compress", inputs["model"], "--calib", inputs["calib"], *FASTEST,
            "--activation-bits", "8", *cap, "--min-agreement", "0", "-o", out, "--json",
            "-q")).stdout)
        energy[tuple(cap)] = summary["cost"]["energy_pj"]
    assert energy[()] > 0.9 * int8_original  # so the 0.9 cap binds
    assert energy[("--energy-budget", "1")] <= int8_original
    assert energy[("--energy-budget", "0.9")] <= 0.9 * int8_original


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"no.such.layer": {"r": 3}}', "unknown layer(s) no.such.layer"),
    ('{"layers": {"blocks.0.conv_pw": 3}}', "blocks.0.conv_pw"),
    ('{"blocks.0.conv_pw": {"r": "many"}}', "r must be"),
    ('{"blocks.0.conv_pw": {"critcal": 3}}', "unknown key"),
    ('{"blocks.0.conv_pw": {"critical_idx": [999]}}', "out of range"),
])
def test_bad_plan_file(inputs, tmp_path, content, needle) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    one_error(run("compress", inputs["model"], "--plan", plan, "--dry-run"), str(plan), needle)


def test_plan_file_missing(inputs, tmp_path) -> None:
    one_error(run("compress", inputs["model"], "--plan", tmp_path / "p.json", "--dry-run"),
              str(tmp_path / "p.json"), "no such file")


def test_plan_file_is_applied(inputs, tmp_path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"blocks.0.conv_pw": {"critical": 4, "r": 24}}}))
    res = ok(run("compress", inputs["model"], "--plan", plan, "--dry-run", "--json", "-q"))
    layer = next(lp for lp in json.loads(res.stdout)["plan"]["layers"]
                 if lp["name"] == "blocks.0.conv_pw")
    assert (layer["n_critical"], len(layer["critical_idx"]), layer["r"]) == (4, 4, 24)


@pytest.mark.parametrize("budgets", ["a,b", "0,1", ",", "1,2,x", "1000"])
def test_bad_budgets_for_analyze(inputs, tmp_path, budgets) -> None:
    one_error(run("analyze", inputs["model"], "--budgets", budgets, "-o", tmp_path / "a.json"),
              "--budgets")
    assert not (tmp_path / "a.json").exists()


# --------------------------------------------------------------------- end to end


def test_analyze_json(inputs, tmp_path) -> None:
    out = tmp_path / "sens.json"
    res = ok(run("analyze", inputs["model"], "--calib", inputs["calib"], "--budgets", "1,2,4",
                 "--json", "-o", out))
    rep = json.loads(res.stdout)  # nothing but JSON on stdout
    assert rep == json.loads(out.read_text())
    assert rep["schema_version"] == cli.JSON_SCHEMA_VERSION and rep["activation_aware"]
    assert rep["budgets"] == [1, 2, 4]
    names = [ly["name"] for ly in rep["layers"]]
    assert names == [f"blocks.{i}.conv_pw" for i in range(13)] + ["classifier"]
    for ly in rep["layers"]:
        assert len(ly["loss"]) == ly["c_out"] and all(len(r) == 3 for r in ly["loss"])
        assert sorted(ly["ranking"]) == list(range(ly["c_out"]))
        assert all(math.isfinite(v) and v >= 0 for v in ly["median_loss"])
    assert "calibration: 64 images" in res.stderr  # progress goes to stderr
    assert temp_leftovers(tmp_path) == []


def test_compress_json_and_output(chain) -> None:
    res = chain["compress"]
    summary = json.loads(res.stdout)  # progress lines did not leak into stdout
    assert summary["schema_version"] == cli.JSON_SCHEMA_VERSION
    assert summary["output"] == str(chain["out"]) and chain["out"].stat().st_size > 1000
    assert [s["stage"] for s in summary["stages"]][-2:] == ["finetune_4", "weights_16bit"]
    assert summary["cost"]["muls"] < summary["original_cost"]["muls"]
    # the fine-tune's held-apart curve, as the artifact records it
    from hfbconvert import schemas

    schemas.validate(summary, "compress")
    ft = summary["finetune"]
    log = torch.load(chain["out"], weights_only=True)["meta"]["finetune_log"]
    assert ft["steps_run"] == 4 and ft["curve"]["eval_steps"] == log["eval_steps"]
    assert ft["curve"]["held_kl"] == log["held_kl"] and len(ft["curve"]["held_kl"]) >= 2
    assert ft["best_step"] == log["best_step"]
    assert "agreement" in res.stderr  # progress lines went to stderr
    assert not Path(str(chain["out"]) + ".ckpt").exists()  # fine-tune checkpoint cleaned up
    assert temp_leftovers(chain["dir"]) == []


def test_compress_is_deterministic_and_quiet(inputs, chain, tmp_path) -> None:
    """Same inputs + --seed = same bytes (--quiet changes nothing but stderr)."""
    again = tmp_path / "again.pt"
    res = ok(run("compress", inputs["model"], "--calib", inputs["calib"], *FAST, "-o", again,
                 "--json", "--min-agreement", "0", "--seed", "3", "--quiet"))
    # quiet: no progress or status lines; warnings are always shown
    assert all(ln.startswith("warning: ") for ln in res.stderr.splitlines())
    assert json.loads(res.stdout)["output"] == str(again)
    assert again.read_bytes() == chain["out"].read_bytes()


def test_export_onnx_verifies_and_is_deterministic(chain, tmp_path) -> None:
    assert "verify: PASS" in chain["export"].stdout
    assert {p.name for p in chain["onnx"].parent.iterdir()} == {
        "m.onnx", "m.report.json", "m.report.md", "m.report.html"}
    res = ok(run("export", "onnx", chain["out"], "-o", tmp_path / "m.onnx", "--json", "-q"))
    assert res.stderr == ""
    out = json.loads(res.stdout)
    assert out["verify"]["passed"] is True and out["export"]["custom_ops"] > 0
    assert (tmp_path / "m.onnx").read_bytes() == chain["onnx"].read_bytes()
    assert temp_leftovers(tmp_path) == []


def test_report_and_eval(chain, inputs, tmp_path) -> None:
    res = ok(run("report", chain["out"], "--json", "--output-dir", tmp_path / "rep", "-q"))
    rep = json.loads(res.stdout)
    assert len(rep["layers"]) == 14  # 13 pointwise + classifier
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "report.html", "report.json", "report.md"]
    text = ok(run("report", chain["out"])).stdout
    assert "blocks.0.conv_pw" in text
    ev = json.loads(ok(run("eval", chain["out"], "--data", inputs["calib"], "--json")).stdout)
    assert ev["schema_version"] == cli.JSON_SCHEMA_VERSION and ev["n"] == 64
    assert ev["top1"] is not None and 0 <= ev["agreement"] <= 1  # original found via metadata


def test_min_agreement_failure_exits_1(inputs, tmp_path) -> None:
    """All-ternary TWN without reconstruction cannot keep every held-apart decision."""
    out = tmp_path / "twn.pt"
    res = run("compress", inputs["model"], "--calib", inputs["calib"], "--method", "twn",
              *FASTEST, "-o", out, "--min-agreement", "1.0", "-q")
    msg = one_error(res, str(out), "--min-agreement 1.0", "agreement", "95% interval",
                    code=1, stdout=True)
    assert float(msg.split("(agreement ")[1].split(",")[0]) < 1.0
    assert out.exists()  # the model is written; the check failed
    assert temp_leftovers(tmp_path) == []


# ------------------------------------------------------------------ real processes


def _exe() -> list[str]:
    script = Path(sys.executable).parent / "hfbconvert"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hfbconvert"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_subprocess_errors_have_no_traceback(inputs) -> None:
    for exe in (_exe(), [sys.executable, "-m", "hfbconvert"]):
        res = subprocess.run([*exe, "compress", str(inputs["garbage"]), "--dry-run"],
                             capture_output=True, text=True, timeout=120, env=_env(),
                             cwd=inputs["dir"])
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {inputs['garbage']}:"), lines


def test_subprocess_quiet_json(chain, tmp_path) -> None:
    """In a real process (real stderr: library warnings would show) --quiet is silent and
    stdout is exactly one JSON document."""
    out = tmp_path / "m.onnx"
    res = subprocess.run([*_exe(), "export", "onnx", str(chain["out"]), "-o", str(out),
                          "--json", "--quiet", "--calib-size", "8"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert json.loads(res.stdout)["verify"]["passed"] is True
    assert out.read_bytes() == chain["onnx"].read_bytes()
    res = subprocess.run([*_exe(), "--help"], capture_output=True, text=True, timeout=60,
                         env=_env())
    assert res.returncode == 0 and "Usage: hfbconvert" in res.stdout
