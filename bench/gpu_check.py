"""End-to-end check of the CUDA path: ``compress --device cuda`` against the same command on
the CPU, on MobileNetV1-0.5-160 with the shared calibration images. It compares the plan
(must be identical: planning runs the same float64 statistics), the held-apart agreement,
the fine-tuned weights (float tolerance) and the wall time of each run, and writes
bench/results/gpu-check.json. Without CUDA it says so and exits 0 (no test depends on a GPU).

With ``--smoke`` (the default) it then runs every other heavy command on the device once,
each in a fresh process, and records exit status, wall time and its key figures: analyze,
compress with int8 activations and gptq rounding (input moments on the device), synthetic
calibration, finetune, eval (the CPU artifact on the device against on the CPU: top-1 and
agreement within --agreement-tol), export onnx (verification inputs), and compress under
``torchrun`` with one process (nccl on CUDA, gloo on the CPU).

    HFB_SHARED=/work/shared python -m bench.gpu_check                # defaults below
    python -m bench.gpu_check --calib-size 500 --steps 100 --out bench/results/gpu-check.json
    python -m bench.gpu_check --render     # BENCHMARKS.md's section from the results files

Exit 0: checks passed, or no CUDA (skipped); 1: a check failed; 2: inputs missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = os.environ.get("HFB_SHARED", "../shared")


def _run(args: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """One ``compress --json`` in a fresh process (its own CUDA context), timed."""
    cmd = [sys.executable, "-m", "hfbconvert.cli", "compress", *args, "-o", str(out), "--json",
           "--min-agreement", "0"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(cmd)} exited {res.returncode}: "
                         f"{res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout), wall


def _smoke_step(name: str, cmd: list[str], env: dict[str, str] | None = None
                ) -> dict[str, Any]:
    """One command in a fresh process: exit status, wall time, its JSON (when it printed
    one) and its last stderr line (the one-line error of a failure)."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    step: dict[str, Any] = {"name": name, "rc": res.returncode,
                            "wall_s": round(time.perf_counter() - t, 2)}
    out = res.stdout
    if "{" in out:
        try:
            step["json"] = json.loads(out[out.index("{"):])
        except ValueError:
            pass
    err = res.stderr.strip().splitlines()
    if res.returncode != 0 and err:
        step["error"] = err[-1][:300]
    print(f"smoke: {name}: exit {res.returncode} in {step['wall_s']} s"
          + (f": {step['error']}" if "error" in step else ""), file=sys.stderr, flush=True)
    return step


def _bn_model(model: str, work: Path) -> str:
    """``model`` when it has BatchNorm statistics (synthetic calibration needs them), else
    a freshly initialized MobileNetV2 state_dict (torchvision keys) written to ``work``."""
    import torch

    from hfbconvert.calib.synthetic import bn_layers
    from hfbconvert.models.loading import ARCHS, load_model

    if bn_layers(load_model(model)[0]):  # what synthetic calibration itself checks
        return model
    torch.manual_seed(0)
    path = work / "mobilenet_v2_random.pt"
    torch.save(ARCHS["mobilenet_v2"]().state_dict(), path)
    return str(path)


