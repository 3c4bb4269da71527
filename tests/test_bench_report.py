"""Issue 20's evidence rules: the tuning split stays out of calibration, generated
sections equal what bench/report.py writes from the committed results, words follow the
intervals, seeds are scheduled and summarized, the int8 plots show every cell."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench import report, run
from bench.cases import METHODS, SUITES, ModelCase
from bench.splits import CONCENTRATED, calib_splits, image_names, list_sha256, tune_names
from hfbconvert.calib.readers import _list_folder
from hfbconvert.metrics import encode_bits

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HFB_SHARED", REPO / ".." / "shared"))
IMAGENET_CALIB = SHARED / "data" / "imagenet" / "calib"


def _tree(root: Path, classes: int = 6, per: int = 5, nette: int = 8) -> Path:
    for c in range(classes):
        d = root / f"n0{c:07d}"
        d.mkdir(parents=True)
        for i in range(per):
            (d / f"img_{i}.JPEG").write_bytes(b"x")
    for i in range(nette):  # a few-class block that must never be drawn into the split
        (root / "n00000000" / f"nette_n00000000_{i}.JPEG").write_bytes(b"x")
    (root / "synset_words.txt").write_text(
        "".join(f"n0{c:07d} class {c}\n" for c in range(classes)))
    return root


def _real_files(folder: Path) -> set[str]:
    files, _, _ = _list_folder(folder, None, None)
    return {os.path.realpath(f) for f in files}


def test_tuning_split_is_fixed_disjoint_and_spread(tmp_path: Path) -> None:
    root = _tree(tmp_path / "calib")
    names = image_names(root)
    assert len(names) == 6 * 5 + 8
    tune = tune_names(names, 7)
    assert tune == tune_names(list(reversed(names)), 7)  # the names decide, not their order
    assert not any(n.rsplit("/", 1)[-1].startswith(CONCENTRATED) for n in tune)
    cal, tun = calib_splits(root, 7, base=tmp_path / "splits")
    assert list(tun.names) == tune and tun.record()["list_sha256"] == list_sha256(tune)
    assert set(cal.names).isdisjoint(tun.names) and set(cal.names) | set(tun.names) == set(names)
    # what the readers actually list from the two folders: disjoint real files, same labels
    c_files, t_files = _real_files(cal.path), _real_files(tun.path)
    assert c_files.isdisjoint(t_files) and len(c_files | t_files) == len(names)
    t_list, t_labels, _ = _list_folder(tun.path, None, None)
    full, full_labels, _ = _list_folder(root, None, None)
    label_of = {os.path.realpath(f): lab for f, lab in zip(full, full_labels, strict=True)}
    assert [label_of[os.path.realpath(f)] for f in t_list] == t_labels
    # a second call reuses the folders; a different size makes different ones
    assert calib_splits(root, 7, base=tmp_path / "splits")[1].path == tun.path
    assert calib_splits(root, 8, base=tmp_path / "splits")[1].path != tun.path


@pytest.mark.skipif(not IMAGENET_CALIB.is_dir(), reason="HFB_SHARED ImageNet calib absent")
def test_calibration_never_sees_the_tuning_images(tmp_path: Path, monkeypatch) -> None:
    """The folders bench.run hands to `compress --calib` and the int8 PTQ never hold a
    tuning image; `--split tune` evaluates exactly those 300 images, of 300 classes."""
    monkeypatch.setenv("HFB_CACHE", str(tmp_path))
    case = ModelCase("m", "m", "x.pt", str(IMAGENET_CALIB), "val", tune_size=300)
    calib, ev, rec = run.model_splits(case, str(IMAGENET_CALIB), "val", "tune")
    seen, tuning = _real_files(Path(calib)), _real_files(Path(ev))
    assert len(tuning) == 300 and seen.isdisjoint(tuning)
    assert len(seen) + len(tuning) == len(image_names(IMAGENET_CALIB))
    assert len({Path(f).parent.name for f in tuning}) == 300
    assert rec["tuning"]["n"] == 300 and rec["calibration"]["n"] == len(seen)
    calib2, ev2, _ = run.model_splits(case, str(IMAGENET_CALIB), "val", "eval")
    assert calib2 == calib and ev2 == "val"  # eval split: calibration still without them


def test_tune_split_needs_a_calibration_folder(tmp_path: Path) -> None:
    npz = tmp_path / "c.npz"
    npz.write_bytes(b"")
    case = ModelCase("m", "m", "x.pt", str(npz), "val")
    assert run.model_splits(case, str(npz), "val", "eval")[:2] == (str(npz), "val")
    with pytest.raises(ValueError, match="no tuning split"):
        run.model_splits(case, str(npz), "val", "tune")


def test_seeds_are_scheduled_after_the_seed_independent_cells() -> None:
    suite = SUITES["seeds"]
    case = suite.model_cases()[0]
    assert case.steps == "auto" and suite.seeds == (0, 1, 2)
    methods = {case.key: [METHODS[k] for k in suite.methods[case.key]]}
    order = [(m.key, s) for _, m, s in run.schedule([case], methods, suite.seeds)]
    assert order[:2] == [("original", 0), ("int8-ptq", 0)]
    assert order[2:] == [(m, s) for s in (0, 1, 2) for m in ("hybrid-0.536", "hybrid-0.536-int8")]


# ------------------------------------------------------------------------ wording


def _cell(method: str, bits: np.ndarray, family: str = "baseline", seed: int | None = None,
          kind: str = "compress", sha: str = "same") -> dict:
    c = {"model": "m", "method": method, "family": family, "kind": kind, "status": "ok",
         "top1": float(bits.mean()), "n_eval": bits.size, "muls": 10e6, "adds": 10e6,
         "per_image": {"n": bits.size, "images_sha256": sha,
                       "correct_hex": encode_bits(bits.astype(bool))}}
    if seed is not None:
        c["seed"] = seed
    return c


def test_words_follow_the_paired_interval() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random(2000) < 0.7
    worse = ref.copy()
    worse[np.flatnonzero(ref)[:100]] = False  # 5 points lost, every change one way
    same = ref.copy()  # 10 images lost, 10 others won: a difference of zero
    same[np.flatnonzero(ref)[:10]] = False
    same[np.flatnonzero(~ref)[:10]] = True
    r = _cell("original", ref, kind="original")
    d = report.diff(_cell("w", worse), r)
    assert d["paired"] and d["hi"] < 0 and report.words(d) == "worse"
    d2 = report.diff(_cell("s", same), r)
    assert d2["lo"] < 0 < d2["hi"] and report.words(d2).startswith("within noise (±")
    assert report.fmt_diff(d, True).startswith("-5.00 [") and "p = " in report.fmt_diff(d, True)
    # different images: never paired; the unpaired interval is marked and wider
    d3 = report.diff(_cell("w", worse, sha="other"), r)
    assert not d3["paired"] and report.fmt_diff(d3).endswith("ᵘ")
    assert d3["hi"] - d3["lo"] > d["hi"] - d["lo"]


def _seeds_results() -> dict:
    rng = np.random.default_rng(1)
    ref = rng.random(1000) < 0.7
    cells = [_cell("original", ref, kind="original"),
             _cell("int8-ptq", ref & (rng.random(1000) < 0.97), kind="int8")]
    for s in (0, 1, 2):
        cells.append(_cell("hybrid-0.536", ref & (rng.random(1000) < 0.98), "hybrid", s))
        cells.append(_cell("hybrid-0.536-int8", ref & (rng.random(1000) < 0.99),
                           "hybrid-int8", s))
    return {"suite": "seeds", "models": [{"key": "m", "title": "M", "steps": "auto"}],
            "settings": {"seeds": [0, 1, 2]}, "cells": cells,
            "methods": {"hybrid-0.536-int8": {"args": ["--activation-bits", "8"]},
                        "hybrid-0.536": {"args": []}}}


def test_seeds_table_reports_every_seed_and_the_spread() -> None:
    res = _seeds_results()
    text = "\n".join(report.seeds_table(res, "m"))
    for s in (0, 1, 2):
        assert f"| `hybrid-0.536-int8` | {s} |" in text
    over = [ln for ln in text.splitlines() if ln.startswith("| `hybrid-0.536-int8` | 0, 1, 2 |")]
    assert len(over) == 1 and " ± " in over[0] and ".." in over[0]
    assert "below PTQ" in over[0] or "beats PTQ" in over[0] or "within noise" in over[0]
    # the standard table keeps one row per method: the first seed's
    assert report._cells(res, "m")["hybrid-0.536"]["seed"] == 0


def test_a_later_run_of_missing_seeds_completes_the_earlier_file() -> None:
    """Seed 2 run alone (``--seeds 2``) merges into the file that ran seeds 0 and 1 and
    skipped 2: every seed in the table, the newest file's cells win, and a file measured
    another way (other steps) never contributes."""
    full = _seeds_results()
    old = {**full, "_path": "old.json", "cells": [
        {**c, "status": "skipped"} if c.get("seed") == 2 else c for c in full["cells"]]}
    new = {**full, "_path": "new.json", "settings": {"seeds": [2]},
           "cells": [c for c in full["cells"] if c.get("seed") in (None, 2)]}
    merged = report.merge_results([old, new])
    assert merged["settings"]["seeds"] == [0, 1, 2] and merged["complete"]
    assert len(merged["cells"]) == len(full["cells"])
    assert all(c["status"] == "ok" for c in merged["cells"])
    ref = next(c for c in merged["cells"] if c["method"] == "original")
    assert ref is new["cells"][0]  # the newest file's reference
    src = {s["path"]: s["cells"] for s in merged["_sources"]}
    assert ("m", "hybrid-0.536", 2) in src["new.json"]
    assert ("m", "hybrid-0.536", 0) in src["old.json"] and ("m", "original", None) not in \
        src["old.json"]
    text = "\n".join(report.seeds_table(merged, "m"))
    assert len([ln for ln in text.splitlines()
                if ln.startswith("| `hybrid-0.536-int8` | 0, 1, 2 |")]) == 1
    other = {**old, "models": [{"key": "m", "title": "M", "steps": 0}]}
    alone = report.merge_results([other, new])
    assert alone is new and report.merge_results([new]) is new


def test_int8_plot_shows_every_cell(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    res = _seeds_results()
    seen: list = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: seen.append(fig))
    report.plot_model(res, "m", tmp_path / "p.png")
    (ax, _) = seen[0].axes
    labels = ax.get_legend_handles_labels()[1]
    assert "hybrid-0.536-int8 (3 seeds)" in labels and "original FP32" in labels
    assert any(lab.startswith("int8 PTQ") for lab in labels)
    n_points = sum(len(line.get_xdata()) for line in ax.get_lines())
    assert n_points == len(res["cells"])  # 1 + 1 + 3 curve/other-seed + 3 int8


# ------------------------------------------------------------------------ generated text


def test_compose_replaces_only_our_blocks() -> None:
    old = ("intro\n<!-- generated:header -->\nold head\n<!-- /generated -->\n"
           "<!-- generated:hardware -->\ntheirs\n<!-- /generated -->\n"
           "<!-- generated:suite-gone -->\nstale\n<!-- /generated -->\ntail\n")
    new = report.compose(old, {"header": "new head", "suite-x": "x"})
    assert "new head" in new and "old head" not in new and "stale" not in new
    assert "<!-- generated:hardware -->\ntheirs\n<!-- /generated -->" in new
    assert new.startswith("intro\n") and "tail\n" in new
    assert new.rstrip().endswith("<!-- generated:suite-x -->\nx\n<!-- /generated -->")
    assert report.compose(new, {"header": "new head", "suite-x": "x"}) == new


def test_committed_generated_sections_match_the_results_files() -> None:
    """BENCHMARKS.md and README.md: every generated block is what bench/report.py writes
    from the committed bench/results (rerun `python -m bench.report` after new results)."""
    results = REPO / "bench" / "results"
    latest = report.latest_per_suite(results)
    md = REPO / "BENCHMARKS.md"
    blocks, _ = report.render_blocks(latest, md, REPO / "bench" / "plots", results,
                                     write_plots=False)
    text = md.read_text()
    found = dict(report.MARK_BODY.findall(text))
    assert set(blocks) <= set(found), "blocks missing: rerun python -m bench.report"
    for name, body in blocks.items():
        assert found[name] == body.rstrip(), f"BENCHMARKS.md block {name} is stale"
    readme = REPO / "README.md"
    rtext = readme.read_text()
    rfound = dict(report.MARK_BODY.findall(rtext))
    for name, body in report.readme_blocks(latest, readme).items():
        assert rfound.get(name) == body.rstrip(), f"README.md block {name} is stale"


def test_tied_logits_count_once_and_the_same_way(tmp_path: Path) -> None:
    """A tied top-1 is the first index in both the cell's top-1 and its per-image bits;
    results files from before agree with their bits once loaded."""
    import json

    import torch

    from bench import RESULTS_SCHEMA
    from bench.measure import accuracy

    logits = np.array([[2.0, 2.0, 0.0]] * 50 + [[0.0, 2.0, 2.0]] * 50, dtype=np.float32)
    labels = np.array([0] * 50 + [2] * 50)
    acc = accuracy(logits, torch.from_numpy(labels), 0)
    assert acc["top1"] == 0.5  # first index wins: right on the first half only
    assert (logits.argmax(1) == labels).mean() == acc["top1"]  # as the per-image bits
    cell = _cell("int8-ptq", np.array([True] * 40 + [False] * 60), kind="int8")
    cell["top1"] = 0.45  # as an older run recorded it
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": RESULTS_SCHEMA, "suite": "x", "cells": [cell]}))
    loaded = report.load_results(path)["cells"][0]
    assert loaded["top1"] == 0.4 and loaded["top1_as_recorded"] == 0.45


def test_int8_order_rows_are_paired_against_the_default_order(tmp_path: Path) -> None:
    """A variant that loses 40 of 300 tune images against ``wsa`` reads worse, paired;
    the default row itself and files without per-image results get no such entry."""
    import json

    from bench.ablation_report import order_table

    rng = np.random.default_rng(2)
    base = rng.random(300) < 0.8
    lose = base.copy()
    lose[np.flatnonzero(base)[:40]] = False

    def row(v: str, bits: np.ndarray) -> dict:
        return {"variant": v, "top1": float(bits.mean()), "agreement": 0.9,
                "per_image": {"n": 300, "images_sha256": "t", "correct_hex": encode_bits(bits)}}

    f = tmp_path / "int8-order-x.json"
    f.write_text(json.dumps({"args": {"model": "m"}, "n_eval": 300, "split": "tune",
                             "top1_original": float(base.mean()),
                             "rows": [row("wsa", base), row("was", lose)]}))
    old = tmp_path / "int8-order-old.json"
    old.write_text(json.dumps({"args": {"model": "m"}, "n_eval": 300, "top1_original": 0.8,
                               "rows": [{"variant": "wsa", "top1": 0.8}]}))
    lines = order_table([f, old], tmp_path)
    was = next(ln for ln in lines if "`was`" in ln)
    wsa = next(ln for ln in lines if "`wsa`" in ln and "int8-order-x" in ln)
    cells = [c.strip() for c in was.split("|")]
    assert cells[9].startswith("-13.33 [") and cells[10] == "worse"
    assert [c.strip() for c in wsa.split("|")][9:11] == ["", ""]
    assert [c.strip() for c in next(ln for ln in lines if "int8-order-old" in ln).split("|")][
        9:11] == ["", ""]


def test_a_file_from_before_the_split_records_merges_only_on_the_same_images() -> None:
    """A Lite0 run of the int8 cells alone completes the older file (no split, no list
    recorded) only when the per-image fingerprints say the images are the same."""
    bits = encode_bits(np.ones(8, bool))

    def cell(method: str, sha: str) -> dict:
        return {"model": "m", "method": method, "status": "ok", "top1": 1.0,
                "per_image": {"n": 8, "images_sha256": sha, "correct_hex": bits}}

    case = {"key": "m", "model": "w.pth", "eval_data": "val", "steps": "auto"}
    old = {"_path": "old.json", "settings": {}, "models": [dict(case)],
           "methods": {}, "cells": [cell("original", "s"), cell("hybrid-0.536", "s")]}
    new = {"_path": "new.json", "settings": {"split": "eval"},
           "models": [dict(case, splits={"evaluation": {"list_sha256": "L"}})],
           "methods": {}, "cells": [cell("original", "s"), cell("hybrid-0.536-int8", "s")]}
    merged = report.merge_results([old, new])
    assert [c["method"] for c in merged["cells"]] == ["original", "hybrid-0.536",
                                                      "hybrid-0.536-int8"]
    other = {**new, "cells": [cell("original", "t"), cell("hybrid-0.536-int8", "t")]}
    assert report.merge_results([old, other]) is other
    tuned = {**new, "settings": {"split": "tune"}}
    assert report.merge_results([old, tuned]) is tuned


def test_agreement_bits_stored_or_from_the_predictions() -> None:
    """The seeds table's agreement interval: stored bits first, else the cell's
    predictions against the original's on the same images; nothing across other images."""
    from hfbconvert.metrics import encode_classes

    o = np.arange(40) % 7
    h = o.copy()
    h[:4] = 9
    orig = {"per_image": {"n": 40, "images_sha256": "s", "pred_b64": encode_classes(o)}}
    cell = {"agreement": 0.9, "per_image": {"n": 40, "images_sha256": "s",
                                            "pred_b64": encode_classes(h)}}
    assert report.agree_bits(cell, orig).mean() == pytest.approx(0.9)
    stored = dict(cell, per_image=dict(cell["per_image"], agree_hex=encode_bits(
        np.ones(40, bool))))
    assert report.agree_bits(stored, orig).all()
    other = dict(cell, per_image=dict(cell["per_image"], images_sha256="t"))
    assert report.agree_bits(other, orig) is None
    assert report._agree_ci(other, orig) == "90.00"  # the recorded figure, no interval
    lo, hi = (float(x) for x in report._agree_ci(cell, orig).split("[")[1][:-1].split(","))
    assert lo < 90.0 < hi


