"""Run a benchmark suite: ``python -m bench.run --suite quick|full``.

Every cell runs the hfbconvert CLI as a subprocess (see bench/measure.py); results go
to ``<out>/<timestamp>-<suite>.json`` (rewritten after every cell, so a run that is
stopped keeps what it measured) and BENCHMARKS.md + plots are regenerated at the end.
A failing cell is recorded with its error; it does not stop the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from . import RESULTS_SCHEMA
from .cases import (
    METHODS,
    REPO,
    RUN_PRIORITY,
    SUITES,
    TABLE_ORDER,
    Method,
    ModelCase,
    case_from_dict,
    resolve,
)
from .measure import ModelContext, run_cell

DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_MD = REPO / "BENCHMARKS.md"
DEFAULT_PLOTS = REPO / "bench" / "plots"


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--matrix", type=Path, default=None,
                   help="JSON file with a custom matrix {name, models: [...], methods: [...]} "
                        "instead of a built-in suite")
    p.add_argument("--models", default=None, help="comma-separated model keys to keep")
    p.add_argument("--methods", default=None, help="comma-separated method keys to run "
                   "instead of the suite's (the original is always measured: it is every "
                   f"cell's reference); known: {', '.join(METHODS)}")
    p.add_argument("--steps", type=lambda v: v if v == "auto" else int(v), default=None,
                   help="fine-tuning steps for every cell (N or auto)")
    p.add_argument("--eval-size", type=int, default=None, help="seeded eval subset per model")
    p.add_argument("--calib-size", type=int, default=None, help="calibration images per model")
    p.add_argument("--split", choices=("eval", "tune"), default="eval",
                   help="images every figure is measured on: 'eval' (the evaluation split, "
                        "once per reported figure) or 'tune' (the tuning split held apart "
                        "from calibration, for any choice made by measurement; "
                        "bench/splits.py)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="calibration seeds (`compress --seed`): every compressed cell runs "
                        "once per seed (default: the suite's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MD, help="BENCHMARKS.md to write")
    p.add_argument("--plots", type=Path, default=DEFAULT_PLOTS, help="plots folder")
    p.add_argument("--no-report", action="store_true", help="results JSON only")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes; cells that would start later are recorded as skipped and "
                        "a running one is stopped (default: the suite's; 0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads for the latency runs (default: the "
                        "suite's; 0: all CPUs)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="OMP/MKL threads of the hfbconvert subprocesses (default: the "
                        "suite's; 0: torch's own choice)")
    p.add_argument("--latency-repeats", default=None, metavar="B1,B32",
                   help="timed runs at batch 1 and 32 (default: the suite's)")
    p.add_argument("--keep-artifacts", action="store_true",
                   help="keep .hfb.pt/.onnx files under <out>/tmp/<run>/")
    p.add_argument("--dry-run", action="store_true", help="print the matrix and commands; stop")
    return p


# ------------------------------------------------------------------------ matrix


def _method(entry) -> Method:
    """A method key, or a ``--matrix`` method object {key, label, kind, args, family}."""
    if isinstance(entry, str):
        if entry not in METHODS:
            raise SystemExit(f"unknown method {entry!r}; choose from {', '.join(METHODS)}")
        return METHODS[entry]
    d = dict(entry)
    d["args"] = tuple(d.get("args", ()))
    d.setdefault("label", d.get("key"))
    if d.get("kind") not in ("original", "compress", "int8"):
        raise SystemExit(f"method {d.get('key')!r}: kind must be original, compress or int8")
    return Method(**d)


def plan(args: argparse.Namespace) -> tuple[str, list[ModelCase], dict[str, list[Method]], dict]:
    """(suite name, model cases, methods per model in run order, suite settings)."""
    if args.matrix is not None:
        spec = json.loads(args.matrix.read_text())
        name = str(spec.get("name", "custom"))
        cases = [case_from_dict(d) for d in spec["models"]]
        meth = spec.get("methods", TABLE_ORDER)
        methods = {c.key: [_method(m) for m in (meth if isinstance(meth, list) else meth[c.key])]
                   for c in cases}
        settings = {"time_budget_min": float(spec.get("time_budget_min", 0)),
                    "latency_repeats": list(spec.get("latency_repeats", [10, 3])),
                    "notes": list(spec.get("notes", [])),
                    "torch_threads": spec.get("torch_threads"),
                    "threads": spec.get("threads", 0),
                    "seeds": [int(x) for x in spec.get("seeds", [0])]}
    else:
        suite = SUITES[args.suite]
        name = suite.name
        cases = suite.model_cases()
        methods = {c.key: [METHODS[k] for k in suite.methods[c.key]] for c in cases}
        settings = {"time_budget_min": suite.time_budget_min,
                    "latency_repeats": list(suite.latency_repeats), "notes": list(suite.notes),
                    "torch_threads": suite.torch_threads, "threads": suite.ort_threads,
                    "seeds": list(suite.seeds)}
    keep_models = _csv(args.models)
    if keep_models:
        unknown = set(keep_models) - {c.key for c in cases}
        if unknown:
            raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(c.key for c in cases)}")
        cases = [c for c in cases if c.key in keep_models]
    keep_methods = _csv(args.methods)
    rank = {k: i for i, k in enumerate(RUN_PRIORITY)}
    for c in cases:
        ms = methods[c.key]
        if keep_methods:
            known = {m.key for m in ms} | set(METHODS)
            unknown = set(keep_methods) - known
            if unknown:
                raise SystemExit(f"--methods: unknown {', '.join(sorted(unknown))}; "
                                 f"choose from {', '.join(sorted(known))}")
            by_key = {m.key: m for m in ms}  # any known method may be asked for
            ms = [by_key.get(k) or METHODS[k] for k in dict.fromkeys(keep_methods)]
        if not any(m.kind == "original" for m in ms):
            ms = [METHODS["original"], *ms]  # every cell's reference
        methods[c.key] = sorted(ms, key=lambda m: rank.get(m.key, len(rank)))
    over = {k: v for k, v in (("steps", args.steps), ("eval_size", args.eval_size),
                              ("calib_size", args.calib_size)) if v is not None}
    cases = [replace(c, **over) for c in cases]
    if args.time_budget is not None:
        settings["time_budget_min"] = args.time_budget
    if args.latency_repeats:
        b1, b32 = (int(x) for x in args.latency_repeats.split(","))
        settings["latency_repeats"] = [b1, b32]
    if args.threads is not None:
        settings["threads"] = args.threads
    settings["threads"] = settings["threads"] or os.cpu_count() or 1  # 0: all CPUs
    if args.torch_threads is not None:
        settings["torch_threads"] = args.torch_threads or None  # 0: torch's default
    if args.seeds:
        settings["seeds"] = [int(x) for x in _csv(args.seeds) or []] or [0]
    settings["split"] = args.split
    return name, cases, methods, settings


def schedule(cases: list[ModelCase], methods: dict[str, list[Method]],
             seeds: list[int] | tuple[int, ...] = (0,)) -> list[tuple[ModelCase, Method, int]]:
    """(case, method, seed) in run order: model by model (the suite's order: the headline
    model first), the seed-independent cells first, then the compressed cells seed by seed,
    methods by priority, so that a run cut short by its time budget loses whole later
    seeds and the least informative cells."""
    out = []
    for c in cases:
        out += [(c, m, 0) for m in methods[c.key] if m.kind != "compress"]
        out += [(c, m, s) for s in seeds for m in methods[c.key] if m.kind == "compress"]
    return out


def model_splits(case: ModelCase, calib: str, eval_data: str, split: str) -> tuple[
        str, str, dict]:
    """(calibration path, evaluation path, split records) of one model: calibration
    reads the calibration folder minus its tuning split, evaluation reads the tuning split
    (``split`` 'tune') or the evaluation folder ('eval')."""
    from .splits import calib_splits

    records: dict = {}
    if case.tune_size and Path(calib).is_dir():
        cal, tune = calib_splits(calib, case.tune_size)
        records["calibration"] = cal.record()
        records["tuning"] = tune.record()
        calib = str(cal.path)
        if split == "tune":
            eval_data = str(tune.path)
    elif split == "tune":
        raise ValueError(f"{calib}: no tuning split (needs a calibration folder and the "
                         "model case's tune_size)")
    return calib, eval_data, records


def eval_record(ctx: ModelContext, split: str) -> dict:
    """The images the model's figures came from: the files `hfbconvert eval` reads (same
    folder, subset and seed), named relative to the split's folder."""
    from .splits import list_sha256

    root = Path(ctx.eval_data)
    files = ctx.eval_images().files
    names = [Path(f).relative_to(root).as_posix() if Path(f).is_relative_to(root) else f
             for f in files]
    return {"name": split, "source": str(root), "n": len(names),
            "list_sha256": list_sha256(names), "seed": 0, "size": ctx.case.eval_size}


