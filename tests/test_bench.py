"""The benchmark harness (bench/) end to end on the tiny model: one compressed cell run
through the real CLI, the int8 baseline, a model whose files are missing (recorded as
failed, not fatal), the results JSON, BENCHMARKS.md + plot, and bench.compare."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import RESULTS_SCHEMA, compare, run
from bench.cases import METHODS, SUITES

from .tiny import write_npz, write_reference_checkpoint


def _matrix(tmp_path: Path) -> Path:
    ckpt = write_reference_checkpoint(tmp_path / "tiny.pt")
    calib = write_npz(tmp_path / "calib.npz", n=24, seed=0)
    ev = write_npz(tmp_path / "eval.npz", n=32, seed=1)
    spec = {
        "name": "tiny",
        "models": [
            {"key": "tiny", "title": "tiny V1", "model": str(ckpt), "calib": str(calib),
             "eval_data": str(ev), "int8_calib": 16, "paper_reference": True},
            {"key": "gone", "title": "missing files", "model": str(tmp_path / "nope.pt"),
             "calib": str(calib), "eval_data": str(ev)},
        ],
        # one compressed cell; reconstruction off to keep the test fast
        "methods": [{"key": "twn-fast", "label": "TWN, no reconstruction", "kind": "compress",
                     "args": ["--method", "twn", "--no-reconstruct"]}, "int8-ptq"],
        "latency_repeats": [2, 1],
    }
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_bench_end_to_end(tmp_path: Path, capsys) -> None:
    out, md, plots = tmp_path / "results", tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    argv = ["--matrix", str(_matrix(tmp_path)), "--steps", "2", "--out", str(out),
            "--markdown", str(md), "--plots", str(plots), "--threads", "1",
            "--torch-threads", "1"]  # oversubscribed OpenMP threads are ~10x slower
    assert run.main(argv) == 0

    files = sorted(out.glob("*-tiny.json"))
    assert len(files) == 1
    assert not (out / "tmp").exists()  # artifacts cleaned up
    res = json.loads(files[0].read_text())
    assert res["schema"] == RESULTS_SCHEMA and res["complete"] is True
    assert res["command"].startswith("python -m bench.run --matrix")
    for key in ("python", "torch", "onnxruntime", "hfbconvert"):
        assert res["versions"][key]
    assert res["machine"]["cpus"] >= 1 and "commit" in res["git"]

    cells = {(c["model"], c["method"]): c for c in res["cells"]}
    assert set(cells) == {("tiny", "original"), ("tiny", "twn-fast"), ("tiny", "int8-ptq"),
                          ("gone", "original"), ("gone", "twn-fast"), ("gone", "int8-ptq")}
    for key in (("tiny", "original"), ("tiny", "twn-fast"), ("tiny", "int8-ptq")):
        assert cells[key]["status"] == "ok", cells[key]["errors"]
    orig, cell, q = cells["tiny", "original"], cells["tiny", "twn-fast"], cells["tiny", "int8-ptq"]
    for k in ("top1", "top5", "agreement", "n_eval", "muls", "adds", "params", "cost_bytes",
              "energy_pj", "onnx_bytes", "convert_wall_s", "convert_peak_rss_mb"):
        assert cell[k] is not None, k
    assert cell["n_eval"] == 32 and cell["steps_finetune"] == 2
    assert cell["finetune"]["steps_run"] == 2 and cell["finetune"]["lr_cuts"] == []
    assert cell["muls"] < orig["muls"]
    assert cell["onnx_custom_ops"] > 0 and cell["verify"]["passed"]
    assert [s["name"] for s in cell["steps"]] == ["compress", "eval", "export"]
    assert cell["steps"][0]["command"].startswith("hfbconvert compress ")
    for b in ("b1", "b32"):
        assert cell["latency"][b]["ms"] > 0 and cell["latency"][b]["ratio"] > 0
    assert q["top1"] is not None and q["onnx_bytes"] < orig["onnx_bytes"]
    # per-image results on the same images for every evaluated cell (paired comparisons)
    shas = {c["per_image"]["images_sha256"] for c in (orig, cell, q)}
    assert len(shas) == 1 and cell["per_image"]["n"] == 32 and cell["top1_ci95"] is not None
    # which images the figures came from; the compressed cell's calibration seed
    ev = res["models"][0]["splits"]["evaluation"]
    assert ev["name"] == "eval" and ev["n"] == 32 and len(ev["list_sha256"]) == 64
    assert cell["seed"] == 0 and "--seed" in cell["steps"][0]["command"]
    assert cells["gone", "twn-fast"]["status"] == "failed"
    assert "not found" in cells["gone", "twn-fast"]["errors"][0]

    text = md.read_text()
    assert "## Tiny suite" in text and "python -m bench.run --matrix" in text
    assert "| `twn-fast` |" in text and "| `original` |" in text
    assert "`twn-fast` failed" in text  # the missing model's cells, with their error
    assert (plots / "tiny-tiny.png").stat().st_size > 0
    assert "plots/tiny-tiny.png" in text

    # compare: the latest two files; a later copy with a better top-1
    newer = json.loads(files[0].read_text())
    for c in newer["cells"]:
        if c["method"] == "twn-fast" and c["model"] == "tiny":
            c["top1"] = cell["top1"] + 0.05
    (out / "29991231T000000Z-tiny.json").write_text(json.dumps(newer))
    capsys.readouterr()
    assert compare.main(["--dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [ln for ln in printed if "twn-fast" in ln]
    assert any("+5.00pp" in ln for ln in lines)
    # paired over the stored per-image bits (unchanged by the edit above)
    assert any("new - old +0.00pp" in ln and "within noise" in ln for ln in printed)


def test_suites_are_well_formed() -> None:
    quick = SUITES["quick"]
    assert quick.models == ("v1-0.5-160",)
    assert set(quick.methods["v1-0.5-160"]) == {"original", "twn", "hybrid-0.536", "int8-ptq"}
    full = SUITES["full"]
    for model in full.models:
        assert set(full.methods[model]) == set(METHODS)
    args = run.build_parser().parse_args(["--suite", "full", "--methods", "twn"])
    name, cases, methods, _ = run.plan(args)
    assert name == "full" and len(cases) == 3
    order = [(c.key, m.key) for c, m, _ in run.schedule(cases, methods)]
    assert order == [(k, m) for k in ("v1-0.5-160", "cifar10-v1-0.5", "v2")
                     for m in ("original", "twn")]
    assert all(m.key in ("original", "twn") for ms in methods.values() for m in ms)


def test_dry_run_prints_matrix(capsys) -> None:
    assert run.main(["--suite", "quick", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "hybrid-0.536" in text and "--budget 0.536" in text


def test_time_budget_skips_cells(tmp_path: Path) -> None:
    """Cells that would start after the budget are recorded as skipped, not dropped."""
    out = tmp_path / "results"
    argv = ["--matrix", str(_matrix(tmp_path)), "--out", str(out), "--no-report",
            "--time-budget", "0.00001"]
    assert run.main(argv) == 0
    res = json.loads(next(out.glob("*-tiny.json")).read_text())
    tiny = [c for c in res["cells"] if c["model"] == "tiny"]
    assert len(tiny) == 3 and all(c["status"] == "skipped" for c in tiny)
    assert "time budget" in tiny[0]["errors"][0]


def test_cli_cells_import_the_checkout_the_results_name(tmp_path: Path, monkeypatch) -> None:
    """A run from a clone records the clone's commit; its CLI cells must run the clone's
    code too, not the tree an editable install points at."""
    import subprocess
    import sys

    from bench.cases import REPO

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    env = run._pinned_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), str(tmp_path)]
    got = subprocess.run([sys.executable, "-c", "import hfbconvert; print(hfbconvert.__file__)"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(got.stdout.strip()).resolve().parent.parent == REPO
    assert run._git()["code"] == str(REPO)