def test_suite_tables_carry_agreement_and_kl_intervals() -> None:
    """Every suite table's agreement and KL come with their interval when the cell stored
    per-image results; the recorded figure alone otherwise."""
    res = _seeds_results()
    hy = next(c for c in res["cells"] if c["method"] == "hybrid-0.536")
    hy["per_image"]["agree_hex"] = encode_bits(np.arange(1000) % 10 != 0)
    hy.update(agreement=0.9, kl=0.0412, kl_ci95=[0.0301, 0.0523])
    ptq = next(c for c in res["cells"] if c["method"] == "int8-ptq")
    ptq["agreement"] = 0.95
    lines, _ = report.model_table(res, "m")
    head = lines[0].split(" | ")
    row = {ln.split(" | ")[0]: ln.split(" | ") for ln in lines[2:]}
    a, k = head.index("agree % [95%]"), head.index("KL (nats) [95%]")
    assert row["| `hybrid-0.536`"][a].startswith("90.00 [")
    assert row["| `hybrid-0.536`"][k] == "0.0412 [0.0301, 0.0523]"
    assert row["| `int8-ptq`"][a] == "95.00" and row["| `int8-ptq`"][k] == "—"
    assert row["| `original`"][a] == "—"


def test_every_suite_the_report_names_has_its_make_target() -> None:
    """The report writes "`make bench-NAME` (= ...)" for a suite's own command: that
    target must exist (bench-int8 was cited before the Makefile had it)."""
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for name in SUITES:
        target = "bench" if name == "full" else f"bench-{name}"
        line = report._command_line({"command": f"python -m bench.run --suite {name}"})
        assert f"`make {target}`" in line
        assert f"\n{target}: $(STAMP)\n\t$(BIN)/python -m bench.run --suite {name}\n" in make


