"""bench.paired_cells: one method's cells against another's across results files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import RESULTS_SCHEMA, paired_cells
from hfbconvert.metrics import encode_bits, encode_floats

N = 400


def _cell(method: str, right: np.ndarray, seed: int | None = None, kl: float | None = None,
          sha: str = "imgs", convert: float = 10.0) -> dict:
    pi = {"n": N, "images_sha256": sha, "correct_hex": encode_bits(right)}
    if kl is not None:
        pi["kl_b64"] = encode_floats(np.full(N, kl, np.float32))
    return {"model": "m", "method": method, "seed": seed, "status": "ok",
            "top1": float(right.mean()), "per_image": pi, "convert_wall_s": convert,
            "steps_finetune": "auto"}


def _write(path: Path, cells: list[dict]) -> Path:
    path.write_text(json.dumps({"schema": RESULTS_SCHEMA, "cells": cells}))
    return path


def test_seed_pairs_and_seed_means_are_paired_and_worded(tmp_path: Path) -> None:
    ref = np.arange(N) % 4 != 0  # 75% right
    worse = ref.copy()
    worse[np.flatnonzero(ref)[:40]] = False  # 40 right images turned wrong: -10 points
    same = ref.copy()
    a = _write(tmp_path / "a.json", [_cell("x", worse, 0, kl=0.02, convert=5),
                                     _cell("x", worse, 1, kl=0.02)])
    b = _write(tmp_path / "b.json", [_cell("original", ref), _cell("y", same, 0, kl=0.03),
                                     _cell("y", same, 2, kl=0.03)])
    lines = paired_cells.report("m", [a], "x", [b], "y", [])
    pairs = [ln for ln in lines if ln.startswith("seed ")]
    assert len(pairs) == 1 and pairs[0].startswith("seed 0:")  # seed 1/2 only on one side
    assert "top-1 -10.00 [" in pairs[0] and "(worse)" in pairs[0]
    assert "KL -0.0100 [-0.0100, -0.0100] (lower: closer to FP32)" in pairs[0]
    assert "convert 5 s vs 10 s" in pairs[0]
    text = "\n".join(lines)
    assert "over seeds [0, 1]: top-1 65.00 ± 0.00 (65.00..65.00)" in text
    assert "vs FP32 (75.00): seed-averaged -10.00 [" in text
    assert "vs int8 PTQ: no int8 PTQ cell in the files" in text
    # side b against the same FP32: identical images, a zero difference within noise
    assert "vs FP32 (75.00): seed-averaged +0.00 [+0.00, +0.00] (within noise" in text


def test_other_images_are_not_paired(tmp_path: Path) -> None:
    right = np.ones(N, bool)
    a = _write(tmp_path / "a.json", [_cell("x", right, 0, sha="one")])
    b = _write(tmp_path / "b.json", [_cell("x", right, 0, sha="two")])
    lines = paired_cells.report("m", [a], "x", [b], "x", [])
    assert lines[1].endswith("not paired (different or unrecorded evaluation images)")


def test_cli_prints_the_report(tmp_path: Path, capsys) -> None:
    right = np.arange(N) % 2 == 0
    a = _write(tmp_path / "a.json", [_cell("x", right, 0)])
    paired_cells.main(["--model", "m", "--a", str(a), "--a-method", "x", "--b", str(a),
                       "--b-method", "x"])
    out = capsys.readouterr().out
    assert "top-1 +0.00 [+0.00, +0.00], p = 1" in out