def smoke(model: str, calib: str, calib_size: int, device: str, cpu_artifact: Path,
          dev_artifact: Path, work: Path, tol: float) -> dict[str, Any]:
    """Every other heavy command once on ``device`` (see the module docstring)."""
    cli = [sys.executable, "-m", "hfbconvert.cli"]
    dev = ["--device", device, "--seed", "0"]
    n = str(min(calib_size, 500))
    analyzed = _smoke_step("analyze", [*cli, "analyze", model, "--calib", calib,
                                       "--calib-size", "256", "--json", *dev])
    if "json" in analyzed:  # the per-filter losses are not this file's business
        j = analyzed["json"]
        analyzed["json"] = {"layers": len(j.get("layers", [])),
                            "activation_aware": j.get("activation_aware"),
                            "first_ranking": (j.get("layers") or [{}])[0].get("ranking", [])[:8]}
    steps = [
        analyzed,
        _smoke_step("compress int8 gptq", [
            *cli, "compress", model, "--calib", calib, "--calib-size", n,
            "--activation-bits", "8", "--weight-rounding", "gptq", "--steps", "20",
            "--min-agreement", "0", "-o", str(work / "int8.hfb.pt"), "--json", "-q", *dev]),
        _smoke_step("compress synthetic calibration", [
            *cli, "compress", _bn_model(model, work), "--calib", "synthetic:32", "--steps", "0",
            "--min-agreement", "0", "-o", str(work / "syn.hfb.pt"), "--json", "-q", *dev]),
        _smoke_step("finetune", [
            *cli, "finetune", str(cpu_artifact), "--data", calib, "--data-size", n,
            "--epochs", "1", "--eval-every", "10", "-o", str(work / "ft.hfb.pt"), "--json",
            "-q", *dev]),
        _smoke_step("export onnx", [
            *cli, "export", "onnx", str(dev_artifact), "-o", str(work / "m.onnx"),
            "--calib", calib, "--calib-size", "16", "--no-report", "--json", "-q", *dev]),
    ]
    evals = {d: _smoke_step(f"eval on {d}", [
        *cli, "eval", str(cpu_artifact), "--data", calib, "--data-size", n, "--json",
        "--device", d, "--seed", "0"]) for d in ("cpu", device)}
    steps += list(evals.values())
    env = dict(os.environ, MASTER_PORT="29541")
    steps.append(_smoke_step("compress under torchrun (1 process)", [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--master_port", "29541", "-m", "hfbconvert.cli", "compress", model, "--calib", calib,
        "--calib-size", n, "--steps", "20", "--min-agreement", "0",
        "-o", str(work / "ddp.hfb.pt"), "--json", "-q", *dev], env=env))
    checks = {s["name"]: s["rc"] == 0 for s in steps}
    ev = [evals[d].get("json") or {} for d in ("cpu", device)]
    checks["eval top-1/agreement same on both devices"] = all(
        e.get(k) is not None for e in ev for k in ("top1", "agreement")) and all(
        abs(ev[0][k] - ev[1][k]) <= tol for k in ("top1", "agreement"))
    return {"steps": steps, "checks": checks, "passed": all(checks.values())}


def _plan_key(meta: dict[str, Any]) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(lp["name"], int(lp["r"]), tuple(lp.get("critical_idx") or []))
            for lp in meta["plan"]["layers"]]


RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- generated:gpu-check -->", "<!-- /generated -->"