def test_a_run_of_another_model_completes_the_suite() -> None:
    """``--models v2`` after a run of v1: both models' tables, each from the file that
    ran it, v1 first; the newer file's model never takes cells from the older file."""
    old = _seeds_results()
    old = {**old, "_path": "old.json", "models": [{"key": "m", "title": "M", "steps": "auto"},
                                                  {"key": "n", "title": "N", "steps": 0}],
           "cells": old["cells"] + [dict(c, model="n") for c in old["cells"][:2]]}
    rng = np.random.default_rng(5)
    new = {"suite": "seeds", "_path": "new.json", "settings": {"seeds": [0]},
           "models": [{"key": "n", "title": "N", "steps": "auto"}],
           "methods": old["methods"],
           "cells": [dict(_cell("original", rng.random(300) < 0.7, kind="original"),
                          model="n")]}
    merged = report.merge_results([old, new])
    assert [m["key"] for m in merged["models"]] == ["m", "n"]
    assert merged["models"][1]["steps"] == "auto"  # n as the newer file ran it
    n_cells = [c for c in merged["cells"] if c["model"] == "n"]
    # n's int8-ptq from the old file was measured at other steps: not taken
    assert [c["method"] for c in n_cells] == ["original"] and n_cells[0] is new["cells"][0]
    assert len([c for c in merged["cells"] if c["model"] == "m"]) == len(old["cells"]) - 2
    lines, _ = report.model_table(merged, "m")
    assert any(ln.startswith("| `hybrid-0.536` |") for ln in lines)


