"""Where the peak resident memory of ``compress`` goes, stage by stage.

Runs ``hfbconvert compress MODEL --calib CALIB --calib-size N --steps 0`` in this process
with every stage (and each held-apart agreement pass, the per-layer output comparison and
the artifact write) wrapped: before each one the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs`` 5), after it the peak reached inside it, the RSS left behind
and glibc's heap counters (``mallinfo2``: bytes in use vs free-but-kept) are recorded.
One JSON line per event on stdout; run once per N in a fresh process, e.g.

    python -m bench.rss_stages --calib-size 256 > /tmp/s256.jsonl
    python -m bench.rss_stages --calib-size 2048 > /tmp/s2048.jsonl

Linux and glibc only (a diagnostic, not part of the package).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import sys
import time
from typing import Any

SHARED = os.environ.get("HFB_SHARED", "../shared")
MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> Any:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


EVENTS: list[dict] = []


def _mark(name: str, t0: float, libc: Any) -> None:
    st, mi = _status(), libc.mallinfo2()
    row = {"event": name, "peak_mib": round(st["VmHWM"], 1), "rss_after_mib": round(st["VmRSS"], 1),
           "heap_used_mib": round(mi.uordblks / MIB, 1), "heap_free_kept_mib":
           round(mi.fordblks / MIB, 1), "mmapped_mib": round(mi.hblkhd / MIB, 1),
           "seconds": round(time.perf_counter() - t0, 2)}
    EVENTS.append(row)
    print(json.dumps(row), flush=True)


def _wrap(mod: Any, attr: str, label: str, libc: Any) -> None:
    fn = getattr(mod, attr)

    @functools.wraps(fn)
    def inner(*a: Any, **k: Any) -> Any:
        _reset_peak()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _mark(label if label != "stage" else f"stage:{a[1] if len(a) > 1 else '?'}",
                  t0, libc)

    setattr(mod, attr, inner)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--calib-size", type=int, required=True)
    ap.add_argument("--out", default="/tmp/rss_stages.hfb.pt")
    a, rest = ap.parse_known_args(argv)
    libc = _libc()
    from hfbconvert import artifact, cli, pipeline, stages

    for name in ("sensitivity", "fragility", "plan", "fit", "add_cap", "banks", "freeze",
                 "weight_quant", "finish"):
        _wrap(stages, name, name, libc)
    _wrap(cli, "_load", "load_model", libc)
    _wrap(cli, "_load_calib", "load_calib", libc)
    _wrap(pipeline, "_stage", "stage", libc)  # each held-apart agreement pass
    _wrap(pipeline, "output_errors", "output_errors", libc)
    _wrap(artifact, "save_compressed", "write", libc)
    _reset_peak()
    _mark("start", time.perf_counter(), libc)
    args = ["compress", a.model, "--calib", a.calib, "--calib-size", str(a.calib_size),
            "--steps", "0", "-o", a.out, "--force", "-q", "--min-agreement", "0", *rest]
    try:
        cli.main(args, standalone_mode=False)
    finally:  # (resetting the mark resets ru_maxrss too: the peak is the events' largest)
        print(json.dumps({"event": "process_peak", "peak_mib": max(
            e["peak_mib"] for e in EVENTS)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
