"""One method's cells against another's, seed by seed and over seeds, paired on the same
images, across results files that the generated tables cannot merge (a rerun of one method
with other settings, e.g. ``bench.run --steps 152``, keeps its method key):

    python -m bench.paired_cells --model v2 --a NEW.json --a-method hybrid-0.536-int8-norm \\
        --b OLD1.json,OLD2.json --b-method hybrid-0.536-int8-norm --ref REF.json \\
        > bench/results/recheck/NAME.txt

Per seed in both: top-1 of each, the paired top-1 difference a - b (bootstrap 95%,
McNemar exact), the per-image KL difference and the conversion times. Over a's seeds: the
mean ± sd and the seed-averaged paired difference against the FP32 original and the int8
PTQ cell found in any of the files (``--ref`` adds files to look in), worded by the rule
("better"/"worse" only where the interval excludes zero).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hfbconvert.metrics import decode_floats, paired_difference_interval, verdict

from .report import _spread, diff, fmt_diff, load_results, seed_mean_diff, words

Loaded = list[tuple[str, dict]]  # (file name, results) per file, in the order given


def _load(files: list[Path]) -> Loaded:
    return [(f.name, load_results(f)) for f in files]


def _cells(loaded: Loaded, model: str, method: str) -> dict[int | None, tuple[str, dict]]:
    """``{seed: (file name, cell)}`` of ``model``/``method`` with status ok; a later file's
    cell replaces an earlier one's of the same seed."""
    out: dict[int | None, tuple[str, dict]] = {}
    for name, res in loaded:
        for c in res.get("cells", []):
            if c.get("model") == model and c.get("method") == method \
                    and c.get("status", "ok") == "ok":
                out[c.get("seed")] = (name, c)
    return out


def _ci(d: float, lo: float, hi: float, scale: float, fmt: str) -> str:
    return f"{scale * d:{fmt}} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"


def pair_line(seed: int | None, a: tuple[str, dict], b: tuple[str, dict],
              boot_seed: int = 0) -> str:
    """One seed's a - b, paired per image when both cells stored results on one list."""
    (fa, ca), (fb, cb) = a, b
    pa, pb = ca.get("per_image") or {}, cb.get("per_image") or {}
    head = (f"seed {seed}: {ca['method']} {100 * ca['top1']:.2f} ({fa}, steps "
            f"{ca.get('steps_finetune')}) - {cb['method']} {100 * cb['top1']:.2f} ({fb}, steps "
            f"{cb.get('steps_finetune')})")
    top = diff(ca, cb, seed=boot_seed)
    if top is None or not top["paired"]:
        return head + ": not paired (different or unrecorded evaluation images)"
    n = top["n"]
    text = f"{head}: top-1 {fmt_diff(top, p=True)} ({words(top)})"
    if pa.get("kl_b64") and pb.get("kl_b64"):
        k, (klo, khi) = paired_difference_interval(decode_floats(pa["kl_b64"], n),
                                                   decode_floats(pb["kl_b64"], n),
                                                   seed=boot_seed)
        word = verdict(k, klo, khi, "higher: further from FP32", "lower: closer to FP32",
                       scale=1, unit="nats", digits=4)
        text += f"; KL {_ci(k, klo, khi, 1, '+.4f')} ({word})"
    return text + (f"; convert {ca.get('convert_wall_s', 0):.0f} s vs "
                   f"{cb.get('convert_wall_s', 0):.0f} s")


def seeds_lines(cells: list[dict], refs: dict[str, dict | None], boot_seed: int = 0
                ) -> list[str]:
    """Mean ± sd over seeds and the seed-averaged paired difference to each reference."""
    tops = [float(c["top1"]) for c in cells]
    out = [f"over seeds {[c.get('seed') for c in cells]}: top-1 {_spread(tops)}"]
    for name, ref in refs.items():
        if ref is None:
            out.append(f"  vs {name}: no {name} cell in the files")
            continue
        m = seed_mean_diff(cells, ref, seed=boot_seed)
        if m is None:
            out.append(f"  vs {name}: not paired (per-image results missing or other images)")
            continue
        out.append(f"  vs {name} ({100 * ref['top1']:.2f}): seed-averaged "
                   f"{_ci(m['d'], m['lo'], m['hi'], 100, '+.2f')} "
                   f"({verdict(m['d'], m['lo'], m['hi'], 'better', 'worse')})")
    return out


def _files(text: str) -> list[Path]:
    return [Path(p) for p in text.split(",") if p]


def report(model: str, a_files: list[Path], a_method: str, b_files: list[Path],
           b_method: str, ref_files: list[Path]) -> list[str]:
    """The whole text (see the module docstring)."""
    la, lb, lr = _load(a_files), _load(b_files), _load(ref_files)
    a = _cells(la, model, a_method)
    b = _cells(lb, model, b_method)
    lines = ["paired on the same evaluation images (bootstrap 95%, McNemar exact); a - b"]
    for seed in sorted(set(a) & set(b), key=lambda s: -1 if s is None else s):
        lines.append(pair_line(seed, a[seed], b[seed]))
    every = [*lr, *la, *lb]
    refs = {name: next((c for _, c in _cells(every, model, key).values()), None)
            for name, key in (("FP32", "original"), ("int8 PTQ", "int8-ptq"))}
    for label, cells in (("a", a), ("b", b)):
        if cells:
            lines.append(f"{label} = {next(iter(cells.values()))[1]['method']}:")
            lines += seeds_lines([c for _, c in sorted(
                cells.values(), key=lambda fc: fc[1].get("seed") or 0)], refs)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model key, e.g. v2")
    ap.add_argument("--a", required=True, help="comma-separated results files of side a")
    ap.add_argument("--a-method", required=True, help="method key of side a")
    ap.add_argument("--b", required=True, help="comma-separated results files of side b")
    ap.add_argument("--b-method", required=True, help="method key of side b")
    ap.add_argument("--ref", default="", help="more files to find FP32 / int8 PTQ cells in")
    args = ap.parse_args(argv)
    print("\n".join(report(args.model, _files(args.a), args.a_method, _files(args.b),
                           args.b_method, _files(args.ref))))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
