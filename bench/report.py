"""Results JSON -> BENCHMARKS.md sections (one per suite, from its latest results file;
the ablation from the ablation scripts' results files), the README's generated tables,
and plots (top-1 vs MULs / ADDs per model).

Only measured numbers are written, each difference with its 95% interval: paired over
images (bootstrap, McNemar's exact test) where both cells stored per-image results on
the same images, else an unpaired normal interval from the two top-1s (wider: it ignores
that the images are shared) marked ᵘ. Words follow the rule of hfbconvert.metrics.verdict:
"better"/"worse"/"beats" only where the interval excludes zero, else "within noise (±x)".

Generated text sits between ``<!-- generated:NAME -->`` and ``<!-- /generated -->``;
``write_benchmarks``/``write_readme`` replace only those blocks, so sections other tools
own (their own markers, or text outside any block) stay as they are. The paper's
reported point appears on the ImageNet MobileNetV1 0.5 plot as a reference marker, placed
relative to the measured original.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from hfbconvert.metrics import (
    Z95,
    bootstrap_mean_interval,
    decode_bits,
    decode_classes,
    discordant,
    mcnemar_exact,
    paired_difference_interval,
    verdict,
    wilson_interval,
)

from . import RESULTS_SCHEMA
from .cases import PAPER_POINT, REPO, SUITES, TABLE_ORDER

SECTION_ORDER = ["seeds", "int8", "full", "quick"]


# ------------------------------------------------------------------------ loading


def load_results(path: str | Path) -> dict:
    d = json.loads(Path(path).read_text())
    if d.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: not a bench results file (schema {d.get('schema')!r})")
    d["_path"] = str(path)
    for c in d.get("cells", []):
        _top1_from_bits(c)
    return d


def _top1_from_bits(cell: dict) -> None:
    """Make a cell's top-1 the mean of its stored per-image bits (what every paired
    interval uses). They differ only where logits tie: the int8 PTQ cells of results
    files before the fix in bench/measure.accuracy counted a tied top-1 by an unstable
    sort, the bits by argmax (the first index, as onnxruntime's ArgMax)."""
    p = cell.get("per_image") or {}
    if cell.get("kind") != "int8" or cell.get("top1") is None or not p.get("correct_hex") \
            or not p.get("n"):
        return  # only the harness's own onnxruntime cells counted top-1 separately
    t = float(decode_bits(p["correct_hex"], int(p["n"])).mean())
    if abs(t - cell["top1"]) > 1e-12:
        cell["top1_as_recorded"] = cell["top1"]
        cell["top1"] = t


def results_files(results_dir: str | Path) -> list[Path]:
    """Results files, oldest first (names start with a UTC timestamp)."""
    d = Path(results_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            load_results(p)
        except (ValueError, OSError):
            continue
        out.append(p)
    return out


def latest_per_suite(results_dir: str | Path) -> dict[str, dict]:
    """Each suite's results: its latest file, plus the cells of its earlier files that
    the latest lacks when they were measured the same way (see ``merge_results``), so a
    run of only the missing cells (``--seeds 2``) completes an earlier one."""
    by_suite: dict[str, list[dict]] = {}
    for p in results_files(results_dir):
        r = load_results(p)
        by_suite.setdefault(r["suite"], []).append(r)
    return {suite: merge_results(borrowed(suite, by_suite) + files)
            for suite, files in by_suite.items()}


def borrowed(suite: str, by_suite: dict[str, list[dict]]) -> list[dict]:
    """Other suites' files cut down to the cells ``suite`` lacks: a (model, method) that
    ``suite`` runs, at a seed it declares, which none of its files measured. They go
    before the suite's own files (oldest), so ``merge_results`` takes a cell from them
    only when it was measured the same way (case signature, method arguments) and no
    file of the suite has it: the seeds suite counts the int8 suite's seed-0 cell
    instead of spending 47 minutes on it again."""
    own = by_suite[suite]
    pairs = {(c["model"], c["method"]) for r in own for c in r.get("cells", [])}
    have = {_cell_key(c) for r in own for c in r.get("cells", [])
            if c.get("status") != "skipped"}
    seeds = set(SUITES[suite].seeds) if suite in SUITES else {
        int(x) for r in own for x in (r.get("settings", {}).get("seeds") or [0])}
    models = {m for m, _ in pairs}
    out = []
    for other, files in by_suite.items():
        if other == suite:
            continue
        for r in files:
            cells = [c for c in r.get("cells", [])
                     if (c["model"], c["method"]) in pairs and _cell_key(c) not in have
                     and c.get("status") != "skipped" and c.get("seed") in seeds]
            if cells:  # the run's time is the lent cells' time, not the whole run's
                out.append({**r, "cells": cells,
                            "duration_s": sum(c.get("cell_wall_s") or 0.0 for c in cells),
                            "models": [m for m in r.get("models", []) if m["key"] in models]})
    return sorted(out, key=lambda r: str(r.get("started") or ""))


def _cell_key(cell: dict) -> tuple:
    return cell["model"], cell["method"], cell.get("seed")


def _case_signature(res: dict, model: str) -> tuple:
    """What must match for two files' cells of ``model`` to share one table: weights,
    data, image counts, steps, split and the evaluation image list."""
    case = _case(res, model)
    ev = (case.get("splits") or {}).get("evaluation") or {}
    return (case.get("model"), case.get("calib"), case.get("eval_data"),
            case.get("calib_size"), case.get("eval_size"), case.get("steps"),
            case.get("int8_calib"), res.get("settings", {}).get("split"),
            ev.get("list_sha256"))


def _images_sha(res: dict, model: str) -> set[str]:
    return {str(c["per_image"].get("images_sha256")) for c in res.get("cells", [])
            if c.get("model") == model and (c.get("per_image") or {}).get("images_sha256")}


def same_case(old: dict, new: dict, model: str) -> bool:
    """Whether ``old``'s cells of ``model`` were measured as ``new``'s: the same case
    signature; or, for a file from before the split records (no split, no evaluation
    list), the same signature apart from those and the same per-image ``images_sha256``
    in both (the images themselves, fingerprinted, are what the split record names)."""
    a, b = _case_signature(old, model), _case_signature(new, model)
    if a == b:
        return True
    if a[-2] is not None or a[-1] is not None or a[:-2] != b[:-2] or b[-2] not in (None, "eval"):
        return False
    sa, sb = _images_sha(old, model), _images_sha(new, model)
    return len(sa) == 1 and sa == sb


def merge_results(files: list[dict]) -> dict:
    """One suite's files (oldest first) as one results dict: the newest file, with each
    cell (model, method, seed) it lacks, or only recorded as skipped, taken from the
    newest earlier file that measured it the same way (same case signature and method
    arguments). A model the newest file did not run at all (``--models v2`` after a run
    of the others) is taken as the newest earlier file that ran it measured it. Cells
    and models keep the order they first appeared in; ``_sources`` names every file that
    contributed cells (only when more than one did)."""
    newest = files[-1]
    # per model, the file whose case the merged table shows: the newest that ran it
    ref: dict[str, dict] = {}
    for res in files:
        for m in res.get("models", []):
            ref[m["key"]] = res
    chosen: dict[tuple, dict] = {}
    origin: dict[tuple, dict] = {}
    order: list[tuple] = []
    for res in files:
        for c in res.get("cells", []):
            if _cell_key(c) not in order:
                order.append(_cell_key(c))
    for res in reversed(files):  # newest first: a key is settled by the newest that fits
        for c in res.get("cells", []):
            k = _cell_key(c)
            base = ref.get(c["model"], newest)
            if res is not base:
                same = (same_case(res, base, c["model"])
                        and (res.get("methods", {}).get(c["method"], {}).get("args")
                             == base.get("methods", {}).get(c["method"], {}).get("args")))
                if not same or c.get("status") == "skipped":
                    continue
            have = chosen.get(k)
            if have is None or (have.get("status") == "skipped" and res is not base):
                chosen[k], origin[k] = c, res
    for k in order:  # keys no file measured: the newest skip record, else the oldest
        if k not in chosen:
            base = ref.get(k[0], newest)
            for res in reversed(files):
                c = next((x for x in res.get("cells", []) if _cell_key(x) == k), None)
                if c is not None and (res is base or same_case(res, base, k[0])):
                    chosen[k], origin[k] = c, res
                    break
    keys = [k for k in order if k in chosen]
    used = [r for r in files if any(origin[k] is r for k in keys)]
    if used == [newest]:
        return newest
    merged = dict(newest)
    merged["cells"] = [chosen[k] for k in keys]
    model_order = list(dict.fromkeys(m["key"] for r in files for m in r.get("models", [])))
    merged["models"] = [_case(ref[m], m) for m in model_order
                        if any(k[0] == m for k in keys)]
    merged["methods"] = {**{k: v for r in used for k, v in r.get("methods", {}).items()},
                         **newest.get("methods", {})}
    settings = dict(newest.get("settings", {}))
    seeds = sorted({c["seed"] for c in merged["cells"] if c.get("seed") is not None})
    if seeds:
        settings["seeds"] = seeds
    merged["settings"] = settings
    merged["complete"] = not any(c.get("status") == "skipped" for c in merged["cells"])
    merged["duration_s"] = sum(r.get("duration_s") or 0.0 for r in used)
    merged["_sources"] = [{"path": r.get("_path"), "command": r.get("command"),
                           "git": r.get("git", {}), "started": r.get("started"),
                           "cells": [k for k in keys if origin[k] is r]} for r in used]
    return merged


def _cell_label(k: tuple) -> str:
    return f"{k[0]}/{k[1]}" + (f" seed {k[2]}" if k[2] is not None else "")


def mixed_commits_note(res: dict) -> str:
    """A warning when a merged section's files ran different commits ('' otherwise)."""
    commits = {(s.get("git") or {}).get("commit") for s in res.get("_sources", [])}
    if len(commits) < 2:
        return ""
    return ("The merged files ran different commits: a difference between their cells "
            "mixes seed-to-seed variation with whatever the code changes in between did.")


def source_lines(res: dict, rel_dir: Path) -> list[str]:
    """One line per results file that a merged section's cells came from."""
    out = []
    for s in res.get("_sources", []):
        rel = os.path.relpath(s["path"], rel_dir) if s.get("path") else "?"
        g = s.get("git", {})
        out.append(f"`{rel}` (`{s.get('command')}`, commit `{(g.get('commit') or '?')[:10]}`"
                   f"{', uncommitted changes' if g.get('dirty') else ''}, {s.get('started')}):"
                   f" {', '.join(_cell_label(k) for k in s['cells'])}")
    return out


# ------------------------------------------------------------------------ formatting


def _num(v, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v / scale:.{digits}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _delta_pct(v, ref) -> str:
    if v is None or not ref:
        return "—"
    return f"{100 * (v - ref) / ref:+.1f}%"


def _lat(cell: dict, key: str) -> str:
    lat = (cell.get("latency") or {}).get(key)
    if not lat:
        return "—"
    ms = f"{lat['ms']:.3g}"
    return f"{ms} (×{lat['ratio']:.2f})" if lat.get("ratio") else ms


def _first_seed(res: dict) -> int:
    return int((res.get("settings", {}).get("seeds") or [0])[0])


def _cells(res: dict, model: str) -> dict[str, dict]:
    """The model's cells by method: seed-independent ones and the first seed's."""
    first = _first_seed(res)
    return {c["method"]: c for c in res["cells"]
            if c["model"] == model and c.get("seed", first) == first}


def _seed_cells(res: dict, model: str, method: str) -> list[dict]:
    """Every seed's cell of one compressed method, in seed order."""
    return sorted((c for c in res["cells"] if c["model"] == model and c["method"] == method),
                  key=lambda c: c.get("seed", 0))


# ------------------------------------------------------------------------ intervals


def _bits(cell: dict | None) -> tuple[np.ndarray, str] | None:
    p = (cell or {}).get("per_image") or {}
    if not p.get("correct_hex") or not p.get("n"):
        return None
    return decode_bits(p["correct_hex"], int(p["n"])), str(p.get("images_sha256"))


def diff(cell: dict | None, ref: dict | None, seed: int = 0) -> dict | None:
    """top-1 of ``cell`` minus ``ref`` with its 95% interval: paired (bootstrap over the
    images, McNemar's exact p) when both stored per-image results on the same images,
    else unpaired (normal, from both top-1s and image counts). None without both top-1s."""
    if not cell or not ref or cell.get("top1") is None or ref.get("top1") is None:
        return None
    a, b = _bits(cell), _bits(ref)
    if a is not None and b is not None and a[1] == b[1] and a[0].size == b[0].size:
        d, (lo, hi) = paired_difference_interval(a[0], b[0], seed=seed)
        only_a, only_b = discordant(a[0], b[0])
        return {"d": d, "lo": lo, "hi": hi, "paired": True, "n": int(a[0].size),
                "p": mcnemar_exact(only_a, only_b), "only_a": only_a, "only_b": only_b}
    n1, n0 = cell.get("n_eval"), ref.get("n_eval")
    if not n1 or not n0:
        return None
    return unpaired(cell["top1"], n1, ref["top1"], n0)


def unpaired(p1: float, n1: int, p0: float, n0: int) -> dict:
    """p1 - p0 with the normal 95% interval of two independent proportions (conservative
    for two models on the same images, whose outcomes are positively correlated)."""
    d = p1 - p0
    half = Z95 * math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    return {"d": d, "lo": d - half, "hi": d + half, "paired": False, "n": min(n1, n0)}


def fmt_diff(di: dict | None, p: bool = False) -> str:
    """'+0.31 [-0.85, +1.46]' in points; ᵘ marks an unpaired interval."""
    if di is None:
        return "—"
    out = f"{100 * di['d']:+.2f} [{100 * di['lo']:+.2f}, {100 * di['hi']:+.2f}]"
    if not di["paired"]:
        return out + "ᵘ"
    return out + (f", p = {di['p']:.2g}" if p else "")


def words(di: dict | None, better: str = "better", worse: str = "worse") -> str:
    """The wording rule (hfbconvert.metrics.verdict) applied to one difference."""
    if di is None:
        return "not measured"
    return verdict(di["d"], di["lo"], di["hi"], better=better, worse=worse)


def _top1_ci(cell: dict | None) -> str:
    """top-1 (%) with its 95% interval: the stored bootstrap one, else Wilson."""
    if not cell or cell.get("top1") is None:
        return "—"
    ci = cell.get("top1_ci95")
    if ci is None and cell.get("n_eval"):
        ci = wilson_interval(round(cell["top1"] * cell["n_eval"]), cell["n_eval"])
    if ci is None:
        return f"{100 * cell['top1']:.2f}"
    return f"{100 * cell['top1']:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


COLUMNS = ["method", "top-1 %", "Δ top-1 (pp) [95%]", "top-5 %", "agree % [95%]",
           "KL (nats) [95%]", "MULs (M)", "Δ MULs",
           "ADDs (M)", "Δ ADDs", "params (M)", "size, cost model (MB)", "ONNX (MB)",
           "energy (µJ)", "ORT b1 ms (× orig)", "ORT b32 ms (× orig)", "convert (s)",
           "convert peak RSS (MB)"]


def model_table(res: dict, model: str) -> tuple[list[str], list[str]]:
    """Markdown table lines and footnote lines (errors) of one model."""
    cells = _cells(res, model)
    orig = cells.get("original", {})
    o_top1 = orig.get("top1") if orig.get("status") == "ok" else None
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    order = [k for k in TABLE_ORDER if k in cells] + [k for k in cells if k not in TABLE_ORDER]
    for key in order:
        c = cells[key]
        label = f"`{key}`"
        if c.get("top1_as_recorded") is not None:
            notes.append(f"`{key}`: top-1 from its per-image results; the run recorded "
                         f"{_pct(c['top1_as_recorded'])} (tied logits counted by an unstable "
                         "sort, fixed since)")
        if c["status"] != "ok":
            label += f" ({c['status']}†)"
            for e in c.get("errors", []):
                notes.append(f"† `{key}` {c['status']}: {e}")
        if c["kind"] == "original":
            d_top1 = "0 (ref)" if c.get("top1") is not None else "—"
        else:
            d_top1 = fmt_diff(diff(c, orig)) if o_top1 is not None else "—"
        row = [
            label, _pct(c.get("top1")), d_top1, _pct(c.get("top5")),
            _agree_ci(c, orig) if c["kind"] != "original" else "—",
            _kl_ci(c) if c["kind"] != "original" else "—",
            _num(c.get("muls"), 1e6), _delta_pct(c.get("muls"), orig.get("muls"))
            if c["kind"] != "original" else "",
            _num(c.get("adds"), 1e6), _delta_pct(c.get("adds"), orig.get("adds"))
            if c["kind"] != "original" else "",
            _num(c.get("params"), 1e6, 3), _num(c.get("cost_bytes"), 1e6),
            _num(c.get("onnx_bytes"), 1e6), _num(c.get("energy_pj"), 1e6, 1),
            _lat(c, "b1"), _lat(c, "b32"),
            _num(c.get("convert_wall_s"), 1, 0), _num(c.get("convert_peak_rss_mb"), 1, 0),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines, notes


def _disp(template) -> str:
    """A path template as a reader would type it."""
    return (str(template).replace("{shared}", "$HFB_SHARED")
            .replace("{cifar10}", "$HFB_CACHE/cifar10-jpeg/cifar10"))


def _case(res: dict, model: str) -> dict:
    return next((m for m in res["models"] if m["key"] == model), {"key": model, "title": model})


def _command_line(res: dict) -> str:
    cmd = res.get("command", "")
    for name in SUITES:
        if cmd == f"python -m bench.run --suite {name}":
            target = "bench" if name == "full" else f"bench-{name}"
            return f"`make {target}` (= `{cmd}`)"
    return f"`{cmd}`"


def _conventions(res: dict) -> list[str]:
    s = res.get("settings", {})
    reps = s.get("latency_repeats", ["?", "?"])
    return [
        "Conventions: Δ top-1 in percentage points against the `original` row (same eval "
        "images); *agree* = top-1 agreement with the original model and *KL* = KL(original ‖ "
        "model) in nats per image, each with its 95% bootstrap interval over the images where "
        "the cell stored per-image results (else the figure alone; — where not measured). "
        "MULs/ADDs per inference "
        "from hfbconvert's cost model (`hfbconvert/costs.py`): ADDs of ternary banks counted "
        "from the real non-zeros, bias additions not counted; the int8 row has the FP32 "
        "model's counts, as 8-bit operations. *size, cost model*: FP weights at 32 bits, "
        "ternary at 2 bits packed; *ONNX*: bytes of the exported file (int8: the quantized "
        "file). Energy: arithmetic only, Horowitz ISSCC 2014 45 nm constants (fp32 MUL "
        "3.7 pJ, ADD 0.9 pJ; int8 row: int8 MUL 0.2 pJ + int32 ADD 0.1 pJ). Latency: "
        f"onnxruntime CPU, {s.get('threads', '?')} intra-op thread(s), median of "
        f"{reps[0]} (batch 1) / {reps[1]} (batch 32) runs interleaved with the original's "
        "ONNX in the same process (the original row against itself shows the noise). "
        "*convert*: wall time and peak RSS of the `hfbconvert compress` process "
        "(kernel accounting of that process; includes interpreter start-up); for int8, "
        "the in-process onnxruntime quantization time. Δ top-1 [95%]: paired bootstrap "
        "interval over the same images (per-image results stored); ᵘ: unpaired normal "
        "interval from the two top-1s (the results file predates per-image results; wider "
        "than the paired one would be).",
    ]


def split_lines(res: dict, model: str) -> list[str]:
    """Which images the model's figures came from (split name, count, list sha256)."""
    case = _case(res, model)
    sp = case.get("splits") or {}
    out = []
    for role in ("evaluation", "calibration", "tuning"):
        r = sp.get(role)
        if not r or "list_sha256" not in r:
            continue
        out.append(f"{role}: split `{r['name']}`, {r['n']} images, list sha256 "
                   f"`{r['list_sha256'][:16]}`")
    if not out:
        return ["Images: not recorded (results file predates the tuning split; "
                "calibration may overlap what is now the tuning split)."]
    return ["Images — " + "; ".join(out) + "."]


def render_section(res: dict, md_dir: Path, plots: dict[str, Path]) -> list[str]:
    title = res["suite"].capitalize() + " suite"
    m = res.get("machine", {})
    v = res.get("versions", {})
    g = res.get("git", {})
    dur = res.get("duration_s")
    out = [f"## {title}", ""]
    incomplete = "" if res.get("complete") else " — **run incomplete**"
    if res.get("_sources"):  # a merged section: the time is every contributing run's
        out.append(f"Merged from {len(res['_sources'])} runs (listed below)"
                   + (f", {dur / 60:.1f} min of runs in all" if dur is not None else "")
                   + f"; the newest: {_command_line(res)}, started {res.get('started')}"
                   + incomplete + ".")
    else:
        out.append(f"Produced by {_command_line(res)}, started {res.get('started')}"
                   + (f", took {dur / 60:.1f} min" if dur is not None else "")
                   + incomplete + ".")
    out.append("")
    commit = (g.get("commit") or "unknown")[:12]
    out.append(f"- commit: `{commit}`" + (" (working tree had uncommitted changes)"
                                          if g.get("dirty") else ""))
    out.append(f"- machine: {m.get('cpu')}, {m.get('cpus_allowed')} CPU(s) usable "
               f"({m.get('physical_cores')} physical cores), {m.get('memory_gb')} GB RAM, "
               f"{m.get('platform')}; load average at start {res.get('load_avg_start')}, "
               f"at end {res.get('load_avg_end')}")
    tt = res.get("settings", {}).get("torch_threads")
    threads = f"OMP_NUM_THREADS={tt}" if tt else "torch's default thread count"
    out.append(f"- threads: hfbconvert subprocesses {threads}; onnxruntime "
               f"{res.get('settings', {}).get('threads')} intra-op thread(s)")
    out.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    rel = os.path.relpath(res["_path"], md_dir) if "_path" in res else "?"
    if res.get("_sources"):
        out.append("- results files (cells measured the same way, merged by "
                   "`bench.report.merge_results`; the newest file's machine and commit "
                   "are shown above):")
        out += [f"  - {ln}" for ln in source_lines(res, md_dir)]
        if mixed_commits_note(res):
            out.append(f"- {mixed_commits_note(res)}")
    else:
        out.append(f"- results file: `{rel}`")
    for n in res.get("settings", {}).get("notes", []):
        out.append(f"- note recorded by the run: {n}")
    stale = sorted({str(c.get("steps")) for c in res["models"]} - {"auto"})
    if stale:
        out.append(f"- **Not today's defaults:** these compressed cells ran `--steps "
                   f"{', '.join(stale)}`, the CLI default is `--steps auto` (a distillation "
                   "fine-tune): read them as the no-fine-tune ablation; the ternary "
                   "baselines (TWN, StrassenNets, uniform) get no fine-tune here at all.")
    out.append(f"- split: {res.get('settings', {}).get('split') or 'eval (not recorded)'}; "
               f"calibration seeds: {res.get('settings', {}).get('seeds') or [0]}")
    out.append("")
    for case in res["models"]:
        key = case["key"]
        if not _cells(res, key):
            continue
        cells = _cells(res, key)
        n_eval = next((c.get("n_eval") for c in cells.values() if c.get("n_eval")), None)
        total = case.get("eval_total")
        subset = (f" (seeded subset of {total})" if total and n_eval and n_eval < total else "")
        out.append(f"### {case.get('title', key)}")
        out.append("")
        out.append(f"Model `{_disp(case.get('model'))}`; eval: {n_eval or '?'} images of "
                   f"`{_disp(case.get('eval_data'))}`{subset}; calibration: "
                   f"{case.get('calib_size') or 'all'} images of `{_disp(case.get('calib'))}`; "
                   f"fine-tuning: `--steps {case.get('steps')}` per compressed cell; int8 PTQ "
                   f"calibration: {case.get('int8_calib')} images.")
        out += split_lines(res, key)
        out.append("")
        lines, notes = model_table(res, key)
        out += lines
        out.append("")
        if len(res.get("settings", {}).get("seeds") or [0]) > 1:
            out += seeds_table(res, key)
            out.append("")
        if notes:
            out += [f"- {n}" for n in notes]
            out.append("")
        if key in plots:
            prel = os.path.relpath(plots[key], md_dir)
            out.append(f"![top-1 vs MULs and ADDs, {case.get('title', key)}]({prel})")
            cap = ("Hybrid MUL-budget points form the curve; baselines are single markers.")
            if case.get("paper_reference"):
                cap += (f" The star is the paper's *reported* result ({PAPER_POINT['source']}: "
                        f"{100 * PAPER_POINT['mul_reduction']:.1f}% fewer MULs, "
                        f"+{100 * PAPER_POINT['add_increase']:.0f}% ADDs, "
                        f"{PAPER_POINT['top1_drop_pp']} points top-1 loss), drawn relative to "
                        "the measured original; it is not a measurement of this code.")
            out += ["", cap, ""]
    out += _conventions(res)
    out.append("")
    return out


# ------------------------------------------------------------------------ seeds


def seed_mean_diff(cells: list[dict], ref: dict | None, seed: int = 0) -> dict | None:
    """Seed-averaged top-1 minus ``ref``: per image, the fraction of seeds that got it
    right minus the reference's bit, bootstrapped over images (paired); None unless every
    cell stored per-image results on the reference's images."""
    rb = _bits(ref)
    bits = [_bits(c) for c in cells if c.get("status") == "ok"]
    if rb is None or not bits or any(b is None or b[1] != rb[1] for b in bits):
        return None
    mean = np.mean([b[0] for b in bits], axis=0)  # type: ignore[index]
    d, (lo, hi) = paired_difference_interval(mean, rb[0], seed=seed)
    return {"d": d, "lo": lo, "hi": hi, "paired": True, "n": int(rb[0].size)}


def _spread(vals: list[float]) -> str:
    """'mean ± sd (min..max)' in points over seeds."""
    if not vals:
        return "—"
    m = float(np.mean(vals))
    if len(vals) == 1:
        return f"{100 * m:.2f} (one seed)"
    sd = float(np.std(vals, ddof=1))
    return f"{100 * m:.2f} ± {100 * sd:.2f} ({100 * min(vals):.2f}..{100 * max(vals):.2f})"


def agree_bits(cell: dict | None, orig: dict | None) -> np.ndarray | None:
    """Per-image agreement with the original: the stored bits, else the cell's stored
    predictions against the original cell's on the same images; None without either."""
    p = (cell or {}).get("per_image") or {}
    o = (orig or {}).get("per_image") or {}
    if p.get("agree_hex") and p.get("n"):
        return decode_bits(p["agree_hex"], int(p["n"]))
    if p.get("pred_b64") and o.get("pred_b64") and p.get("n") == o.get("n") \
            and p.get("images_sha256") == o.get("images_sha256"):
        return decode_classes(p["pred_b64"]) == decode_classes(o["pred_b64"])
    return None


def _agree_ci(cell: dict, orig: dict | None) -> str:
    """Agreement (%) with its 95% bootstrap interval over the images (per-image bits),
    else the recorded figure alone."""
    bits = agree_bits(cell, orig)
    if bits is None:
        return _pct(cell.get("agreement"))
    est, (lo, hi) = bootstrap_mean_interval(bits)
    return f"{100 * est:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def _kl_ci(cell: dict) -> str:
    """KL(original ‖ model) in nats with the eval's 95% interval ('—' if not measured)."""
    if cell.get("kl") is None:
        return "—"
    ci = cell.get("kl_ci95")
    return f"{cell['kl']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def seeds_table(res: dict, model: str) -> list[str]:
    """Per seed and over seeds: each compressed method against FP32, the int8 ones also
    against int8 PTQ, paired on the same images."""
    cells = _cells(res, model)
    orig, ptq = cells.get("original"), cells.get("int8-ptq")
    comp = [m for m in dict.fromkeys(c["method"] for c in res["cells"]
                                     if c["model"] == model and c["kind"] == "compress")]
    out = ["| cell | seed | top-1 % [95%] | Δ vs FP32 (pp) [95%] | vs FP32 | "
           "Δ vs int8 PTQ (pp) [95%] | vs int8 PTQ | agree % [95%] | KL (nats) [95%] | "
           "convert (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    if orig:
        out.append(f"| `original` | — | {_top1_ci(orig)} | 0 (ref) | | | | | | |")
    if ptq:
        d = diff(ptq, orig)
        out.append(f"| `int8-ptq` | — | {_top1_ci(ptq)} | {fmt_diff(d, True)} | {words(d)} "
                   f"| 0 (ref) | | {_agree_ci(ptq, orig)} | {_kl_ci(ptq)} | "
                   f"{_num(ptq.get('convert_wall_s'), 1, 0)} |")
    for m in comp:
        int8 = any("--activation-bits" in a for a in res["methods"].get(m, {}).get("args", []))
        for c in _seed_cells(res, model, m):
            if c.get("status") != "ok":
                out.append(f"| `{m}` | {c.get('seed')} | {c.get('status')}: "
                           f"{'; '.join(c.get('errors', []))[:120]} | | | | | | | |")
                continue
            d = diff(c, orig)
            dp = diff(c, ptq) if int8 and ptq else None
            out.append(f"| `{m}` | {c.get('seed')} | {_top1_ci(c)} | {fmt_diff(d, True)} | "
                       f"{words(d)} | {fmt_diff(dp, True) if dp else ''} | "
                       f"{words(dp, 'beats PTQ', 'below PTQ') if dp else ''} | "
                       f"{_agree_ci(c, orig)} | {_kl_ci(c)} | "
                       f"{_num(c.get('convert_wall_s'), 1, 0)} |")
    out += ["", "Over seeds (mean ± sample standard deviation, min..max); the seed-averaged "
            "difference is paired: per image, the fraction of seeds right minus the "
            "reference's bit, bootstrapped over images.", "",
            "| method | seeds | top-1 % | Δ vs FP32 (pp) | seed-averaged Δ vs FP32 [95%] | "
            "vs FP32 | seed-averaged Δ vs int8 PTQ [95%] | vs int8 PTQ |",
            "|---|---|---|---|---|---|---|---|"]
    for m in comp:
        ok = [c for c in _seed_cells(res, model, m) if c.get("status") == "ok"
              and c.get("top1") is not None]
        if not ok:
            continue
        int8 = any("--activation-bits" in a for a in res["methods"].get(m, {}).get("args", []))
        deltas = [c["top1"] - orig["top1"] for c in ok] if orig and orig.get("top1") else []
        d = seed_mean_diff(ok, orig)
        dp = seed_mean_diff(ok, ptq) if int8 and ptq else None
        dlt = _spread(deltas).replace(" (", " (").lstrip() if deltas else "—"
        if deltas:
            dlt = ("+" if np.mean(deltas) >= 0 else "") + dlt
        out.append(f"| `{m}` | {', '.join(str(c.get('seed')) for c in ok)} | "
                   f"{_spread([c['top1'] for c in ok])} | {dlt} | {fmt_diff(d)} | {words(d)} | "
                   f"{fmt_diff(dp) if dp else ''} | "
                   f"{words(dp, 'beats PTQ', 'below PTQ') if dp else ''} |")
    return out


HEADER = """# Benchmarks

Every block marked `<!-- generated:... -->` is written by `python -m bench.report`
(also at the end of `python -m bench.run`) from bench/results/*.json: do not edit it by
hand, rerun the benchmark or the report. `tests/test_bench_report.py` checks that the
committed blocks equal what the committed results files give.

How to reproduce:

- `make bench-full-auto` — the trade-off table at the CLI default `--steps auto`:
  ImageNet MobileNetV1 0.5-160 and CIFAR-10 MobileNetV1 0.5 × {original, TWN,
  StrassenNets r=1/2×, hybrid uniform 50%, hybrid MUL budget 0.7/0.536/0.4, onnxruntime
  int8 PTQ}, every baseline given the hybrid's fine-tune (about 75 min at one thread).
- `make bench` — full suite, the same methods plus MobileNetV2 and the int8 hybrids at
  `--steps 0` (no fine-tune: the ablation); about an hour on 2 CPU cores (cells past
  the time budget are recorded as skipped).
- `make bench-int8` — the int8 hybrid against onnxruntime int8 PTQ on the three models.
- `make bench-quick` — quick suite (≤ 10 min): MobileNetV1 0.5-160 × {original, TWN,
  hybrid 0.536, int8 PTQ} with fewer fine-tuning steps.
- `make bench-seeds` — the headline cells (MobileNetV1 0.5-160: FP32,
  hybrid 0.536 float and int8, int8 PTQ) at `--steps auto`, the hybrids once per
  calibration seed (0, 1, 2): mean ± spread and paired intervals.
- `make bench-compare` — differences between the two latest results files.
- `--split tune` — measure on the tuning split (300 calibration images held apart from
  calibration, `bench/splits.py`) for any choice made by measurement; the default
  `--split eval` is for reported figures. Calibration never reads the tuning images.
- `python -m bench.run --help` — options (`--models`, `--methods`, `--steps`,
  `--eval-size`, `--dry-run`, `--matrix FILE`, ...).

Models and data come from `$HFB_SHARED` (default `../shared`); CIFAR-10 is extracted
once into `$HFB_CACHE` (default `~/.cache/hfbconvert`). Every cell runs the `hfbconvert`
CLI (`compress`, `eval`, `export onnx`) as a subprocess. Each section below comes from
the latest results file of its suite and names the command, commit and machine that
produced it; only measured numbers appear in the tables. Differences come with their
95% interval; "better"/"worse"/"beats" appear only where it excludes zero, otherwise
"within noise (±x points)".
"""


def _yerr(cells: list[dict]) -> np.ndarray:
    """Error bars (points below, above) of each cell's top-1: its 95% interval (stored
    bootstrap, else Wilson)."""
    out = []
    for c in cells:
        ci = c.get("top1_ci95")
        if ci is None and c.get("n_eval"):
            ci = wilson_interval(round(c["top1"] * c["n_eval"]), c["n_eval"])
        lo, hi = ci if ci is not None else (c["top1"], c["top1"])
        out.append((100 * max(0.0, c["top1"] - lo), 100 * max(0.0, hi - c["top1"])))
    return np.array(out, dtype=float).T.reshape(2, -1)


EXTRA_COLORS = ["tab:cyan", "tab:brown", "tab:pink", "tab:olive", "tab:gray"]


def plot_model(res: dict, model: str, path: Path) -> Path | None:
    """top-1 vs MULs and top-1 vs ADDs of one model (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {k: c for k, c in _cells(res, model).items()
             if c.get("status") == "ok" and c.get("top1") is not None}
    if not cells:
        return None
    all_cells = [c for c in res["cells"] if c["model"] == model
                 and c.get("status") == "ok" and c.get("top1") is not None]
    case = _case(res, model)
    orig = cells.get("original")
    style = {"original": ("o", "black", "original FP32"), "twn": ("X", "tab:red", "TWN"),
             "strassen-r1": ("^", "tab:purple", "StrassenNets r=1×"),
             "strassen-r2": ("v", "tab:purple", "StrassenNets r=2×"),
             "hybrid-uniform-0.5": ("D", "tab:green", "hybrid uniform 50%"),
             "int8-ptq": ("s", "tab:orange", "int8 PTQ (ORT; int8 ops)")}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for ax, metric, xlabel in ((axes[0], "muls", "MULs per inference (M)"),
                               (axes[1], "adds", "ADDs per inference (M)")):
        curve = sorted((c for c in cells.values() if c.get("family") == "hybrid"
                        and c.get(metric) is not None), key=lambda c: c[metric])
        if curve:
            xs = [c[metric] / 1e6 for c in curve]
            ys = [100 * c["top1"] for c in curve]
            ax.plot(xs, ys, "o-", color="tab:blue", label="hybrid (MUL budget)")
            for c, x, y in zip(curve, xs, ys):
                ax.annotate(c["method"].replace("hybrid-", ""), (x, y), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        for key, (mk, col, lab) in style.items():
            c = cells.get(key)
            if c is None or c.get(metric) is None:
                continue
            hollow = key == "int8-ptq"  # sits on the original's x: keep both visible
            ax.errorbar([c[metric] / 1e6], [100 * c["top1"]], yerr=_yerr([c]), fmt="none",
                        ecolor=col, elinewidth=0.8, alpha=0.6, capsize=0)
            ax.plot([c[metric] / 1e6], [100 * c["top1"]], mk, color=col, label=lab,
                    markersize=11 if hollow else 8, linestyle="none",
                    markerfacecolor="none" if hollow else col, markeredgewidth=1.8,
                    zorder=3 if hollow else 4)
        # every other cell (the int8 hybrids among them), each seed's point, labelled
        others = [c for c in all_cells if c.get(metric) is not None
                  and c["method"] not in style and c.get("family") != "hybrid"]
        for i, key in enumerate(dict.fromkeys(c["method"] for c in others)):
            pts = [c for c in others if c["method"] == key]
            int8 = pts[0].get("family") == "hybrid-int8"
            ax.errorbar([c[metric] / 1e6 for c in pts], [100 * c["top1"] for c in pts],
                        yerr=_yerr(pts), fmt="none", ecolor=EXTRA_COLORS[i % len(EXTRA_COLORS)],
                        elinewidth=0.8, alpha=0.6, capsize=0)
            ax.plot([c[metric] / 1e6 for c in pts], [100 * c["top1"] for c in pts],
                    "P" if int8 else "d", color=EXTRA_COLORS[i % len(EXTRA_COLORS)],
                    markersize=9, linestyle="none", zorder=5,
                    label=key + (f" ({len(pts)} seeds)" if len(pts) > 1 else ""))
        extra_curve = [c for c in all_cells if c.get("family") == "hybrid"
                       and c.get(metric) is not None and c not in curve]
        if extra_curve:  # the budget curve's cells at the other seeds
            ax.plot([c[metric] / 1e6 for c in extra_curve],
                    [100 * c["top1"] for c in extra_curve], "o", color="tab:blue",
                    markerfacecolor="none", linestyle="none", label="hybrid, other seeds")
        if case.get("paper_reference") and orig and orig.get(metric):
            f = (1 - PAPER_POINT["mul_reduction"]) if metric == "muls" else (
                1 + PAPER_POINT["add_increase"])
            ax.plot([orig[metric] * f / 1e6], [100 * orig["top1"] - PAPER_POINT["top1_drop_pp"]],
                    "*", color="gold", markeredgecolor="black", markersize=15,
                    linestyle="none", label="paper, reported (rel. to measured original)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", numpoints=1)
    n = next((c.get("n_eval") for c in cells.values() if c.get("n_eval")), "?")
    fig.suptitle(f"{case.get('title', model)} — {res['suite']} suite, top-1 on {n} images "
                 "(bars: 95% intervals)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MARK = re.compile(r"<!-- generated:([\w.-]+) -->\n.*?<!-- /generated -->\n?", re.S)
MARK_BODY = re.compile(r"<!-- generated:([\w.-]+) -->\n(.*?)\n<!-- /generated -->", re.S)
OURS = re.compile(r"^(header|suite-[\w.-]+|paired-[\w.-]+|ablation|readme-[\w.-]+)$")


def block(name: str, text: str) -> str:
    """``text`` between the markers that let a later run replace it (and only it)."""
    return f"<!-- generated:{name} -->\n{text.rstrip()}\n<!-- /generated -->\n"


def compose(existing: str | None, blocks: dict[str, str]) -> str:
    """``existing`` with each of our blocks replaced by its new text, ours that are no
    longer rendered dropped, new ones appended in order; every other block and all text
    outside blocks kept as is. A file without any block (or none) becomes the blocks."""
    if not existing or not MARK.search(existing):
        return "\n".join(block(k, v) for k, v in blocks.items())
    seen: set[str] = set()

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if not OURS.match(name):
            return m.group(0)
        if name in blocks:
            seen.add(name)
            return block(name, blocks[name])
        return ""

    out = MARK.sub(sub, existing)
    rest = [block(k, v) for k, v in blocks.items() if k not in seen]
    if rest:
        out = out.rstrip("\n") + "\n\n" + "\n".join(rest)
    return out


def plot_paths(res: dict, plots_dir: Path, write: bool) -> dict[str, Path]:
    """Plot of each model that has something to plot (drawn only when ``write``)."""
    out = {}
    for case in res["models"]:
        path = plots_dir / f"{res['suite']}-{case['key']}.png"
        if write:
            if plot_model(res, case["key"], path) is not None:
                out[case["key"]] = path
        elif any(c.get("status") == "ok" and c.get("top1") is not None
                 for c in _cells(res, case["key"]).values()):
            out[case["key"]] = path
    return out


def render_blocks(latest: dict[str, dict], md_path: Path, plots_dir: Path,
                  results_dir: Path | None = None, write_plots: bool = True
                  ) -> tuple[dict[str, str], list[Path]]:
    """BENCHMARKS.md's generated blocks by name (and the plots written)."""
    from .ablation_report import render_ablation

    md_dir = md_path.resolve().parent
    written: list[Path] = []
    blocks = {"header": HEADER.strip()}
    order = [s for s in SECTION_ORDER if s in latest] + sorted(set(latest) - set(SECTION_ORDER))
    if not order:
        blocks["header"] += "\n\n_No results yet: run `make bench-quick` or `make bench`._"
    for suite in order:
        res = latest[suite]
        plots = plot_paths(res, plots_dir, write_plots)
        written += list(plots.values()) if write_plots else []
        text = "\n".join(render_section(res, md_dir, plots)).strip()
        if suite in COMPARED_SUITES:
            text += "\n\n" + "\n".join(compare_previous(
                Path(results_dir or REPO / "bench" / "results"), suite, md_dir))
        blocks[f"suite-{suite}"] = text.rstrip()
    ablation = render_ablation(Path(results_dir or REPO / "bench" / "results"), md_dir)
    if ablation:
        blocks["ablation"] = ablation.strip()
    for suite, path in latest_paired(Path(results_dir or REPO / "bench" / "results")).items():
        blocks[f"paired-{suite}"] = paired_block(path, md_dir)
    return blocks, written


# ------------------------------------------------------------------------ paired files
#
# bench/lite0.py (and bench/cifar_v3.py through it) write ``<stamp>-<suite>-paired.json``
# next to their results file: the paired comparisons, which these blocks print.

PAIRED = re.compile(r"^\d{8}T\d{6}Z-(?P<suite>[\w.]+(?:-[\w.]+)*?)-paired\.json$")


def latest_paired(results_dir: Path) -> dict[str, Path]:
    """The latest paired file of each suite (names start with a UTC timestamp)."""
    out: dict[str, Path] = {}
    for f in sorted(Path(results_dir).glob("*-paired.json")):
        m = PAIRED.match(f.name)
        if m:
            out[m.group("suite")] = f
    return out


def _pts(v: float) -> str:
    return f"{100 * v:+.2f}"


def _measure_text(q: dict, key: str) -> str:
    """Agreement or KL of one pair as a sentence part (or why it is missing)."""
    r = q.get(key)
    name = "agreement with the original" if key == "agreement" else "KL(original ‖ model)"
    if not r:
        return f"{name}: not in this paired file"
    if "error" in r:
        return f"{name}: {r['error']}"
    scale, unit, dg = (100, "%", 2) if key == "agreement" else (1, " nats", 4)

    def ci(c: list[float], sign: str = "") -> str:
        return f"[{scale * c[0]:{sign}.{dg}f}, {scale * c[1]:{sign}.{dg}f}]"

    if "diff" not in r:
        src = f" ({r['source']})" if r.get("source") else ""
        return f"{name} {scale * r['mean']:.{dg}f}{unit} {ci(r['ci95'])}{src}"
    src = f"; {', '.join(r['source'])}" if r.get("source") else ""
    return (f"{name} {scale * r['a']['mean']:.{dg}f}{unit} vs {scale * r['b']['mean']:.{dg}f}"
            f"{unit}, difference {scale * r['diff']:+.{dg}f} {ci(r['ci95'], '+')}: "
            f"{r['verdict']}{src}")


def _cost_lines(res: dict) -> list[str]:
    """Conversion and evaluation times per cell of a results file (one run, one machine:
    single measurements, no interval; read them as that run's)."""
    out = []
    for c in res.get("cells", []):
        ev = next((st.get("wall_s") for st in c.get("steps", []) if st.get("name") == "eval"),
                  None)
        ft = (c.get("compress_timings") or {}).get("finetune_s")
        lat = ((c.get("latency") or {}).get("b1") or {}).get("ratio")
        parts = []
        if c.get("convert_wall_s") is not None:
            parts.append(f"convert {c['convert_wall_s']:,.0f} s"
                         + (f" ({ft:,.0f} s of it the fine-tune)" if ft else ""))
        if ev is not None:
            parts.append(f"eval {ev:,.0f} s")
        if lat is not None:
            parts.append(f"onnxruntime batch-1 latency ×{lat:.2f} of the original's")
        if c.get("status") != "ok":
            parts.append(f"{c.get('status')}: {'; '.join(c.get('errors', []))[:160]}")
        if parts:
            out.append(f"`{c['method']}` " + ", ".join(parts))
    return out


def paired_block(path: Path, md_dir: Path) -> str:
    """A paired file as sentences: each comparison's top-1 difference with its interval,
    McNemar's p and verdict, then agreement and KL where the cells carried them, then the
    run's times from its results file."""
    doc = json.loads(Path(path).read_text())
    rel = os.path.relpath(path, md_dir)
    res_path = Path(path).with_name(doc.get("results", ""))
    cmd = doc.get("run_command") or doc.get("command")
    lines = [f"### Paired comparisons, `{doc.get('results')}`", "",
             f"Generated from `{rel}` (written by `{doc.get('command')}`"
             + (f"; the run: `{cmd}`" if cmd != doc.get("command") else "") + "): "
             "A − B on the same images, top-1 difference in points with its paired "
             "bootstrap 95% interval and McNemar's exact p; agreement with the original and "
             "KL(original ‖ model) with their intervals where the cells stored them per "
             "image (agreement \"from the predictions\": each cell's stored predictions "
             "against the original cell's)."]
    pw = doc.get("pair_with")
    if pw:
        lines += ["", f"Cells taken from `{pw.get('results')}` (same model, images and "
                  f"settings): {', '.join(pw.get('methods') or []) or 'none'}"
                  + (f"; refused: {pw['refused']}" if pw.get("refused") else "") + "."]
    elif doc.get("cells_from"):  # files written before the settings check
        lines += ["", "Cells taken from earlier results files (same images checked per "
                  "pair): " + ", ".join(f"`{m}` from `{f}`"
                                        for m, f in doc["cells_from"].items()) + "."]
    lines.append("")
    for q in doc.get("pairs", []):
        head = f"- `{q['a']}` − `{q['b']}`"
        if "error" in q:
            lines.append(f"{head}: not compared ({q['error']}).")
            continue
        lines.append(f"{head}, {q['n']} images: top-1 {100 * q['top1_a']:.2f} vs "
                     f"{100 * q['top1_b']:.2f}, difference {_pts(q['diff'])} "
                     f"[{_pts(q['ci95'][0])}, {_pts(q['ci95'][1])}], p = {q['mcnemar_p']:.2g} "
                     f"(only A right on {q['only_a']} images, only B on {q['only_b']}): "
                     f"{q['verdict']}; {_measure_text(q, 'agreement')}; "
                     f"{_measure_text(q, 'kl')}.")
    if res_path.is_file():
        costs = _cost_lines(json.loads(res_path.read_text()))
        if costs:
            lines += ["", f"Times recorded in `{os.path.relpath(res_path, md_dir)}` (one run "
                      "each on the machine named in its section, no interval): "
                      + "; ".join(costs) + "."]
    return "\n".join(lines)


COMPARED_SUITES = ("quick",)


def compare_previous(results_dir: Path, suite: str, md_dir: Path) -> list[str]:
    """``make bench-compare`` of the suite's two latest results files, as a section: the
    quick suite is the smoke check that a refactor left every figure as it was."""
    from .compare import compare, paired_section

    files = [p for p in results_files(results_dir) if load_results(p)["suite"] == suite]
    if len(files) < 2:
        return []
    old, new = (load_results(p) for p in files[-2:])
    for r, p in ((old, files[-2]), (new, files[-1])):
        r["_path"] = os.path.relpath(p.resolve(), md_dir)
    return [f"### Against the previous {suite} run", "",
            f"`python -m bench.compare {old['_path']} {new['_path']}` (what `make "
            "bench-compare` prints for these two files): old -> new per cell, then each "
            "top-1 with its interval and the paired difference new - old over the same "
            "images where both files stored per-image results.", "", "```text",
            *compare(old, new), *paired_section(old, new), "```"]


def render(latest: dict[str, dict], md_path: Path, plots_dir: Path,
           results_dir: Path | None = None, write_plots: bool = True
           ) -> tuple[str, list[Path]]:
    """The whole BENCHMARKS.md as this run would write it over ``md_path``."""
    blocks, written = render_blocks(latest, md_path, plots_dir, results_dir, write_plots)
    old = md_path.read_text() if md_path.is_file() else None
    return compose(old, blocks), written


def _write(path: Path, text: str) -> None:
    from hfbconvert.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_benchmarks(results_dir: str | Path, md_path: str | Path = REPO / "BENCHMARKS.md",
                     plots_dir: str | Path = REPO / "bench" / "plots",
                     plots: bool = True) -> list[Path]:
    """Regenerate BENCHMARKS.md's blocks (and its plots, unless ``plots`` is false) from
    the latest results of each suite and the ablation results files."""
    md_path, plots_dir = Path(md_path), Path(plots_dir)
    text, written = render(latest_per_suite(results_dir), md_path, plots_dir, Path(results_dir),
                           plots)
    _write(md_path, text)
    return [md_path, *written]


# ------------------------------------------------------------------------ README


def readme_blocks(latest: dict[str, dict], readme: Path,
                  results_dir: Path | None = None) -> dict[str, str]:
    """The README's generated tables and sentences: the seeds headline, the int8 table,
    the fit-alone drops of earlier runs and the energy cap's cost in top-1."""
    rdir = readme.resolve().parent
    rdir_results = Path(results_dir or REPO / "bench" / "results")
    none = "_Not measured yet: run `python -m bench.run --suite {}`._"
    return {"readme-seeds": readme_seeds(latest["seeds"], rdir) if "seeds" in latest
            else none.format("seeds"),
            "readme-int8": readme_int8(latest["int8"], rdir) if "int8" in latest
            else none.format("int8"),
            "readme-fit-drop": readme_fit_drop(latest, rdir_results, rdir),
            "readme-energy-cap": readme_energy_cap(latest, rdir_results, rdir),
            "readme-choices": readme_choices(rdir_results)}


def _json_file(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _ft_rows(path: Path) -> tuple[dict, list[dict]]:
    """(args, rows with their unpaired difference against the file's original) of a
    bench/finetune_curve.py results file."""
    d = _json_file(path) or {}
    n, ref = d.get("n_eval"), d.get("top1_original")
    rows = [dict(r, _d=unpaired(r["top1"], n, ref, n)) for r in d.get("rows", [])
            if r.get("top1") is not None and n and ref is not None]
    return d.get("args", {}), rows


def readme_fit_drop(latest: dict[str, dict], results_dir: Path, rdir: Path) -> str:
    """hybrid 0.536 − original in the full suite and in the library runs of
    bench/finetune_curve.py on MobileNetV1-0.5-160 (2,000 calibration images), each with
    its interval (unpaired: those files store no per-image results)."""
    lines = []
    full = latest.get("full")
    if full:
        parts = []
        for case in full["models"]:
            cells = _cells(full, case["key"])
            d = diff(cells.get("hybrid-0.536"), cells.get("original"))
            if d:
                parts.append(f"{case.get('title', case['key'])} ({d['n']} eval, "
                             f"{case.get('calib_size') or 'all'} calibration images, "
                             f"`--steps {case.get('steps')}`) {fmt_diff(d)}, {words(d)}")
        if parts:
            lines.append(f"- the full suite, `hybrid-0.536` − `original` ({_src(full, rdir)}): "
                         + "; ".join(parts) + ".")
    at300 = []
    for f in sorted(Path(results_dir).glob("finetune-v1-s*.json")):
        args, rows = _ft_rows(f)
        if not rows:
            continue
        at300 += [r for r in rows if r.get("steps") == 300]
        lines.append(f"- `{os.path.relpath(f, rdir)}` (seed {args.get('seed')}, "
                     f"{args.get('n')} calibration images, layer statistics from "
                     f"{args.get('stats_images') or 'the default 256'} images): "
                     + "; ".join(f"{r['steps']} steps {fmt_diff(r['_d'])}, {words(r['_d'])}"
                                 for r in rows) + ".")
    if at300:
        ds = [100 * r["_d"]["d"] for r in at300]
        lines.append(f"- at 300 fine-tune steps, over these {len(ds)} runs: mean "
                     f"{np.mean(ds):+.2f} points, "
                     f"from {min(ds):+.2f} to {max(ds):+.2f}.")
    if not lines:
        return "_No results files: run `python -m bench.run --suite full` and " \
               "`python -m bench.finetune_curve`._"
    return "\n".join(["Generated from the results files named (ᵘ: unpaired 95% intervals, "
                      "those files predate per-image results; the library runs on 1,300 "
                      "val images):", "",
                      *lines])


# (what is compared, A, B): A and B are (results file, finetune_curve row's steps) or
# (results file, (model, method)) of a suite results file; each line A − B.
README_CHOICES = [
    ("fine-tune (300 steps) − fit alone, MobileNetV1-0.5-160, float",
     ("finetune-v1-s0.json", 300), ("finetune-v1-s0.json", 0)),
    ("int8, mean-shift correction before − after the activation quantizers, MobileNetV2",
     ("finetune-v2-int8-shiftfirst.json", 76), ("finetune-v2-int8-qat.json", 76)),
    ("int8, the same on MobileNetV1-0.5-160",
     ("finetune-v1-int8-shiftfirst.json", 300), ("finetune-v1-int8-qat.json", 300)),
    ("int8, quantizers in the fine-tune − float fine-tune then quantize, MobileNetV1-0.5-160",
     ("finetune-v1-int8-qat.json", 300), ("finetune-v1-int8.json", 300)),
    ("int8, the same on MobileNetV2 (the float-then-quantize cell is the int8 suite's)",
     ("finetune-v2-int8-qat.json", 76),
     ("20261129T112254Z-int8.json", ("v2", "hybrid-0.536-int8"))),
]


def _choice_side(results_dir: Path, name: str, sel) -> tuple[float, int, str] | None:
    """(top-1, eval images, description) of one side of a README_CHOICES line."""
    d = _json_file(Path(results_dir) / name)
    if not d:
        return None
    if isinstance(sel, tuple):  # a suite results file's cell
        c = next((c for c in d.get("cells", []) if (c.get("model"), c.get("method")) == sel
                  and c.get("top1") is not None), None)
        if c is None or not c.get("n_eval"):
            return None
        return c["top1"], int(c["n_eval"]), f"`{name}` {sel[0]}/{sel[1]}"
    r = next((r for r in d.get("rows", []) if r.get("steps") == sel
              and r.get("top1") is not None), None)
    if r is None or not d.get("n_eval"):
        return None
    return r["top1"], int(d["n_eval"]), f"`{name}` {sel} steps"


def readme_choices(results_dir: Path) -> str:
    """The comparisons the README's method description cites, each A − B with its
    unpaired interval (those files store no per-image results) and verdict."""
    lines = []
    for what, a, b in README_CHOICES:
        sa, sb = _choice_side(results_dir, *a), _choice_side(results_dir, *b)
        if sa is None or sb is None:
            lines.append(f"- {what}: not in the results files")
            continue
        d = unpaired(sa[0], sa[1], sb[0], sb[1])
        lines.append(f"- {what}: {100 * sa[0]:.2f} vs {100 * sb[0]:.2f}, {fmt_diff(d)}, "
                     f"{words(d)}; {sa[2]} − {sb[2]}, {min(sa[1], sb[1])} val images.")
    return "\n".join(["Generated from bench/results (ᵘ: unpaired 95% intervals, those files "
                      "predate per-image results; each a single run, and the same images "
                      "chose the setting and report it):", "", *lines])


def readme_energy_cap(latest: dict[str, dict], results_dir: Path, rdir: Path) -> str:
    """`--energy-budget 1` against the default int8 hybrid: arithmetic energy (the cost
    model's, exact) and the top-1 difference with its interval, per model of the int8
    suite, and in the library runs of bench/finetune_curve.py where both exist."""
    lines = []
    res = latest.get("int8")
    if res:
        parts = []
        for case in res["models"]:
            cells = _cells(res, case["key"])
            cap, base = cells.get("hybrid-0.536-int8-e1"), cells.get("hybrid-0.536-int8")
            ptq = cells.get("int8-ptq") or {}
            if not cap or not base:
                continue
            d = diff(cap, base)
            parts.append(f"{case.get('title', case['key'])}: energy "
                         f"{_num(cap.get('energy_pj'), 1e6)} µJ with the cap, "
                         f"{_num(base.get('energy_pj'), 1e6)} without, int8 PTQ "
                         f"{_num(ptq.get('energy_pj'), 1e6)}; top-1 with − without "
                         f"{fmt_diff(d)}, {words(d)}")
        if parts:
            lines.append(f"- int8 suite ({_src(res, rdir)}): " + "; ".join(parts) + ".")
    cap_f = Path(results_dir) / "finetune-v1-int8-energy100.json"
    base_f = Path(results_dir) / "finetune-v1-int8.json"
    if cap_f.is_file() and base_f.is_file():
        (ca, cr), (ba, br) = _ft_rows(cap_f), _ft_rows(base_f)
        c300 = next((r for r in cr if r.get("steps") == 300), None)
        b300 = next((r for r in br if r.get("steps") == 300), None)
        n = (_json_file(cap_f) or {}).get("n_eval")
        same = {k: ca.get(k) for k in ("model", "n", "seed", "budget")} == {
            k: ba.get(k) for k in ("model", "n", "seed", "budget")}
        if c300 and b300 and n and same:
            d = unpaired(c300["top1"], n, b300["top1"], n)
            lines.append(f"- `{os.path.relpath(cap_f, rdir)}` against "
                         f"`{os.path.relpath(base_f, rdir)}` ({ca.get('n')} calibration "
                         f"images, seed {ca.get('seed')}, 300 fine-tune steps, {n} val "
                         f"images): energy {_num(c300.get('energy_pj'), 1e6)} vs "
                         f"{_num(b300.get('energy_pj'), 1e6)} µJ; top-1 with − without "
                         f"{fmt_diff(d)}, {words(d)}.")
    if not lines:
        return "_Not measured yet: run `python -m bench.run --suite int8`._"
    return "\n".join(["Generated (ᵘ: unpaired 95% interval, the files predate per-image "
                      "results):", "", *lines])


def _src(res: dict, rdir: Path) -> str:
    if res.get("_sources"):
        return "; ".join(source_lines(res, rdir)) + (
            f". {mixed_commits_note(res)[:-1]}" if mixed_commits_note(res) else "")
    rel = os.path.relpath(res["_path"], rdir) if "_path" in res else "?"
    g = res.get("git", {})
    return (f"`{res.get('command')}` → `{rel}` (commit `{(g.get('commit') or '?')[:10]}`"
            f"{', uncommitted changes' if g.get('dirty') else ''}, {res.get('started')})")


def _eval_desc(res: dict, model: str) -> str:
    case = _case(res, model)
    ev = (case.get("splits") or {}).get("evaluation") or {}
    cells = _cells(res, model)
    n = ev.get("n") or next((c.get("n_eval") for c in cells.values() if c.get("n_eval")), "?")
    name = ev.get("name")
    sha = ev.get("list_sha256")
    return (f"{n} images of split `{name}` (list sha256 `{sha[:16]}`)" if name and sha
            else f"{n} images of `{_disp(case.get('eval_data'))}`, split not recorded")


def readme_seeds(res: dict, rdir: Path) -> str:
    lines = [f"Measured by {_src(res, rdir)}."]
    for case in res["models"]:
        key = case["key"]
        if not _cells(res, key):
            continue
        lines += ["", f"**{case.get('title', key)}**, {_eval_desc(res, key)}; calibration "
                  f"{case.get('calib_size') or 'all'} images, `--steps {case.get('steps')}`:",
                  ""]
        lines += seeds_table(res, key)
    return "\n".join(lines)


def readme_int8(res: dict, rdir: Path) -> str:
    """The int8 suite as the README shows it: top-1 with intervals, differences against
    FP32 and int8 PTQ with their verdicts, cost, size and latency."""
    lines = [f"Measured by {_src(res, rdir)}; ᵘ: unpaired interval (that file predates "
             "per-image results).", "",
             "| model | | top-1 % [95%] | Δ vs FP32 (pp) [95%] | vs FP32 | Δ vs int8 PTQ "
             "(pp) [95%] | vs int8 PTQ | MULs | ADDs | energy | ONNX bytes (of FP32) | "
             "ORT b1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in res["models"]:
        key = case["key"]
        cells = _cells(res, key)
        orig, ptq = cells.get("original"), cells.get("int8-ptq")
        first = True
        order = [k for k in TABLE_ORDER if k in cells] + [k for k in cells if k not in TABLE_ORDER]
        for k in order:
            c = cells[k]
            title = f"{case.get('title', key)} ({_eval_desc(res, key)})" if first else ""
            first = False
            if c.get("status") != "ok":
                lines.append(f"| {title} | `{k}` | {c.get('status')} | | | | | | | | | |")
                continue
            d = diff(c, orig) if k != "original" else None
            dp = diff(c, ptq) if c.get("family") == "hybrid-int8" else None
            ob, fb = c.get("onnx_bytes"), (orig or {}).get("onnx_bytes")
            size = f"{ob:,}" + (f" ({100 * ob / fb:.1f}%)" if ob and fb and k != "original"
                                else "") if ob else "—"
            lat = ((c.get("latency") or {}).get("b1") or {}).get("ratio")
            lines.append(
                f"| {title} | `{k}` | {_top1_ci(c)} | "
                f"{fmt_diff(d, True) if d else ('0 (ref)' if k == 'original' else '—')} | "
                f"{words(d) if d else ''} | {fmt_diff(dp, True) if dp else ''} | "
                f"{words(dp, 'beats PTQ', 'below PTQ') if dp else ''} | "
                f"{_num(c.get('muls'), 1e6, 1)}M | {_num(c.get('adds'), 1e6, 1)}M | "
                f"{_num(c.get('energy_pj'), 1e6, 1)} µJ | {size} | "
                f"{'—' if lat is None else f'{lat:.2f}x'} |")
    return "\n".join(lines)


def write_readme(results_dir: str | Path, readme: str | Path = REPO / "README.md") -> Path | None:
    """Replace the README's generated blocks (only those already marked in it)."""
    readme = Path(readme)
    if not readme.is_file():
        return None
    old = readme.read_text()
    present = set(MARK.findall(old))
    blocks = {k: v for k, v in readme_blocks(latest_per_suite(results_dir), readme,
                                             Path(results_dir)).items()
              if k in present}
    if not blocks:
        return None
    new = compose(old, blocks)
    if new != old:
        _write(readme, new)
    return readme


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report``: regenerate BENCHMARKS.md without running anything."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--plots", type=Path, default=REPO / "bench" / "plots")
    p.add_argument("--readme", type=Path, default=REPO / "README.md",
                   help="README whose generated blocks to refresh")
    p.add_argument("--no-plots", action="store_true",
                   help="text only: leave the plots as they are (a text-only change)")
    a = p.parse_args(argv)
    for path in write_benchmarks(a.results, a.markdown, a.plots, plots=not a.no_plots):
        print(f"wrote {path}")
    if write_readme(a.results, a.readme):
        print(f"wrote {a.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
