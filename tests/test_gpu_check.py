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
