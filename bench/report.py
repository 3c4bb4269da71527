"""Results JSON -> BENCHMARKS.md sections (one per suite, from its latest results file)
and plots (top-1 vs MULs / ADDs per model).

Only measured numbers are written; the paper's reported point appears on the ImageNet
MobileNetV1 0.5 plot as a reference marker, placed relative to the measured original.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import RESULTS_SCHEMA
from .cases import PAPER_POINT, REPO, SUITES, TABLE_ORDER

SECTION_ORDER = ["full", "int8", "quick"]


# ------------------------------------------------------------------------ loading


def load_results(path: str | Path) -> dict:
    d = json.loads(Path(path).read_text())
    if d.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: not a bench results file (schema {d.get('schema')!r})")
    d["_path"] = str(path)
    return d


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
    latest: dict[str, dict] = {}
    for p in results_files(results_dir):
        r = load_results(p)
        latest[r["suite"]] = r  # later files overwrite earlier ones
    return latest


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


def _delta_pp(v, ref) -> str:
    if v is None or ref is None:
        return "—"
    return f"{100 * (v - ref):+.2f}"


def _lat(cell: dict, key: str) -> str:
    lat = (cell.get("latency") or {}).get(key)
    if not lat:
        return "—"
    ms = f"{lat['ms']:.3g}"
    return f"{ms} (×{lat['ratio']:.2f})" if lat.get("ratio") else ms


def _cells(res: dict, model: str) -> dict[str, dict]:
    return {c["method"]: c for c in res["cells"] if c["model"] == model}


COLUMNS = ["method", "top-1 %", "Δ top-1 (pp)", "top-5 %", "agree %", "MULs (M)", "Δ MULs",
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
        if c["status"] != "ok":
            label += f" ({c['status']}†)"
            for e in c.get("errors", []):
                notes.append(f"† `{key}` {c['status']}: {e}")
        if c["kind"] == "original":
            d_top1 = "0 (ref)" if c.get("top1") is not None else "—"
        else:
            d_top1 = _delta_pp(c.get("top1"), o_top1)
        row = [
            label, _pct(c.get("top1")), d_top1, _pct(c.get("top5")),
            _pct(c.get("agreement")) if c["kind"] != "original" else "—",
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
        "images); *agree* = top-1 agreement with the original model. MULs/ADDs per inference "
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
        "the in-process onnxruntime quantization time.",
    ]


def render_section(res: dict, md_dir: Path, plots: dict[str, Path]) -> list[str]:
    title = res["suite"].capitalize() + " suite"
    m = res.get("machine", {})
    v = res.get("versions", {})
    g = res.get("git", {})
    dur = res.get("duration_s")
    out = [f"## {title}", ""]
    out.append(f"Produced by {_command_line(res)}, started {res.get('started')}"
               + (f", took {dur / 60:.1f} min" if dur is not None else "")
               + ("" if res.get("complete") else " — **run incomplete**") + ".")
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
    out.append(f"- results file: `{rel}`")
    for n in res.get("settings", {}).get("notes", []):
        out.append(f"- {n}")
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
        out.append("")
        lines, notes = model_table(res, key)
        out += lines
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


HEADER = """# Benchmarks

<!-- Generated by `python -m bench.run` (bench/report.py) from bench/results/*.json.
     Do not edit by hand: rerun the benchmark. -->

How to reproduce:

- `make bench` — full suite: ImageNet MobileNetV1 0.5-160, CIFAR-10 MobileNetV1 0.5 and
  ImageNet MobileNetV2 × {original, TWN, StrassenNets r=1/2×, hybrid uniform 50%,
  hybrid MUL budget 0.7/0.536/0.4, onnxruntime int8 PTQ}; sized for about an hour on
  2 CPU cores (cells past the time budget are recorded as skipped).
- `make bench-quick` — quick suite (≤ 10 min): MobileNetV1 0.5-160 × {original, TWN,
  hybrid 0.536, int8 PTQ} with fewer fine-tuning steps.
- `make bench-compare` — differences between the two latest results files.
- `python -m bench.run --help` — options (`--models`, `--methods`, `--steps`,
  `--eval-size`, `--dry-run`, `--matrix FILE`, ...).

Models and data come from `$HFB_SHARED` (default `../shared`); CIFAR-10 is extracted
once into `$HFB_CACHE` (default `~/.cache/hfbconvert`). Every cell runs the `hfbconvert`
CLI (`compress`, `eval`, `export onnx`) as a subprocess. Each section below comes from
the latest results file of its suite and names the command, commit and machine that
produced it; only measured numbers appear in the tables.
"""


def plot_model(res: dict, model: str, path: Path) -> Path | None:
    """top-1 vs MULs and top-1 vs ADDs of one model (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {k: c for k, c in _cells(res, model).items()
             if c.get("status") == "ok" and c.get("top1") is not None}
    if not cells:
        return None
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
            ax.plot([c[metric] / 1e6], [100 * c["top1"]], mk, color=col, label=lab,
                    markersize=11 if hollow else 8, linestyle="none",
                    markerfacecolor="none" if hollow else col, markeredgewidth=1.8,
                    zorder=3 if hollow else 4)
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
    fig.suptitle(f"{case.get('title', model)} — {res['suite']} suite, top-1 on {n} images",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(latest: dict[str, dict], md_path: Path, plots_dir: Path) -> tuple[str, list[Path]]:
    md_dir = md_path.resolve().parent
    written: list[Path] = []
    parts = [HEADER]
    order = [s for s in SECTION_ORDER if s in latest] + sorted(set(latest) - set(SECTION_ORDER))
    if not order:
        parts.append("\n_No results yet: run `make bench-quick` or `make bench`._\n")
    for suite in order:
        res = latest[suite]
        plots = {}
        for case in res["models"]:
            p = plot_model(res, case["key"], plots_dir / f"{suite}-{case['key']}.png")
            if p is not None:
                plots[case["key"]] = p
                written.append(p)
        parts.append("\n".join(render_section(res, md_dir, plots)))
    notes = REPO / "bench" / "ablation.md"  # hand-kept measured ablation, carried over as is
    if notes.exists():
        parts.append("\n" + notes.read_text())
    return "\n".join(parts), written


def write_benchmarks(results_dir: str | Path, md_path: str | Path = REPO / "BENCHMARKS.md",
                     plots_dir: str | Path = REPO / "bench" / "plots") -> list[Path]:
    """Regenerate BENCHMARKS.md (and its plots) from the latest results of each suite."""
    md_path, plots_dir = Path(md_path), Path(plots_dir)
    text, written = render(latest_per_suite(results_dir), md_path, plots_dir)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    return [md_path, *written]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report``: regenerate BENCHMARKS.md without running anything."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--plots", type=Path, default=REPO / "bench" / "plots")
    a = p.parse_args(argv)
    for path in write_benchmarks(a.results, a.markdown, a.plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