def test_the_seeds_suite_borrows_a_cell_another_suite_measured_the_same_way() -> None:
    """Seeds 1 and 2 run alone; seed 0 of the same cell comes from the int8 suite's file
    (same case, same method arguments). A cell measured at other steps, a seed the suite
    does not declare and a method the suite does not run are never borrowed."""
    full = _seeds_results()
    seeds = {**full, "_path": "seeds.json", "started": "2", "settings": {"seeds": [1, 2]},
             "cells": [c for c in full["cells"] if c.get("seed") in (None, 1, 2)]}
    int8 = {**full, "suite": "int8", "_path": "int8.json", "started": "1",
            "settings": {"seeds": [0]},
            "cells": [c for c in full["cells"] if c.get("seed") in (None, 0)]
            + [_cell("hybrid-0.4", np.ones(1000, bool), seed=0),
               _cell("hybrid-0.536", np.ones(1000, bool), seed=5)]}
    other = {**int8, "_path": "other.json", "started": "0",
             "models": [{"key": "m", "title": "M", "steps": 0}]}
    by_suite = {"seeds": [seeds], "int8": [other, int8]}
    lent = report.borrowed("seeds", by_suite)
    merged = report.merge_results(lent + [seeds])
    keys = sorted((c["method"], c.get("seed", -1)) for c in merged["cells"])
    assert keys == sorted((c["method"], c.get("seed", -1)) for c in full["cells"])
    took = {s["path"]: s["cells"] for s in merged["_sources"]}
    assert sorted(k[1:] for k in took["int8.json"]) == [
        ("hybrid-0.536", 0), ("hybrid-0.536-int8", 0)]
    assert "other.json" not in took  # measured at other steps
    ref = next(c for c in merged["cells"] if c["method"] == "original")
    assert ref is seeds["cells"][0]  # the suite's own reference, never a borrowed one
    text = "\n".join(report.seeds_table(merged, "m"))
    assert "| `hybrid-0.536-int8` | 0, 1, 2 |" in text