# ------------------------------------------------------------------------ environment


def _git() -> dict:
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import hfbconvert

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None,
            "describe": git("log", "-1", "--format=%h %s") or None,
            "dirty": bool(status),
            "code": str(Path(hfbconvert.__file__).resolve().parent.parent)}


def _pinned_env() -> dict[str, str]:
    """The CLI cells' environment, with this checkout first on PYTHONPATH: an editable
    install points ``hfbconvert`` at whichever tree it was installed from, so a run from
    a clone would otherwise record the clone's commit and measure another tree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def machine_info() -> dict:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count()
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "cpus_allowed": allowed, "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    import hfbconvert

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "numpy": numpy.__version__, "hfbconvert": hfbconvert.__version__}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------ main


def _print_cell(cell: dict) -> None:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.2f}"

    muls = cell.get("muls")
    lat = (cell.get("latency") or {}).get("b1") or {}
    ratio = lat.get("ratio")
    status = cell["status"] if cell["status"] != "ok" else ""
    name = cell["method"] + (f" s{cell['seed']}" if "seed" in cell else "")
    print(f"  {name:<20} top-1 {pct(cell.get('top1'))}  agree "
          f"{pct(cell.get('agreement'))}  MULs "
          f"{'-' if muls is None else f'{muls / 1e6:7.2f}M'}  "
          f"b1 x{'-' if ratio is None else f'{ratio:.2f}'}  "
          f"{cell.get('cell_wall_s', 0):6.0f} s  {status}", flush=True)
    for e in cell.get("errors", []):
        print(f"      error: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    name, cases, methods, settings = plan(args)
    command = shlex.join(["python", "-m", "bench.run", *argv])

    if args.dry_run:
        print(f"suite {name}: {len(cases)} model(s), time budget "
              f"{settings['time_budget_min'] or 'none'} min, threads: hfbconvert "
              f"{settings.get('torch_threads') or 'default'}, onnxruntime {settings['threads']}"
              f"; split {settings['split']}, seeds {settings['seeds']}")
        for c in cases:
            print(f"\n{c.key}: {c.title}\n  model {c.model}\n  calib {c.calib} "
                  f"(n={c.calib_size or 'all'})  eval {c.eval_data} (n={c.eval_size or 'all'})"
                  f"  steps {c.steps}")
            for m in methods[c.key]:
                print(f"  - {m.key:<20} {m.kind:<9} {' '.join(m.args)}")
        return 0

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out / f"{stamp}-{name}.json"
    work = args.out / "tmp" / stamp
    budget_s = float(settings["time_budget_min"] or 0) * 60
    t_start = time.monotonic()
    deadline = t_start + budget_s if budget_s > 0 else None

    results: dict = {
        "schema": RESULTS_SCHEMA, "suite": name, "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None, "complete": False, "duration_s": None,
        "machine": machine_info(), "load_avg_start": _load(), "versions": versions(),
        "git": _git(), "settings": settings,
        "models": [dict(c.to_dict(), methods=[m.key for m in methods[c.key]]) for c in cases],
        "methods": {m.key: m.to_dict() for ms in methods.values() for m in ms},
        "cells": [],
    }
    n_cells = len(schedule(cases, methods, settings["seeds"]))
    print(f"bench: suite {name}, {n_cells} cells, results -> "
          f"{out_path}", flush=True)
    write_json(out_path, results)

    env = _pinned_env()
    if settings.get("torch_threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(settings["torch_threads"])
        import torch

        torch.set_num_threads(settings["torch_threads"])
    contexts: dict[str, ModelContext | str] = {}
    split_records: dict[str, dict] = {}
    for c in cases:
        try:
            paths = [resolve(t) for t in (c.model, c.calib, c.eval_data)]
            for p in paths:
                if not p.startswith("builtin:") and not Path(p).exists():
                    raise FileNotFoundError(f"{p}: not found (is HFB_SHARED set?)")
            paths[1], paths[2], split_records[c.key] = model_splits(
                c, paths[1], paths[2], settings["split"])
            contexts[c.key] = ModelContext(
                case=c, model=paths[0], calib=paths[1], eval_data=paths[2], work=work,
                threads=settings["threads"], repeats=tuple(settings["latency_repeats"]),
                keep=args.keep_artifacts, env=env)
        except Exception as exc:  # missing data: every cell of this model fails, not the run
            contexts[c.key] = f"setup: {type(exc).__name__}: {exc}"
    for entry in results["models"]:
        entry["splits"] = split_records.get(entry["key"], {})
    write_json(out_path, results)
    took: dict[str, float] = {}  # longest compress cell so far, per model
    current = None
    for c, m, seed in schedule(cases, methods, settings["seeds"]):
        if c.key != current:
            print(f"\n{c.key}: {c.title}", flush=True)
            current = c.key
        ctx = contexts[c.key]
        stub = {"model": c.key, "method": m.key, "label": m.label, "family": m.family,
                "kind": m.kind, "steps": []}
        if m.kind == "compress":
            stub["seed"] = seed
        left = None if deadline is None else deadline - time.monotonic()
        if isinstance(ctx, str):
            cell = dict(stub, status="failed", errors=[ctx])
        elif left is not None and left <= 0:
            cell = dict(stub, status="skipped", errors=[
                f"not run: suite time budget of {settings['time_budget_min']:g} min spent"])
        elif left is not None and m.kind == "compress" and took.get(c.key, 0) > left:
            cell = dict(stub, status="skipped", errors=[
                f"not run: {left / 60:.1f} min of the {settings['time_budget_min']:g} min "
                f"budget left, a compress cell of this model took {took[c.key] / 60:.1f} min"])
        else:
            cell = run_cell(ctx, m, deadline, seed)
            if m.kind == "original" and cell.get("status") == "ok":
                try:  # which images every figure of this model came from
                    split_records[c.key]["evaluation"] = eval_record(ctx, settings["split"])
                except Exception as exc:  # a record we cannot make must not end the run
                    split_records[c.key]["evaluation"] = {"error": f"{type(exc).__name__}: "
                                                                  f"{exc}"}
            if m.kind == "compress":
                took[c.key] = max(took.get(c.key, 0.0), cell.get("cell_wall_s", 0.0))
        results["cells"].append(cell)
        _print_cell(cell)
        write_json(out_path, results)

    results.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   complete=True, duration_s=round(time.monotonic() - t_start, 1),
                   load_avg_end=_load())
    write_json(out_path, results)
    if not args.keep_artifacts:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        try:
            (args.out / "tmp").rmdir()
        except OSError:
            pass
    print(f"\nwrote {out_path} ({results['duration_s']:.0f} s)")
    if not args.no_report:
        from .report import write_benchmarks, write_readme

        for p in write_benchmarks(args.out, args.markdown, args.plots):
            print(f"wrote {p}")
        if args.out.resolve() == DEFAULT_OUT.resolve() and write_readme(args.out):
            print(f"wrote {REPO / 'README.md'}")
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    if failed:
        print(f"{len(failed)} cell(s) failed; see the errors above and in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
