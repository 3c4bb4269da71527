"""Differences between two benchmark results files: ``python -m bench.compare [OLD NEW]``.

Without arguments: the two latest files in bench/results (``--suite`` restricts the
choice to one suite). Per cell (model × method): top-1 (points), MULs, ONNX bytes,
conversion time and the batch-1 latency ratio, old → new. Then, per cell, top-1 with its
95% interval and, where both files stored per-image results on the same images, the
paired difference new - old (bootstrap interval over images, McNemar's exact test) worded
by the rule: "better"/"worse" only when the interval excludes zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hfbconvert.metrics import (
    decode_bits,
    discordant,
    mcnemar_exact,
    paired_difference_interval,
    verdict,
)

from .cases import REPO, TABLE_ORDER
from .report import _top1_ci, load_results, results_files, unpaired


def _get(cell: dict | None, key: str):
    if cell is None:
        return None
    if key == "lat_b1":
        return ((cell.get("latency") or {}).get("b1") or {}).get("ratio")
    return cell.get(key)


def _fmt(v, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{100 * v:.2f}"
    if kind == "M":
        return f"{v / 1e6:.2f}M"
    if kind == "MB":
        return f"{v / 1e6:.2f}MB"
    if kind == "s":
        return f"{v:.0f}s"
    return f"{v:.2f}"


def _delta(a, b, kind: str) -> str:
    if a is None or b is None:
        return ""
    if kind == "pct":
        return f"{100 * (b - a):+.2f}pp"
    if kind == "s":
        return f"{b - a:+.0f}s"
    if kind == "x":
        return f"{b - a:+.2f}"
    return f"{100 * (b - a) / a:+.1f}%" if a else ""


FIELDS = [("top-1", "top1", "pct"), ("MULs", "muls", "M"), ("ONNX", "onnx_bytes", "MB"),
          ("convert", "convert_wall_s", "s"), ("b1 ratio", "lat_b1", "x")]


def _key(cell: dict) -> tuple[str, str]:
    """(model, method), the method suffixed with its seed past seed 0 (seeds suite), so
    that every seed's cell is compared with the same seed's."""
    seed = cell.get("seed", 0)
    return cell["model"], cell["method"] + (f" s{seed}" if seed else "")


def compare(old: dict, new: dict) -> list[str]:
    lines = []
    for tag, r in (("old", old), ("new", new)):
        g = r.get("git", {})
        lines.append(f"{tag}: {r.get('_path')}  suite {r['suite']}  {r.get('started')}  commit "
                     f"{(g.get('commit') or '?')[:10]}{' (dirty)' if g.get('dirty') else ''}")
    so, sn = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(so) | set(sn)):
        if so.get(k) != sn.get(k) and k != "notes":
            lines.append(f"setting {k}: {so.get(k)} -> {sn.get(k)}")
    mo = {m["key"]: m for m in old.get("models", [])}
    for m in new.get("models", []):
        o = mo.get(m["key"])
        if o is None:
            continue
        for k in ("steps", "calib_size", "eval_size"):
            if o.get(k) != m.get(k):
                lines.append(f"{m['key']}: {k} {o.get(k)} -> {m.get(k)}")
    lines.append("")
    co = {_key(c): c for c in old["cells"]}
    cn = {_key(c): c for c in new["cells"]}
    models = list(dict.fromkeys([k[0] for k in cn] + [k[0] for k in co]))
    rank = {m: i for i, m in enumerate(TABLE_ORDER)}
    header = f"{'model':<16} {'method':<20} " + " ".join(f"{f[0]:>26}" for f in FIELDS)
    lines.append(header)
    lines.append("-" * len(header))
    for model in models:
        keys = sorted({k[1] for k in (*co, *cn) if k[0] == model},
                      key=lambda m: (rank.get(m.split(" ")[0], 99), m))
        for meth in keys:
            a, b = co.get((model, meth)), cn.get((model, meth))
            cols = []
            for _, key, kind in FIELDS:
                va, vb = _get(a, key), _get(b, key)
                txt = f"{_fmt(va, kind)} -> {_fmt(vb, kind)} {_delta(va, vb, kind)}"
                cols.append(f"{txt.strip():>26}")
            status = ""
            if a is None:
                status = "  (new cell)"
            elif b is None:
                status = "  (cell removed)"
            elif a.get("status") != b.get("status"):
                status = f"  ({a.get('status')} -> {b.get('status')})"
            elif b.get("status") != "ok":
                status = f"  ({b.get('status')})"
            lines.append(f"{model:<16} {meth:<20} " + " ".join(cols) + status)
    return lines


def _bits(cell: dict | None) -> tuple[np.ndarray, str] | None:
    p = (cell or {}).get("per_image") or {}
    if not p.get("correct_hex") or not p.get("n"):
        return None
    return decode_bits(p["correct_hex"], int(p["n"])), str(p.get("images_sha256"))


def _unpaired_text(old: dict, new: dict) -> str:
    """'; unpaired new - old ±x [lo, hi]ᵘ: verdict' from the two top-1s and image counts
    (wider than a paired interval would be), or '' without them."""
    if old.get("top1") is None or new.get("top1") is None or not old.get("n_eval") \
            or not new.get("n_eval"):
        return ""
    d = unpaired(new["top1"], int(new["n_eval"]), old["top1"], int(old["n_eval"]))
    word = verdict(d["d"], d["lo"], d["hi"], better="new better than old",
                   worse="new worse than old")
    return (f"; unpaired new - old {100 * d['d']:+.2f}pp [{100 * d['lo']:+.2f}, "
            f"{100 * d['hi']:+.2f}]ᵘ: {word}")


def paired_line(a: dict | None, b: dict | None, seed: int = 0) -> str:
    """new - old for one cell, paired over images when both stored per-image results on
    the same images; otherwise says why not."""
    pa, pb = _bits(a), _bits(b)
    if a is None or b is None:
        return ""
    if pa is None or pb is None:
        why = "not paired (per-image results not stored in " + \
            ("either file" if pa is None and pb is None else
             "the old file" if pa is None else "the new file") + ")"
        return why + _unpaired_text(a, b)
    (xa, ha), (xb, hb) = pa, pb
    if ha != hb or xa.size != xb.size:
        return "not paired (different evaluation images)" + _unpaired_text(a, b)
    d, (lo, hi) = paired_difference_interval(xb, xa, seed=seed)
    only_new, only_old = discordant(xb, xa)
    word = verdict(d, lo, hi, better="new better than old", worse="new worse than old")
    return (f"new - old {100 * d:+.2f}pp [{100 * lo:+.2f}, {100 * hi:+.2f}], McNemar p = "
            f"{mcnemar_exact(only_new, only_old):.3g} (only new right {only_new}, only old "
            f"{only_old}): {word}")


def paired_section(old: dict, new: dict) -> list[str]:
    co = {_key(c): c for c in old["cells"]}
    cn = {_key(c): c for c in new["cells"]}
    lines = ["", "top-1 with 95% interval (old -> new); paired difference over the same "
             "images where both files stored per-image results"]
    rank = {m: i for i, m in enumerate(TABLE_ORDER)}
    keys = sorted(set(co) | set(cn),
                  key=lambda k: (k[0], rank.get(k[1].split(" ")[0], 99), k[1]))
    for key in keys:
        a, b = co.get(key), cn.get(key)
        if (a or {}).get("top1") is None and (b or {}).get("top1") is None:
            continue
        lines.append(f"{key[0]:<16} {key[1]:<20} {_top1_ci(a)} -> {_top1_ci(b)}")
        pl = paired_line(a, b)
        if pl:
            lines.append(f"{'':<37} {pl}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    p.add_argument("files", nargs="*", type=Path, help="OLD NEW (default: the two latest)")
    p.add_argument("--dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--suite", default=None, help="only consider results of this suite")
    a = p.parse_args(argv)
    if len(a.files) == 2:
        paths = a.files
    elif not a.files:
        files = results_files(a.dir)
        if a.suite:
            files = [f for f in files if load_results(f)["suite"] == a.suite]
        if len(files) < 2:
            print(f"need two results files in {a.dir} (found {len(files)}); "
                  "run `make bench-quick` twice, or pass OLD NEW", file=sys.stderr)
            return 2
        paths = files[-2:]
    else:
        p.error("give two files (OLD NEW) or none")
    try:
        old, new = (load_results(x) for x in paths)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(compare(old, new) + paired_section(old, new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