def test_finetune_rows_say_which_state_compress_shipped(tmp_path: Path) -> None:
    """A row whose fine-tune was reverted says so (the fit, and where it stopped), one that
    shipped a check says which, and a file from before the checks says the last step."""
    import json

    from bench.ablation_report import finetune_table

    rows = [{"steps": 7000, "top1": 0.72, "reverted": "kept the fit",
             "held_kl": {"best_step": 0, "stopped_early_at": 75}},
            {"steps": 300, "top1": 0.73, "reverted": None,
             "held_kl": {"best_step": 150, "stopped_early_at": 225}},
            {"steps": 300, "top1": 0.73, "reverted": None,
             "held_kl": {"best_step": 300, "stopped_early_at": None}}]
    f = tmp_path / "finetune-new.json"
    f.write_text(json.dumps({"args": {"model": "m.pt"}, "n_eval": 100,
                             "top1_original": 0.73, "rows": rows}))
    old = tmp_path / "finetune-old.json"
    old.write_text(json.dumps({"args": {"model": "m.pt"}, "n_eval": 100, "top1_original": 0.73,
                               "rows": [{"steps": 4500, "top1": 0.72, "reverted": None},
                                        {"steps": 76, "top1": 0.72, "reverted": "kept"},
                                        {"steps": 100, "top1": 0.72, "reverted": None,
                                         "held_kl": {"before": 0.05, "after": 0.04}}]}))
    probe = tmp_path / "finetune-probe-x.json"  # another script's shape: not a row here
    probe.write_text(json.dumps({"args": {"model": "m"}, "variants": {}}))
    lines = [ln for ln in finetune_table([f, old, probe], tmp_path) if ln.startswith("| ")][1:]
    shipped = [[c.strip() for c in ln.split("|")][5] for ln in lines if "---" not in ln]
    assert shipped == ["the fit: reverted at 75", "step 150 (stopped at 225)", "step 300",
                       "last step", "the fit: reverted at 76", "last step"]


