"""bench/lite0.py's paired file: top-1, agreement and KL intervals from per-image records
(old records without the fidelity fields included), cells borrowed from an earlier
results file only when model, images and settings match, and the options around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import lite0
from hfbconvert.metrics import (
    encode_bits,
    encode_classes,
    encode_floats,
    paired_difference_interval,
)

N = 200
SHA = "a" * 64


def _cell(method: str, correct: np.ndarray, pred: np.ndarray, *, agree=None, kl=None,
          sha: str = SHA) -> dict:
    p = {"n": correct.size, "images_sha256": sha, "correct_hex": encode_bits(correct),
         "pred_b64": encode_classes(pred)}
    if agree is not None:
        p["agree_hex"] = encode_bits(agree)
    if kl is not None:
        p["kl_b64"] = encode_floats(kl)
    return {"model": "efficientnet-lite0", "method": method, "status": "ok",
            "top1": float(correct.mean()), "per_image": p}


def _results(cells: list[dict], eval_size=None, split="eval") -> dict:
    return {"models": [{"key": "efficientnet-lite0", "model": "/x/efficientnet-lite0-579.pth",
                        "eval_data": "/s/val", "eval_size": eval_size}],
            "settings": {"split": split}, "cells": cells}


@pytest.fixture()
def world() -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    orig = labels.copy()
    orig[rng.choice(N, 40, replace=False)] = 10  # the original misses 40 images
    hyb = orig.copy()
    hyb[rng.choice(N, 12, replace=False)] = 11  # the hybrid changes 12 predictions
    q = orig.copy()
    q[rng.choice(N, 6, replace=False)] = 11
    kl_h, kl_q = rng.gamma(0.5, 0.02, N), rng.gamma(0.5, 0.01, N)
    return {"labels": labels, "orig": orig, "hyb": hyb, "q": q, "kl_h": kl_h, "kl_q": kl_q,
            "o": _cell("original", orig == labels, orig),
            "h_old": _cell("hybrid-0.536", hyb == labels, hyb),  # before the fidelity fields
            "h": _cell("hybrid-0.536", hyb == labels, hyb, agree=hyb == orig, kl=kl_h),
            "qi": _cell("hybrid-0.536-int8", q == labels, q, agree=q == orig, kl=kl_q)}


def test_agreement_and_kl_pairs_from_stored_and_derived_records(world) -> None:
    w = world
    out = lite0.paired(_results([w["o"], w["h_old"], w["qi"]]),
                       [("hybrid-0.536", "original"), ("hybrid-0.536-int8", "hybrid-0.536")])
    first, second = out
    assert first["agreement"]["mean"] == pytest.approx(1 - 12 / N)  # from the predictions
    assert first["agreement"]["source"] == "from the predictions"
    assert "no per-image KL" in first["kl"]["error"]  # an old record: no KL, no pretence
    w["h_old"].update(kl=0.01, kl_ci95=[0.008, 0.012])  # but eval's own interval serves
    (again,) = lite0.paired(_results([w["o"], w["h_old"]]), [("hybrid-0.536", "original")])
    assert again["kl"]["mean"] == 0.01 and "eval" in again["kl"]["source"]
    ag = second["agreement"]
    d, (lo, hi) = paired_difference_interval(w["q"] == w["orig"], w["hyb"] == w["orig"])
    assert ag["diff"] == pytest.approx(d) and ag["ci95"] == [lo, hi]
    assert ag["source"] == ["from the predictions", "stored"]
    assert "no per-image KL in a cell" == second["kl"]["error"]


def test_kl_pair_is_the_paired_interval_of_the_stored_values(world) -> None:
    w = world
    (q,) = lite0.paired(_results([w["o"], w["h"], w["qi"]]),
                        [("hybrid-0.536-int8", "hybrid-0.536")])
    kl_q = np.frombuffer(np.asarray(w["kl_q"], "<f4").tobytes(), "<f4").astype(float)
    kl_h = np.frombuffer(np.asarray(w["kl_h"], "<f4").tobytes(), "<f4").astype(float)
    d, (lo, hi) = paired_difference_interval(kl_q, kl_h)
    assert q["kl"]["diff"] == pytest.approx(d) and q["kl"]["ci95"] == [lo, hi]
    assert q["kl"]["verdict"] in ("higher", "lower") or "nats" in q["kl"]["verdict"]
    assert q["agreement"]["source"] == ["stored"]
    line = "\n".join(lite0.describe(q))
    assert "kl: hybrid-0.536-int8" in line and "nats [" in line and "top-1 " in line


def test_borrow_takes_only_missing_cells_and_checks_the_images(world) -> None:
    w = world
    new = _results([w["o"], w["qi"]])
    old = _results([w["o"], w["h_old"], _cell("hybrid-0.536-int8", w["q"] == w["labels"],
                                                w["q"])])
    merged, taken = lite0.borrow(new, old, "old.json")
    assert taken == ["hybrid-0.536"]
    by = {c["method"]: c for c in merged["cells"]}
    assert by["hybrid-0.536"]["source"] == "old.json"
    assert "source" not in by["hybrid-0.536-int8"]  # this run's own cell wins
    pairs = lite0.paired(merged)
    assert all("error" not in q for q in pairs if "int8-ptq" not in (q["a"], q["b"]))


@pytest.mark.parametrize("change, needle", [
    (lambda r: r["models"][0].update(eval_size=500), "eval_size"),
    (lambda r: r["models"][0].update(model="/y/other.pth"), "model"),
    (lambda r: r["settings"].update(split="tune"), "split"),
    (lambda r: r["cells"][1]["per_image"].update(images_sha256="b" * 64), "images_sha256"),
])
def test_borrow_refuses_other_settings_or_images(world, change, needle) -> None:
    w = world
    old = _results([dict(w["o"], per_image=dict(w["o"]["per_image"])),
                    dict(w["h"], per_image=dict(w["h"]["per_image"]))])
    change(old)
    with pytest.raises(lite0.PairingError, match=needle):
        lite0.borrow(_results([w["o"], w["qi"]]), old, "old.json")


def test_borrow_refuses_an_original_that_predicts_otherwise(world) -> None:
    w = world
    other = w["orig"].copy()
    other[:3] = 12
    old = _results([_cell("original", other == w["labels"], other), w["h"]])
    with pytest.raises(lite0.PairingError, match="differ on 3 images"):
        lite0.borrow(_results([w["o"], w["qi"]]), old, "old.json")


def test_pairs_of_writes_the_paired_file_and_refuses_to_overwrite(world, tmp_path: Path,
                                                                  capsys) -> None:
    w = world
    new, old = tmp_path / "2-lite0.json", tmp_path / "1-lite0.json"
    new.write_text(json.dumps(_results([w["o"], w["qi"]])))
    old.write_text(json.dumps(_results([w["o"], w["h"]])))
    assert lite0.main(["--pairs-of", str(new), "--pair-with", str(old)]) == 0
    doc = json.loads((tmp_path / "2-lite0-paired.json").read_text())
    assert doc["pair_with"] == {"results": "1-lite0.json", "methods": ["hybrid-0.536"]}
    assert doc["cells_from"] == {"hybrid-0.536": "1-lite0.json"}
    assert [q["a"] for q in doc["pairs"] if "error" not in q] == [
        "hybrid-0.536", "hybrid-0.536-int8"]  # the int8 PTQ cell was in neither file
    assert lite0.main(["--pairs-of", str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; --force" in err[0]
    bad = tmp_path / "0-lite0.json"
    bad.write_text(json.dumps(_results([w["o"], w["h"]], eval_size=100)))
    assert lite0.main(["--pairs-of", str(new), "--pair-with", str(bad), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0-lite0.json: eval_size" in err[0]


def test_methods_subset_and_refusals_before_any_run(tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    spec = lite0.matrix("/w.pth", 10, "auto", None, ["hybrid-0.536-int8"])
    assert spec["methods"] == ["original", "hybrid-0.536-int8"]
    assert lite0.main(["--methods", "hybrid-9"]) == 2
    assert "unknown hybrid-9" in capsys.readouterr().err
    weights = tmp_path / "efficientnet-lite0-579.pth"
    weights.write_bytes(b"x")
    old = tmp_path / "1-lite0.json"
    earlier = _results([], eval_size=100)
    earlier["models"][0]["eval_data"] = spec["models"][0]["eval_data"]
    old.write_text(json.dumps(earlier))
    monkeypatch.setattr(lite0, "run_with_pairs", lambda *a, **k: pytest.fail("ran"))
    assert lite0.main(["--weights", str(weights), "--pair-with", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval_size" in err[0]


def test_paired_block_prints_every_pair_with_its_interval_or_why_not(world, tmp_path) -> None:
    """bench/report.py's generated text of a paired file: each comparison's interval
    and verdict, fidelity where stored, the borrowed cells, and the latest file per suite."""
    from bench import report

    w = world
    res = tmp_path / "20260102T000000Z-lite0.json"
    res.write_text(json.dumps(_results([w["o"], w["qi"]])))
    old = tmp_path / "20260101T000000Z-lite0.json"
    old.write_text(json.dumps(_results([w["o"], w["h"]])))
    assert lite0.main(["--pairs-of", str(res), "--pair-with", str(old)]) == 0
    (tmp_path / "20251231T000000Z-lite0-paired.json").write_text("{}")  # older: ignored
    latest = report.latest_paired(tmp_path)
    assert latest == {"lite0": tmp_path / "20260102T000000Z-lite0-paired.json"}
    text = report.paired_block(latest["lite0"], tmp_path)
    lines = [ln for ln in text.splitlines() if ln.startswith("- ")]
    assert len(lines) == len(lite0.PAIRS)
    for ln in lines:
        assert "not compared" in ln or ("] , p" not in ln and "], p = " in ln)
    ok = next(ln for ln in lines if ln.startswith("- `hybrid-0.536-int8` − `original`"))
    assert "within noise" in ok or ": better than" in ok or ": worse than" in ok
    assert "KL(original ‖ model) " in ok and " nats [" in ok
    assert "Cells taken from `20260101T000000Z-lite0.json`" in text
    assert "hybrid-0.536" in text.split("Cells taken from")[1].splitlines()[0]
