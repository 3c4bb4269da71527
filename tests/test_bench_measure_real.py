"""The real-model bench scripts' pure parts: paired comparisons from per-image records, the
generality table's markdown and its localized splice into BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.generality import END, START, markdown, real_top1, splice
from bench.lite0 import missing_cells, paired
from hfbconvert.metrics import encode_bits


def _cell(method: str, bits: np.ndarray, sha: str = "x") -> dict:
    return {"model": "m", "method": method, "top1": float(bits.mean()),
            "per_image": {"n": bits.size, "images_sha256": sha,
                          "correct_hex": encode_bits(bits)}}


def test_paired_difference_and_refusals() -> None:
    a = np.array([1, 1, 1, 1, 0, 0, 1, 1] * 25, bool)
    b = np.array([1, 1, 1, 1, 1, 1, 1, 0] * 25, bool)
    res = {"cells": [_cell("original", b), _cell("hybrid-0.536", a),
                     _cell("int8-ptq", a, sha="other")]}
    out = paired(res, [("hybrid-0.536", "original"), ("int8-ptq", "original"),
                       ("hybrid-0.536-int8", "original")])
    first = out[0]
    assert first["diff"] == pytest.approx(a.mean() - b.mean())
    assert (first["only_a"], first["only_b"]) == (25, 50)
    assert first["ci95"][0] <= first["diff"] <= first["ci95"][1]
    assert first["ci95"][1] < 0 and first["verdict"] == "worse than"
    assert "different images" in out[1]["error"]
    assert "no per-image" in out[2]["error"]


def _row(name: str, **kw) -> dict:
    row = {"name": name, "resolution": 224, "budget": 0.536, "errors": [],
           "status": dict.fromkeys(("analyze", "compress", "eval", "export", "verify"), "pass")}
    row.update(kw)
    return row


def test_missing_cells_fill_only_missing_methods() -> None:
    a = np.array([1, 0, 1, 1] * 50, bool)
    b = np.array([1, 1, 1, 0] * 50, bool)
    failed = {"model": "m", "method": "hybrid-0.536-int8", "status": "failed"}
    old = {"cells": [_cell("original", b), _cell("int8-ptq", b), failed,
                     dict(_cell("original", b), model="other")]}
    now = {"cells": [_cell("hybrid-0.536-int8", a), _cell("int8-ptq", a)]}
    got = missing_cells(now, old, "old.json")
    # only the missing method of this model, with per-image data, named by its source
    assert [(c["method"], c["model"], c["source"]) for c in got] == [("original", "m",
                                                                      "old.json")]
    pairs = paired({"cells": now["cells"] + got}, [("hybrid-0.536-int8", "original"),
                                                  ("hybrid-0.536-int8", "int8-ptq")])
    assert pairs[0]["diff"] == pytest.approx(a.mean() - b.mean())
    assert pairs[1]["diff"] == 0.0  # int8-ptq of this run, not the earlier one


def test_markdown_rows_and_splice(tmp_path: Path) -> None:
    res = {"command": "python -m bench.generality", "finished": "t", "git": {"commit": "abc"},
           "settings": {"calib": 32, "eval": 64},
           "rows": [_row("Net", layers_converted=3, layers_planned=5, muls_before=2e6,
                         muls_after=1e6, muls_saved=0.5, pointwise_mul_share=0.8,
                         adds_before=2e6, adds_after=2.5e6, verify_max_rel_diff=2.4e-4),
                    _row("Res", budget=0.99, errors=["compress: exit 2: unreachable"],
                         status={"analyze": "pass", "compress": "fail", "eval": "not run",
                                 "export": "not run", "verify": "not run"})]}
    md = markdown(res)
    assert ("| Net | 224 | ✓ | ✓ | ✓ | ✓ | ✓ (2.4e-04) | 80% | 3 / 5 | 2.0M → 1.0M (50.0%) "
            "| 1.250× | – |") in md
    assert "| Res | 224 | ✓ | ✗ | – | – | – | – | – | – at budget 0.99 | – | – |" in md
    assert "unreachable" in md
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# B\n\nkeep me\n")
    splice(bench, md)
    splice(bench, md.replace("Net", "Net2"))  # replaced in place, not appended twice
    text = bench.read_text()
    assert text.startswith("# B\n\nkeep me\n") and text.count(START) == 1
    assert "| Net2 |" in text and "| Net |" not in text and text.rstrip().endswith(END)


def test_real_top1_takes_the_newest_file_with_both_cells(tmp_path: Path) -> None:
    def write(name: str, before: float | None) -> None:
        cells = [{"model": "efficientnet-lite0", "method": "original", "top1": before},
                 {"model": "efficientnet-lite0", "method": "hybrid-0.536", "top1": 0.8}]
        (tmp_path / name).write_text(json.dumps({"cells": cells, "models": []}))

    write("20260101T000000Z-lite0.json", 0.81)
    write("20260102T000000Z-lite0.json", None)  # newer but incomplete: skipped
    got = real_top1(tmp_path, "EfficientNet-Lite0")
    assert got["before"] == 0.81 and got["results"].startswith("20260101")
    assert real_top1(tmp_path, "ResNet-50") is None


def test_finetune_cmd_render_rows_and_shipped_step() -> None:
    from bench.finetune_cmd_curve import render

    curve = {"steps": [0, 100, 150], "held_kl": [0.01, 0.005, 0.02],
             "held_agreement": [0.9, 0.95, 0.9], "held_top1": [0.8, 0.81, 0.79]}
    res = {"command": "python -m bench.finetune_cmd_curve --tag t", "threads": "1",
           "compress": {"cmd": "hfbconvert compress m", "wall_s": 3.0},
           "finetune": {"cmd": "hfbconvert finetune a", "wall_s": 9.0, "steps_run": 150,
                        "train_images": 900, "held_images": 100, "best_step": 100,
                        "curve": curve},
           "test_compare": {"cmd": "hfbconvert eval --compare a b",
                            "a": {"top1": 0.8}, "b": {"top1": 0.81},
                            "difference": {"top1": 0.01, "ci95": [-0.002, 0.022],
                                           "verdict": "within noise (±1.20 points)"}},
           "original_test": {"top1": 0.82, "top1_ci95": [0.81, 0.83]}}
    md = render(res, "finetune-cmd-t.json")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 100", "| 150"]
    assert "| 100 | 0.0050 | 95.00 | 81.00 | — |" in rows  # a file without held CE
    assert "the state after 100 steps (lowest held KL, `--stop-on kl`)" in md
    res["finetune"].update(stop_on="loss", curve=dict(curve, held_ce=[0.5, 0.4, 0.45]))
    md = render(res, "finetune-cmd-t.json")
    assert "| 100 | 0.0050 | 95.00 | 81.00 | 0.4000 |" in md
    assert "(lowest held KL + label weight × CE, `--stop-on loss`)" in md
    assert "+1.00 [-0.20, +2.20]" in md


def test_ddp_wall_render_ratios_and_imagenet_arithmetic() -> None:
    from bench.ddp_wall import render

    rows = [{"mode": "1 process, 1 thread", "wall_s": 80.0, "finetune_s": 50.0, "last_loss": 1.0},
            {"mode": "1 process, 2 threads", "wall_s": 50.0, "finetune_s": 25.0,
             "last_loss": 1.001},
            {"mode": "2 processes (gloo), 1 thread each", "wall_s": 60.0, "finetune_s": 30.0,
             "last_loss": 0.998}]
    md = render({"command": "python -m bench.ddp_wall", "steps": 40, "batch": 32,
                 "calib_size": 256, "rows": rows})
    assert "| 1 process, 2 threads | 50.0 | 25.0 | 0.50 | 1.001 |" in md
    assert "at most 0.20% of the 1-process loss" in md
    # 1,281,167 / 32 -> 40,037 steps at 25 s / 40 steps = 0.625 s: 6.95 h
    assert "40,037 steps, 7.0 h" in md and "0.62 s per step" in md