def test_long_finetune_rows_get_their_held_curve(tmp_path: Path) -> None:
    """A row with at least CURVE_MIN_CHECKS held-apart checks gets one table row per check,
    with its figures; a short one gets none."""
    import json

    from bench.ablation_report import CURVE_MIN_CHECKS, curve_table

    n = CURVE_MIN_CHECKS
    long_curve = {"eval_steps": [250 * i for i in range(n)],
                  "held_kl": [0.05 - 0.001 * i for i in range(n)],
                  "held_agreement": [0.9 + 0.001 * i for i in range(n)], "best_step": 250 * (n - 1)}
    short = {"eval_steps": [0, 25], "held_kl": [0.05, 0.04], "held_agreement": [0.9, 0.91]}
    f = tmp_path / "finetune-long.json"
    f.write_text(json.dumps({"args": {"model": "m.pt", "lr": 1e-4, "eval_every": 250},
                             "n_eval": 100, "top1_original": 0.73,
                             "rows": [{"steps": 250 * n, "top1": 0.72, "held_curve": long_curve,
                                       "held_kl": {"best_step": 250 * (n - 1)}},
                                      {"steps": 50, "top1": 0.7, "held_curve": short}]}))
    lines = curve_table([f], tmp_path)
    rows = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == n and f"step {250 * (n - 1)}" in "\n".join(lines)
    assert rows[0].split("|")[1:4] == [" 0 ", " 0.0500 ", " 90.00 "]
    assert rows[-1].split("|")[2].strip() == f"{0.05 - 0.001 * (n - 1):.4f}"
    assert curve_table([tmp_path / "missing.json"], tmp_path) == []


