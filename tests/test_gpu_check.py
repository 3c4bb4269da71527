"""bench/gpu_check.py: the CUDA end-to-end check says it skipped, exit 0, without CUDA (no
test depends on a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the check would run")
def test_without_cuda_it_skips_with_exit_0(capsys, tmp_path) -> None:
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out), "--model", str(tmp_path / "none.pt")]) == 0
    assert "no CUDA: skipped" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_cpu_against_cpu(tmp_path) -> None:
    """The script's own logic (two compress runs, plan/weight/agreement comparison, the
    results file) on the tiny model, the CPU standing in for the GPU."""
    from .tiny import write_npz, write_reference_checkpoint

    out = tmp_path / "r.json"
    args = ["--model", str(write_reference_checkpoint(tmp_path / "m.pt")), "--calib",
            str(write_npz(tmp_path / "c.npz", n=40)), "--calib-size", "40", "--steps", "2",
            "--against", "cpu", "--out", str(out)]
    assert gpu_check.main(args) == 0
    r = json.loads(out.read_text())
    assert r["passed"] and r["checks"]["same_plan"] and r["max_rel_weight_diff"] == 0.0
    # --smoke (the default): every other heavy command ran once and said so
    names = [s["name"] for s in r["smoke"]["steps"]]
    assert {"analyze", "compress int8 gptq", "compress synthetic calibration", "finetune",
            "export onnx", "eval on cpu", "compress under torchrun (1 process)"} <= set(names)
    assert all(s["rc"] == 0 for s in r["smoke"]["steps"]) and r["smoke"]["passed"]


def test_benchmarks_section_is_generated_from_the_results_files(tmp_path) -> None:
    """BENCHMARKS.md's CUDA-check block is what ``--render`` makes of the results files:
    one row per file, the plan mismatch of the planning-on-GPU run marked, every smoke
    step's exit status."""
    runs = [(p.name, json.loads(p.read_text()))
            for p in gpu_check.RESULTS.glob("gpu-check*.json")]
    assert runs, "no bench/results/gpu-check*.json"
    md = tmp_path / "B.md"
    md.write_text("# x\n")
    from bench.rss import splice

    runs.sort(key=lambda nr: nr[1].get("measured_utc", ""))
    text = gpu_check.render(runs)
    splice(md, text, gpu_check.START, gpu_check.END)
    real = (gpu_check.RESULTS.parent.parent / "BENCHMARKS.md").read_text()
    assert md.read_text().split(gpu_check.START)[1] in real
    for name, r in runs:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        assert ("| yes |" in row) == r["checks"]["same_plan"]
    for _, r in runs:
        for st in (r.get("smoke") or {}).get("steps", []):
            assert f"| {st['name']} |" in text