def render(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The BENCHMARKS.md section from the results files ``(name, result)``."""
    lines = ["## CUDA check: `--device cuda` against the CPU on one machine", "",
             "`python -m bench.gpu_check` on a GPU machine: the same `compress` (MobileNetV1-"
             "0.5-160, seed 0) with `--device cpu` and `--device cuda` in fresh processes, "
             "then every other heavy command once on the GPU (`--smoke`). One run each: "
             "wall times are single measurements.", "",
             "| results file | code | device | same plan | max rel. weight diff | agreement "
             "cpu / cuda | compress wall cpu / cuda (s) | fine-tune cpu / cuda (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        t = r["timings"]
        lines.append(
            f"| `{name}` | {r.get('code_commit', '?')} | {r['device']} | "
            f"{'yes' if r['checks']['same_plan'] else '**no**'} | "
            + (f"{r['max_rel_weight_diff']:.2g}" if r["checks"]["same_plan"]
               else "— (other layers)")
            + f" | {r['agreement']['cpu']} / "
            f"{r['agreement']['cuda']} | {r['wall_s']['cpu']:.1f} / {r['wall_s']['cuda']:.1f}"
            f" | {t['cpu'].get('finetune_s', float('nan')):.1f} / "
            f"{t['cuda'].get('finetune_s', float('nan')):.1f} |")
    lines += [""] + [f"- `{name}`: {r['note']}" for name, r in runs if r.get("note")]
    names = [st["name"] for _, r in runs if r.get("smoke") for st in r["smoke"]["steps"]]
    order = list(dict.fromkeys(names))
    if order:
        lines += ["", "Smoke steps on the GPU (exit status, wall seconds of the whole command):",
                  "", "| step | " + " | ".join(f"`{n}`" for n, r in runs if r.get("smoke"))
                  + " |", "|---|" + "---|" * sum(1 for _, r in runs if r.get("smoke"))]
        for step in order:
            cells = []
            for _, r in runs:
                if not r.get("smoke"):
                    continue
                st = next((x for x in r["smoke"]["steps"] if x["name"] == step), None)
                cells.append("—" if st is None else
                             f"exit {st['rc']}, {st['wall_s']:.1f} s" if st["rc"] == 0 else
                             f"**exit {st['rc']}**: {st.get('error', '')[:90]}")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_section(md: Path) -> None:
    """Regenerate the ``gpu-check`` block of ``md`` from bench/results/gpu-check*.json."""
    from bench.rss import splice

    runs = [(p.name, json.loads(p.read_text()))
            for p in RESULTS.glob("gpu-check*.json")]
    runs.sort(key=lambda nr: nr[1].get("measured_utc", ""))  # oldest first
    splice(md, render(runs), START, END)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--calib-size", type=int, default=1000)
    ap.add_argument("--steps", default="100", help="fine-tune steps of both runs")
    ap.add_argument("--weight-tol", type=float, default=1e-2,
                    help="max relative difference of any fine-tuned weight tensor")
    ap.add_argument("--agreement-tol", type=float, default=0.01)
    ap.add_argument("--out", default="bench/results/gpu-check.json")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=True,
                    help="then run analyze/int8 compress/synthetic/finetune/eval/export/"
                         "torchrun once each on the device")
    ap.add_argument("--against", default="cuda",
                    help="device compared with the CPU run ('cpu' exercises this script "
                         "without a GPU)")
    ap.add_argument("--render", action="store_true",
                    help="only regenerate the BENCHMARKS.md section from the results files")
    a = ap.parse_args(argv)
    if a.render:
        write_section(RESULTS.parent.parent / "BENCHMARKS.md")
        return 0

    import torch

    if a.against == "cuda" and not torch.cuda.is_available():
        print("no CUDA: skipped (bench/gpu_check.py checks the --device cuda path on a GPU "
              "machine)")
        return 0
    for p in (a.model, a.calib):
        if not Path(p).exists():
            print(f"error: {p}: not found (set HFB_SHARED)", file=sys.stderr)
            return 2
    from hfbconvert.artifact import load_compressed

    common = [a.model, "--calib", a.calib, "--calib-size", str(a.calib_size), "--steps",
              a.steps, "--seed", "0", "-q"]
    with tempfile.TemporaryDirectory() as d:
        runs = {}
        for key, dev in (("cpu", "cpu"), ("cuda", a.against)):
            out = Path(d) / f"{key}.hfb.pt"
            summary, wall = _run([*common, "--device", dev], out)
            print(f"compress --device {dev}: {wall:.1f} s, agreement "
                  f"{summary['final_agreement']}", file=sys.stderr, flush=True)
            model, _, meta = load_compressed(out)
            runs[key] = {"summary": summary, "wall_s": wall, "meta": meta,
                         "state": model.state_dict()}
        smoked = (smoke(a.model, a.calib, a.calib_size, a.against, Path(d) / "cpu.hfb.pt",
                        Path(d) / "cuda.hfb.pt", Path(d), a.agreement_tol)
                  if a.smoke else None)
    cpu, gpu = runs["cpu"], runs["cuda"]
    same_plan = _plan_key(cpu["meta"]) == _plan_key(gpu["meta"])
    rel = 0.0
    for k, v in cpu["state"].items():
        w = gpu["state"][k]
        if v.is_floating_point():
            rel = max(rel, float((v.double() - w.double()).norm()
                                 / v.double().norm().clamp_min(1e-30)))
        elif not torch.equal(v, w):
            rel = max(rel, float("inf"))
    ag_cpu = cpu["summary"]["final_agreement"]
    ag_gpu = gpu["summary"]["final_agreement"]
    checks = {"same_plan": same_plan, "weights_within_tol": rel <= a.weight_tol,
              "agreement_within_tol": ag_cpu is not None and ag_gpu is not None
              and abs(ag_cpu - ag_gpu) <= a.agreement_tol}
    result = {
        "command": "python -m bench.gpu_check " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if a.against == "cuda" else a.against,
        "torch": str(torch.__version__),
        "model": a.model, "calib": a.calib, "calib_size": a.calib_size, "steps": a.steps,
        "agreement": {"cpu": ag_cpu, "cuda": ag_gpu},
        "max_rel_weight_diff": rel,
        "wall_s": {"cpu": round(cpu["wall_s"], 2), "cuda": round(gpu["wall_s"], 2)},
        "timings": {"cpu": cpu["summary"]["timings"], "cuda": gpu["summary"]["timings"]},
        "checks": checks, "smoke": smoked,
        "passed": all(checks.values()) and (smoked is None or smoked["passed"])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: result[k] for k in ("device", "agreement", "max_rel_weight_diff", "wall_s",
                                    "checks", "passed")}
    if smoked is not None:
        brief["smoke"] = {s["name"]: {k: s[k] for k in ("rc", "wall_s", "error") if k in s}
                          for s in smoked["steps"]}
        brief["smoke_checks"] = smoked["checks"]
    print(json.dumps(brief, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
