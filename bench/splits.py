"""The tuning split: a fixed part of a calibration folder held apart from calibration.

Any choice made by measurement (a default, a stage order, a learning rate) is tuned on
these images; the evaluation split (``val``) is used once per reported figure. Reporting
a figure measured on the images that chose the setting would overstate it.

Which images: every image below the calibration folder is named by its path relative to
that folder (``<class folder>/<file>``, ``/``-separated); of the names whose file name
does not start with one of ``CONCENTRATED`` (the shared ImageNet calib folder's 4,000
``nette_*`` images come from only 10 classes; the other 1,000 are one per class), the
``size`` with the smallest ``sha256(SALT + name)`` form the tuning split: 300 images of
300 classes, spread over classes as the evaluation images are (1,300 of 725 classes).
That depends on the file names only, so every machine with the same folder picks the
same images, and adding other images later moves none of them out unless they hash
lower.

Both sides are materialized as folders of symlinks under ``$HFB_CACHE/splits/`` (never in
the repository or the read-only shared folder), with ``synset_words.txt`` linked in, so
that the unchanged CLI reads them with the same labels:

- ``calib-minus-tune``: what ``hfbconvert compress`` and the int8 PTQ calibrate on;
- ``tune``: what ``python -m bench.run --split tune`` evaluates on.

Every results file records, per model, the split its figures came from: its name, the
number of images and the sha256 of their sorted relative names (``list_sha256``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hfbconvert.calib.readers import CLASSES_FILE, IMAGE_EXTS

SALT = "hfbconvert-tune-split/1:"
TUNE_SIZE = 300  # ImageNet: 300 of the 5,000 calib images (one standard error ~2.6 points)
# file-name prefixes never drawn into the tuning split: images from a few classes only,
# which would make the split's top-1 a measure of those classes
CONCENTRATED = ("nette_",)


def image_names(root: str | os.PathLike) -> list[str]:
    """Relative ``/``-separated names of the images below ``root``, sorted (hidden files
    and non-images skipped, as the readers skip them)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_EXTS:
                continue
            rel = Path(dirpath, f).relative_to(root)
            out.append(rel.as_posix())
    return sorted(out)


def _rank(name: str) -> str:
    return hashlib.sha256((SALT + name).encode()).hexdigest()


def tune_names(names: list[str], size: int = TUNE_SIZE) -> list[str]:
    """The tuning split of ``names``: of those not ``CONCENTRATED``, the ``size`` with the
    smallest salted hash, sorted."""
    pool = [n for n in names if not n.rsplit("/", 1)[-1].startswith(CONCENTRATED)]
    if size < 1:
        raise ValueError(f"tuning split size must be >= 1, got {size}")
    if size >= len(pool):
        raise ValueError(f"tuning split of {size} images needs more than {len(pool)}")
    return sorted(sorted(pool, key=_rank)[:size])


def list_sha256(names: list[str]) -> str:
    """Fingerprint of a set of images: sha256 of their sorted names, one per line."""
    return hashlib.sha256("".join(n + "\n" for n in sorted(names)).encode()).hexdigest()


@dataclass(frozen=True)
class Split:
    """One named set of images below ``root``, and its symlink folder (``path``)."""

    name: str
    root: Path
    names: tuple[str, ...]
    path: Path

    @property
    def sha256(self) -> str:
        return list_sha256(list(self.names))

    def record(self) -> dict:
        """What a results file stores about the images a figure came from."""
        return {"name": self.name, "source": str(self.root), "n": len(self.names),
                "list_sha256": self.sha256, "folder": str(self.path)}


def _materialize(root: Path, names: list[str], dest: Path) -> Path:
    """A folder of symlinks to ``root/name`` for each name (and the classes file), built
    under a temporary name and renamed into place: a reader never sees half of it."""
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for n in names:
        link = tmp / n
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / n, link)
    for cand in (root / CLASSES_FILE, root.parent / CLASSES_FILE):
        if cand.is_file():
            os.symlink(cand, tmp / CLASSES_FILE)
            break
    (tmp / ".complete").write_text("ok\n")
    if (dest / ".complete").is_file():  # a concurrent run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def splits_dir() -> Path:
    return Path(os.environ.get("HFB_CACHE") or Path.home() / ".cache" / "hfbconvert") / "splits"


def calib_splits(root: str | os.PathLike, size: int = TUNE_SIZE,
                 base: Path | None = None) -> tuple[Split, Split]:
    """(calibration split, tuning split) of the calibration folder ``root``: disjoint,
    together every image of ``root``. Folders are keyed by the lists' fingerprints, so a
    changed folder or size never reuses a stale one."""
    root = Path(root).resolve()
    names = image_names(root)
    tune = tune_names(names, size)
    held = set(tune)
    calib = [n for n in names if n not in held]
    base = base or splits_dir()
    out = []
    for name, members in (("calib-minus-tune", calib), ("tune", tune)):
        dest = base / f"{root.name}-{name}-{list_sha256(members)[:12]}"
        out.append(Split(name, root, tuple(members), _materialize(root, members, dest)))
    return out[0], out[1]


def folder_split(name: str, root: str | os.PathLike) -> Split:
    """A whole folder as a split (the evaluation split: ``val``), nothing materialized."""
    root = Path(root).resolve()
    return Split(name, root, tuple(image_names(root)), root)