def test_milp_scale_rows_show_nodes_and_the_change_per_gap(tmp_path: Path) -> None:
    import json

    from bench.ablation_report import milp_scale_table

    row = {"budget": 0.5, "raw": {"nodes": 5000, "objective": 0.0189},
           "scaled@1e-4": {"nodes": 300, "objective": 0.0188, "same_plan_as_raw": False,
                           "vs_raw": -0.0053},
           "scaled@1e-6": {"nodes": 900, "objective": 0.0189, "same_plan_as_raw": True,
                           "vs_raw": 0.0}}
    f = tmp_path / "milp-scale-x.json"
    f.write_text(json.dumps({"images": 256, "node_limit": 5000, "models": {"v2": [row]}}))
    lines = milp_scale_table([f], tmp_path)
    assert "| model | MUL budget | raw objective | raw nodes | scaled, gap 1e-4 | " \
           "scaled, gap 1e-6 |" in lines  # today's gap first
    assert "| v2 | 0.5 | 0.0189 | 5000 | 300 nodes, -0.5300% | 900 nodes, = |" in lines


def test_probe_rows_show_the_held_kl_curve_and_the_loss_trend(tmp_path: Path) -> None:
    """One row per variant: the held KL at every check in order, and the mean training
    loss of the first and last quarter of the steps (a rising loss reads as rising)."""
    import json

    from bench.ablation_report import probe_table

    f = tmp_path / "finetune-probe-v2.json"
    f.write_text(json.dumps({"args": {"model": "builtin:mobilenet_v2"}, "variants": {
        "all@1e-4": {"eval_steps": [0, 4, 8], "held_kl": [0.028, 0.047, 0.116],
                     "loss": [0.02, 0.04, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4]},
        "all@1e-5": {"eval_steps": [0, 4, 8], "held_kl": [0.028, 0.0266, 0.0271],
                     "loss": [0.04, 0.04, 0.03, 0.03, 0.03, 0.03, 0.02, 0.02]}}}))
    rows = [[c.strip() for c in ln.split("|")] for ln in probe_table([f], tmp_path)
            if ln.startswith("| `finetune-probe")]
    assert [r[3] for r in rows] == ["all@1e-4", "all@1e-5"]
    assert rows[0][5] == "0.0280 → 0.0470 → 0.1160"
    assert rows[0][6] == "0.0300 → 0.3500" and rows[1][6] == "0.0400 → 0.0200"
    assert probe_table([tmp_path / "missing.json"], tmp_path) == []


