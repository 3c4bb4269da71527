"""The generality table: every architecture hfbconvert defines, through the command path a
user runs (analyze -> compress -> eval -> export onnx with verification), pointwise/linear
layers at the default budget: ``python -m bench.generality``.

Why random weights: most of these families have no reachable ImageNet weights here; pass/fail
and the counts (layers converted, MULs) do not depend on the weights' values, only on the
shapes, so a seeded random-weight instance with 1,000 classes at the family's own resolution
gives the real counts. Each model is a plain state_dict with torchvision's key names (family
detected from the keys, no pickle). Calibration/eval use a few real ImageNet images
(``--steps 0``: no fine-tune). Top-1 appears only where real weights were measured, taken
from the named results files (never from these random instances).

Writes ``bench/results/generality.json`` and ``bench/generality.md`` (the BENCHMARKS.md
section; ``--markdown`` also splices it into BENCHMARKS.md between its markers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .cases import REPO, shared_dir
from .measure import run_cli
from .run import _git, machine_info, versions, write_json

# (table name, hfbconvert family or variant, constructor overrides, resolution or None)
ARCHS: list[tuple[str, str, dict, int | None]] = [
    ("MobileNetV1 0.5", "mobilenet_v1", {"width_mult": 0.5}, 160),
    ("MobileNetV2 1.0", "mobilenet_v2", {"width_mult": 1.0}, 224),
    ("MobileNetV3-Small", "mobilenet_v3_small", {}, None),
    ("MobileNetV3-Large", "mobilenet_v3_large", {}, None),
    ("EfficientNet-B0", "efficientnet_b0", {}, None),
    ("EfficientNet-Lite0", "efficientnet_lite0", {}, None),
    ("MnasNet 1.0", "mnasnet1_0", {}, None),
    ("ShuffleNetV2 x1.0", "shufflenet_v2_x1_0", {}, None),
    ("ResNet-18", "resnet18", {}, None),
    ("ResNet-50", "resnet50", {}, None),
]
BUDGET = "0.536"
# Top-1 of real weights, before -> after at budget 0.536: (results file glob, model key,
# "before" method, "after" method). The newest matching file wins.
REAL = {
    "MobileNetV1 0.5": ("*-full.json", "v1-0.5-160", "original", "hybrid-0.536"),
    "MobileNetV2 1.0": ("*-full.json", "v2", "original", "hybrid-0.536"),
    "EfficientNet-Lite0": ("*-lite0.json", "efficientnet-lite0", "original", "hybrid-0.536"),
    "MobileNetV3-Small": ("*-cifar10-v3-small.json", "cifar10-v3-small", "original",
                          "hybrid-0.536"),
}
STEPS = ("analyze", "compress", "eval", "export", "verify")


def random_state_dict(family: str, over: dict, path: Path, seed: int) -> None:
    """A seeded random-weight instance (BN statistics too, so logits depend on the input)."""
    from hfbconvert.models import families
    from hfbconvert.models.loading import ARCHS as CLASSES

    fam, cfg = families.resolve(family)
    torch.manual_seed(seed)
    m = CLASSES[fam](**{**cfg, **over}).eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
    torch.save(m.state_dict(), path)


def real_top1(results_dir: Path, name: str) -> dict | None:
    spec = REAL.get(name)
    if spec is None:
        return None
    pattern, key, before, after = spec
    for path in sorted(results_dir.glob(pattern), reverse=True):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cells = {c["method"]: c for c in res.get("cells", []) if c.get("model") == key}
        a, b = cells.get(before, {}).get("top1"), cells.get(after, {}).get("top1")
        if a is not None and b is not None:
            return {"before": a, "after": b, "results": path.name, "model": key,
                    "steps": next((m.get("steps") for m in res.get("models", [])
                                   if m.get("key") == key), None)}
    return None


def run_arch(name: str, family: str, over: dict, res: int | None, work: Path, calib: str,
             val: str, n_calib: int, n_eval: int, timeout: float, seed: int) -> dict:
    model = work / f"{family}.pt"
    random_state_dict(family, over, model, seed)
    logs = work / "logs" / family
    row: dict = {"name": name, "family": family, "resolution": res, "budget": float(BUDGET),
                 "status": {s: "not run" for s in STEPS}, "errors": [], "commands": {}}
    resolution = ["--resolution", str(res)] if res else []
    calib_args = ["--calib", calib, "--calib-size", str(n_calib), "--seed", str(seed)]

    def step(key: str, args: list[str]):
        t0 = time.perf_counter()
        r = run_cli(key, args, logs, timeout)
        row["commands"][key] = shlex.join(["hfbconvert", *map(str, args)])
        row.setdefault("wall_s", {})[key] = round(time.perf_counter() - t0, 1)
        if r.ok():
            row["status"][key] = "pass"
            return r.json
        row["status"][key] = "fail"
        row["errors"].append(r.error())
        return None

    an = step("analyze", ["analyze", str(model), *resolution, *calib_args, "--json", "-q"])
    share = None
    if an is not None:
        row["analyze_layers"] = len(an.get("layers", []))
        share = row["pointwise_mul_share"] = an.get("pointwise_mul_share")
        row["resolution_used"] = (an.get("model") or {}).get("resolution")
    out = work / f"{family}.hfb.pt"

    def compress(budget: str):
        return step("compress", ["compress", str(model), *resolution, *calib_args, "--steps",
                                 "0", "--budget", budget, "--min-agreement", "0", "-o",
                                 str(out), "--force", "--json", "-q"])

    comp = compress(BUDGET)
    if comp is None and share:
        # e.g. ResNets: 3x3 convs hold most MULs, so 0.536 of the whole model is out of reach
        # for pointwise banks. Retry with the same cut of the pointwise MULs (46.4%), noted.
        budget = f"{1 - (1 - float(BUDGET)) * share + 0.002:.3f}"
        row["errors"].append(f"at --budget {BUDGET}; retried at --budget {budget}")
        comp = compress(budget)
        row["budget"] = float(budget)
    if comp is None:
        return row
    from hfbconvert.artifact import load_compressed_meta

    _, meta = load_compressed_meta(out)
    plan = meta["plan"]["layers"]
    row["layers_planned"] = len(plan)
    row["layers_converted"] = sum(1 for lp in plan if lp["n_critical"] < lp["c_out"])
    row["muls_before"] = int(comp["original_cost"]["muls"])
    row["muls_after"] = int(comp["cost"]["muls"])
    row["adds_before"] = int(comp["original_cost"]["adds"])
    row["adds_after"] = int(comp["cost"]["adds"])
    row["muls_saved"] = 1 - row["muls_after"] / row["muls_before"]
    ev = step("eval", ["eval", str(out), "--data", val, "--data-size", str(n_eval),
                       "--original", str(model), "--seed", str(seed), "--json", "-q"])
    if ev is not None:
        row["agreement_random_weights"] = ev.get("agreement")
    exp = step("export", ["export", "onnx", str(out), "-o", str(work / f"{family}.onnx"),
                          "--calib", calib, "--calib-size", "8", "--force", "--json", "-q",
                          "--no-report"])
    if exp is not None:
        v = exp.get("verify") or {}
        row["status"]["verify"] = "pass" if v.get("passed") else "fail"
        row["verify_max_rel_diff"] = v.get("max_rel_diff")
        row["onnx_bytes"] = (exp.get("export") or {}).get("bytes")
        if not v.get("passed"):
            row["errors"].append(f"verify: {v}")
    return row


def markdown(res: dict) -> str:
    def mark(s: str) -> str:
        return {"pass": "✓", "fail": "✗"}.get(s, "–")

    lines = [
        "## Generality: every architecture through the command path",
        "",
        f"Generated by `{res['command']}` into `bench/results/generality.json` "
        f"({res['finished']}, commit {(res['git'].get('commit') or '?')[:10]}). "
        "Seeded random-weight instances (torchvision key names, 1,000 classes, the family's "
        f"own resolution), pointwise 1x1 + linear layers, `--budget {BUDGET} --steps 0`, "
        f"{res['settings']['calib']} real ImageNet calibration images, eval on "
        f"{res['settings']['eval']} val images against the original, ONNX export verified "
        "by onnxruntime (*rel diff*: max|Δlogit| / max|logit|; it passes at ≤ 1e-4 or, where "
        "the model's own float32 rounding is larger, within 8× PyTorch's float32 − float64 "
        "gap: random-weight logits can be a small difference of large values). Counts "
        "depend on shapes only; top-1 is given only where real weights were measured "
        "(results file named).",
        "",
        "| architecture | px | analyze | compress | eval | export | verify (rel diff) "
        "| pointwise MUL share | layers converted | MULs before → after (saved) "
        "| ADDs after / before | top-1 before → after (real weights) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        st = r["status"]
        layers = (f"{r['layers_converted']} / {r['layers_planned']}"
                  if "layers_converted" in r else "–")
        muls = (f"{r['muls_before'] / 1e6:.1f}M → {r['muls_after'] / 1e6:.1f}M "
                f"({100 * r['muls_saved']:.1f}%)" if "muls_saved" in r else "–")
        if r["budget"] != float(BUDGET):
            muls += f" at budget {r['budget']:g}"
        share = r.get("pointwise_mul_share")
        pw = "–" if share is None else f"{100 * share:.0f}%"
        rel = r.get("verify_max_rel_diff")
        verify = mark(st["verify"]) + ("" if rel is None else f" ({rel:.1e})")
        adds = (f"{r['adds_after'] / r['adds_before']:.3f}×" if r.get("adds_before") else "–")
        t = r.get("top1_real")
        top = (f"{100 * t['before']:.2f} → {100 * t['after']:.2f} ({t['results']})"
               if t else "–")
        lines.append(f"| {r['name']} | {r['resolution'] or r.get('resolution_used', '')} | "
                     + " | ".join(mark(st[s]) for s in STEPS[:-1])
                     + f" | {verify} | {pw} | {layers} | {muls} | {adds} | {top} |")
    errs = [(r["name"], e) for r in res["rows"] for e in r["errors"]]
    if errs:
        lines += ["", "Failures:", ""] + [f"- {n}: `{e[:300]}`" for n, e in errs]
    lines.append("")
    return "\n".join(lines)


START, END = "<!-- generality:start -->", "<!-- generality:end -->"


def splice(md_path: Path, section: str) -> None:
    """Replace the section between the markers, or append it (a localized edit)."""
    text = md_path.read_text() if md_path.exists() else ""
    block = f"{START}\n{section}{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(md_path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.generality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated families/variants to run")
    p.add_argument("--calib-size", type=int, default=32, help="real calibration images")
    p.add_argument("--eval-size", type=int, default=64, help="real val images for eval")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command")
    p.add_argument("--seed", type=int, default=0, help="weights and subsets")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generality.json",
                   help="results JSON")
    p.add_argument("--section", type=Path, default=REPO / "bench" / "generality.md",
                   help="generated markdown section")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also splice the section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the markdown from the existing --out results file")
    args = p.parse_args(argv)
    if args.render:
        section = markdown(json.loads(args.out.read_text()))
        args.section.write_text(section)
        if args.markdown is not None:
            splice(args.markdown, section)
        print(f"wrote {args.section} from {args.out}")
        return 0
    shared = shared_dir()
    calib, val = shared / "data/imagenet/calib", shared / "data/imagenet/val"
    if not calib.is_dir() or not val.is_dir():
        print(f"skipped: {calib} or {val} not found (set HFB_SHARED)")
        return 0
    only = set(args.only.split(",")) if args.only else None
    archs = [a for a in ARCHS if only is None or a[1] in only]
    res: dict = {"schema_version": 1,
                 "command": shlex.join(["python", "-m", "bench.generality", *argv]),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "finished": None, "machine": machine_info(), "versions": versions(),
                 "git": _git(), "settings": {"budget": float(BUDGET), "calib": args.calib_size,
                                             "eval": args.eval_size, "seed": args.seed,
                                             "steps": 0},
                 "rows": []}
    with tempfile.TemporaryDirectory(prefix="hfb-generality-") as tmp:
        for name, family, over, r in archs:
            t0 = time.perf_counter()
            row = run_arch(name, family, over, r, Path(tmp), str(calib), str(val),
                           args.calib_size, args.eval_size, args.timeout, args.seed)
            row["top1_real"] = real_top1(args.out.parent, name)
            row["total_s"] = round(time.perf_counter() - t0, 1)
            res["rows"].append(row)
            print(f"{name:<20} " + " ".join(f"{s}:{row['status'][s]}" for s in STEPS)
                  + f"  {row.get('layers_converted', '-')} layers, MULs saved "
                  + (f"{100 * row['muls_saved']:.1f}%" if "muls_saved" in row else "-")
                  + f"  {row['total_s']:.0f} s", flush=True)
            for e in row["errors"]:
                print(f"    {e}", flush=True)
            write_json(args.out, res)
    res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(args.out, res)
    section = markdown(res)
    args.section.write_text(section)
    if args.markdown is not None:
        splice(args.markdown, section)
    print(f"wrote {args.out}, {args.section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
