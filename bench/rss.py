"""Peak RSS of ``compress --steps 0`` against the number of calibration images.

Each run is a fresh ``python -m hfbconvert.cli compress`` in its own wrapper process, whose
``RUSAGE_CHILDREN`` peak resident set is the compress process's. The decode cache is
warmed first (an unmeasured load of the same images into HFB_CACHE), so every
measured run reads decoded images from the cache, as a user's second run does. ``--code``
runs this checkout or another; ``--before PATH`` adds the same rows for another checkout
(e.g. main before a change) to the same file. Writes bench/results/rss.json (``--out``)
and, with ``--write-md``, the ``<!-- generated:rss -->`` section of BENCHMARKS.md;
``--render-only`` rewrites that section from the results file without measuring. Heavy:
run it under ``flock /tmp/hfb-heavy.lock``.

    flock /tmp/hfb-heavy.lock python -m bench.rss --sizes 256,1024,5000 \
        --before /path/to/main --write-md
    python -m bench.rss --render-only

Where the peak goes: ``python -m bench.rss_stages`` (per stage, bench/results/
rss_stages.json). With images streamed, what still grew with the number of images was not
an array sized by it but glibc keeping the heap memory each held-apart batch freed (bytes
in use constant, free-but-resident heap 303 MiB after the first agreement pass): more
images, more held-apart batches (a tenth of the images, at most 512 checked), a higher
peak. Freed memory now goes back after each batch and stage (hfbconvert/memory.py); what
differs between sizes is the largest held-apart batch, 51 images at 256 (one batch) and
64 from 320 images on: peak of the final per-layer comparison 1,068 vs 1,240 MiB at 256 vs
1,024 images (before: 1,203 vs 1,358).
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

SHARED = os.environ.get("HFB_SHARED", "../shared")
REPO = Path(__file__).resolve().parent.parent

WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def _env(code: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(code), "HFB_CACHE": str(cache),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    return env


def warm(code: Path, cache: Path, model: str, calib: str, size: int | None) -> None:
    """Decode (and cache) exactly the images compress will read, unmeasured."""
    # hfbconvert.calib since the package move; plain ``calib`` in older checkouts (--code)
    script = ("import sys\ntry:\n from hfbconvert.calib import load_images, preset_for\n"
              "except ImportError:\n from calib import load_images, preset_for\n"
              "from hfbconvert.models.loading import load_model; "
              "_, info = load_model(sys.argv[1]); "
              "import hfbconvert.cli as c; "
              "n = getattr(c, 'DEFAULT_CALIB_CAP', None) if sys.argv[3] == 'None' "
              "else int(sys.argv[3]); "
              "load_images(sys.argv[2], preset_for(info), size=n, seed=0)")
    subprocess.run([sys.executable, "-c", script, model, calib, str(size)], check=True,
                   env=_env(code, cache), cwd=code)


def measure(code: Path, cache: Path, model: str, calib: str, size: int | None,
            out: Path) -> dict:
    cmd = [sys.executable, "-m", "hfbconvert.cli", "compress", model, "--calib", calib,
           "--steps", "0", "-o", str(out), "--force", "-q", "--min-agreement", "0"]
    if size is not None:
        cmd += ["--calib-size", str(size)]
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True,
                         text=True, env=_env(code, cache), cwd=code)
    wall = time.perf_counter() - t
    kib, rc = res.stdout.split()[-2:]
    if int(rc) != 0:
        raise SystemExit(f"compress failed ({rc}): {res.stderr.strip()[-500:]}")
    meta_n = None
    try:  # the images compress used (the default cap shows here)
        import torch

        obj = torch.load(out, weights_only=True)
        meta_n = (obj.get("meta") or {}).get("calibration", {}).get("n_images")
    except Exception:  # an older checkout's artifact: the count stays unknown
        pass
    import hashlib

    digest = hashlib.sha256(out.read_bytes()).hexdigest()  # same inputs + seed: same bytes
    return {"calib_size": "default" if size is None else size, "images_used": meta_n,
            "peak_rss_mib": round(int(kib) / 1024, 1), "wall_s": round(wall, 1),
            "artifact_sha256": digest}


START, END = "<!-- generated:rss -->", "<!-- /generated -->"
# what the rows of a run of this version show (stored with them as "note")
NOTE = ("Both checkouts stream the images from the decoded record file. *before*: glibc kept "
        "the heap memory each held-apart batch freed, so the peak grew with the number of "
        "batches checked (a tenth of the images, at least 200 where a fifth allows, at most "
        "512 checked); *after*: freed memory goes back to the OS after each batch and stage "
        "(`malloc_trim`, hfbconvert/memory.py) and the per-layer output comparison keeps one "
        "network's outputs. From 256 to 1,024 images the largest held-apart batch grows from "
        "51 to 64 images (64 from 320 images on); from 1,024 to 5,000 it stays 64, and what is "
        "left of the difference is not attributed (per stage: `python -m bench.rss_stages`, "
        "bench/results/rss_stages.json). Wall seconds are not comparable between rows: other "
        "jobs shared the machine's 2 cores during the run.")


def render(res: dict) -> str:
    """The BENCHMARKS.md section of a results file (numbers from it only)."""
    codes = {}
    for r in res["rows"]:
        codes.setdefault(r["label"], {})[r["calib_size"]] = r
    sizes = sorted({r["calib_size"] for r in res["rows"]}, key=lambda v: (str(v) == "default",
                                                                        str(v).zfill(9)))
    head = "| checkout | " + " | ".join(f"{s} images" for s in sizes) + " |"
    lines = ["## Peak memory vs calibration images", "",
             f"Peak RSS (MiB, kernel `ru_maxrss` of the compress process) of `hfbconvert "
             f"compress {Path(res['model']).name} --steps 0 --calib-size N` on "
             f"{Path(res['calib']).name} images, decode cache warm (wall seconds in "
             "brackets). Results: `bench/results/rss.json`, command: "
             f"`{res['command']}`.", "", head, "|---|" + "---|" * len(sizes)]
    for label, rows in codes.items():
        commit = next(iter(rows.values()))["commit"]
        cells = [f"{rows[s]['peak_rss_mib']:,.0f} ({rows[s]['wall_s']:.0f} s)" if s in rows
                 else "–" for s in sizes]
        lines.append(f"| {label} (`{commit}`) | " + " | ".join(cells) + " |")
    same = _same_bytes(res["rows"])
    if same:
        lines += ["", "Artifacts: " + same]
    if res.get("note"):
        lines += ["", res["note"]]
        return "\n".join(lines) + "\n"
    lines += ["", "*before*: every decoded image held in memory (uint8), plus the split's "
              "copies and the held-apart images in float; *after*: images decoded once into "
              "a record file and streamed per batch, only bounded samples (statistics 256, "
              "held-apart checks on at most 512 images in batches of 64, fine-tune batches) "
              "in memory. What still grows from 256 to 5,000 images is the held-apart check "
              "set (a tenth of the images, at least 200 where a fifth allows; at most 512 are "
              "checked, reached at 5,120 images): its agreement passes and per-layer output "
              "comparisons, not the images (instrumented per stage, `bench/rss.py` docstring)."]
    return "\n".join(lines) + "\n"


def _same_bytes(rows: list[dict]) -> str:
    """Whether the checkouts wrote the same artifact bytes per size (when both ran)."""
    by: dict = {}
    for r in rows:
        if r.get("artifact_sha256"):
            by.setdefault(r["calib_size"], {})[r["label"]] = r["artifact_sha256"]
    pairs = {n: v for n, v in by.items() if len(v) > 1}
    if not pairs:
        return ""
    if all(len(set(v.values())) == 1 for v in pairs.values()):
        return (f"byte-identical between checkouts at every size ({', '.join(map(str, pairs))} "
                "images; sha256 in the results file).")
    diff = [str(n) for n, v in pairs.items() if len(set(v.values())) > 1]
    return f"bytes differ between checkouts at {', '.join(diff)} images."


def splice(md: Path, section: str, start: str = START, end: str = END) -> None:
    """Replace the block ``start``..``end`` in ``md`` (or append it); the rest of the file
    stays as is."""
    from hfbconvert.fileio import atomic_write_text

    text = md.read_text() if md.exists() else ""
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if start in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")  # the blank line after stays
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(md, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models/mobilenet_v1_0.5_160.pt"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data/imagenet/calib"))
    ap.add_argument("--sizes", default="256,1024,5000",
                    help="comma-separated --calib-size values; 'default' passes none")
    ap.add_argument("--code", default=str(REPO), help="checkout whose hfbconvert runs")
    ap.add_argument("--before", default=None,
                    help="another checkout measured the same way first (label 'before')")
    ap.add_argument("--cache", default=os.environ.get("HFB_CACHE")
                    or str(Path.home() / ".cache" / "hfbconvert"),
                    help="decode cache of every run (HFB_CACHE; default: the user's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rss.json"))
    ap.add_argument("--write-md", action="store_true", help="update BENCHMARKS.md's section")
    ap.add_argument("--render-only", action="store_true",
                    help="only rewrite BENCHMARKS.md's section from --out")
    a = ap.parse_args(argv)
    md = REPO / "BENCHMARKS.md"
    if a.render_only:
        splice(md, render(json.loads(Path(a.out).read_text())))
        print(f"wrote {md}")
        return 0
    sizes = [None if s == "default" else int(s) for s in a.sizes.split(",")]
    checkouts = ([("before", Path(a.before).resolve())] if a.before else []) + \
        [("after" if a.before else "this", Path(a.code).resolve())]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cache = Path(a.cache)
        for label, code in checkouts:
            git = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
            for size in sizes:
                warm(code, cache, a.model, a.calib, size)
                row = measure(code, cache, a.model, a.calib, size, Path(d) / "m.hfb.pt")
                row.update(label=label, code=str(code), commit=git)
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"command": "python -m bench.rss " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
              "model": a.model, "calib": a.calib,
              "what": "peak RSS (ru_maxrss) of compress --steps 0, decode cache warm",
              "note": NOTE, "rows": rows}
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if a.write_md:
        splice(md, render(result))
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