def test_shipped_models_of_two_stage_runs_are_compared_paired(tmp_path: Path) -> None:
    """Two int8_stages files of one model, seed and image list whose settings differ give
    one row: the last rows' top-1, agreement and KL differences, the changed settings
    first; files of another seed, or with the same settings, give none."""
    import json

    from bench.ablation_report import final_rows_table
    from hfbconvert.metrics import encode_floats

    n = 8
    truth = np.ones(n, dtype=bool)

    def write(name: str, sets: list[str], seed: int, correct: list[int], kl: list[float],
              then: str | None = None):
        c = np.array(correct, dtype=bool)
        pi = {"n": n, "images_sha256": "abc", "correct_hex": encode_bits(c),
              "agree_hex": encode_bits(c == truth),
              "kl_b64": encode_floats(np.array(kl, dtype=np.float32)), "pred_b64": ""}
        p = tmp_path / f"int8-stages-{name}.json"
        p.write_text(json.dumps({"args": {"model": "m", "seed": seed, "set": sets,
                                          "then_int8_finetune": then},
                                 "n_eval": n, "rows": [{"stage": "mean_shift"},
                                                       {"stage": name, "per_image": pi}]}))
        return p

    base = write("int8_finetune", [], 0, [1] * 6 + [0, 0], [0.04] * n)
    noqat = write("activation_calibration", ["qat=false"], 0, [1] * 8, [0.03] * n)
    other_seed = write("x", ["qat=false"], 1, [1] * 8, [0.01] * n)
    lines = final_rows_table([base, noqat, other_seed], tmp_path)
    rows = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 1, lines
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[2] == "`qat=false` (`activation_calibration`) − defaults (`int8_finetune`)"
    assert cells[3] == "8" and cells[4].startswith("+25.00")
    assert cells[6].startswith("+25.00") and cells[7].startswith("-0.0100")
    assert final_rows_table([base, write("y", [], 0, [1] * 8, [0.0] * n)], tmp_path) == []
    # the same --set with a second int8 fine-tune is a different setting, named as such
    then = write("int8_finetune", ["qat=false"], 0, [1] * 8, [0.02] * n, then="bias")
    rows = [ln for ln in final_rows_table([noqat, then], tmp_path)
            if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 1
    assert "`qat=false` then int8 fine-tune of `bias` (`int8_finetune`)" in rows[0]


def test_act_sites_table_ranks_the_largest_drops(tmp_path: Path) -> None:
    """bench/int8_act_sites.py's file: the all-on and all-off rows, the sites with the
    largest KL drops first (at most ACT_SITES_SHOWN), and the count of sites whose
    interval is below zero; a file without sites gives nothing."""
    import json

    from bench.ablation_report import ACT_SITES_SHOWN, act_sites_table

    def kl(d: float, half: float = 0.001) -> dict:
        return {"d": d, "lo": d - half, "hi": d + half}

    sites = [{"site": f"s{i}.input_quant", "kl": 0.04 + i * 1e-4, "kl_ci95": [0.03, 0.05],
              "kl_vs_all_on": kl(-0.0001 * i)} for i in range(ACT_SITES_SHOWN + 3)]
    rows = [{"site": "all on", "kl": 0.04, "kl_ci95": [0.03, 0.05]},
            {"site": "all off", "kl": 0.028, "kl_ci95": [0.02, 0.03],
             "kl_vs_all_on": kl(-0.012, 0.005)}, *sites]
    p = tmp_path / "int8-act-sites-x.json"
    p.write_text(json.dumps({"rows": rows, "split": {"eval": {"name": "tune", "n": 300}}}))
    lines = act_sites_table([p], tmp_path)
    body = [ln for ln in lines if ln.startswith("| `int8")]
    assert "all on" in body[0] and "`all off`" in body[1] and "lower" in body[1]
    shown = [ln.split("`")[3] for ln in body[2:-1]]
    assert shown[0] == f"s{ACT_SITES_SHOWN + 2}.input_quant" and len(shown) == ACT_SITES_SHOWN
    # site i: d = -0.0001 i, half-width 0.001: sites 0-10 straddle zero, 11-14 lie below
    assert f"{ACT_SITES_SHOWN + 3} sites in all: {ACT_SITES_SHOWN + 3 - 11} with" in body[-1]
    p.write_text(json.dumps({"rows": rows[:2]}))
    assert act_sites_table([p], tmp_path) == []
