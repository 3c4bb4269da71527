"""Calibration / evaluation image readers.

Images are decoded once, preprocessed geometrically (resize + crop) and kept as a uint8
N x 3 x R x R tensor: 4x less memory than float, and normalisation is applied lazily per
batch so that one decode serves any mean/std. Decoding runs in a small thread pool
(Pillow releases the GIL) and the result is cached on disk, so the second run with the
same files and geometry is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hfbconvert.errors import InputError
from hfbconvert.fileio import atomic_write

from .presets import Preprocess

IMAGE_EXTS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CLASSES_FILE = "synset_words.txt"
CACHE_VERSION = 1
# JPEG draft decoding (DCT downscaling) may shrink an image only while it stays at least
# this many times larger than what the geometry step needs; see _draft_request.
DRAFT_MARGIN = {"resize_then_crop": 1.0, "crop_then_resize": 2.0}


@dataclass
class CalibData:
    """Preprocessed images (uint8 NCHW) plus labels and the normalisation to apply."""

    images: torch.Tensor
    labels: torch.Tensor | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: list[str]
    skipped: int = 0
    source: str = ""
    classes: list[str] | None = None  # class name per label index, when known
    skipped_examples: list[str] = field(default_factory=list)  # "file: reason", a few

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def normalized(self, idx: Any = None) -> torch.Tensor:
        """Float32 model input for ``images[idx]`` (all when ``idx`` is None)."""
        x = self.images if idx is None else self.images[idx]
        if x.ndim == 3:
            x = x.unsqueeze(0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (x.float() - mean) / std

    def batches(self, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(normalized float NCHW, labels or None)`` in file order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield self.normalized(sl), (None if self.labels is None else self.labels[sl])

    def subset(self, idx: Sequence[int] | range | np.ndarray | torch.Tensor) -> CalibData:
        """The images at ``idx`` (any integer sequence), labels and files alike."""
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        return replace(
            self,
            images=self.images[idx_t],
            labels=None if self.labels is None else self.labels[idx_t],
            files=[self.files[i] for i in idx_t.tolist()],
        )

    def sample(self, n: int, seed: int = 0) -> CalibData:
        """A seeded random ``n`` of the images, in file order. Use this, never the first
        n: folders are read class by class, and statistics from a few classes mislead."""
        k = min(n, len(self))
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:k])
        return self.subset(idx)

    def split(self, frac: float, seed: int = 0,
              count: int | None = None) -> tuple[CalibData, CalibData]:
        """``(rest, held)``: a seeded random ``frac`` of the images (or exactly ``count``)
        held apart (e.g. for agreement checks on images the calibration never saw). Both
        parts keep file order and are non-empty when there are at least 2 images."""
        n = len(self)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"frac must be in (0, 1), got {frac}")
        if n < 2:
            raise InputError(f"{self.source}: need at least 2 images to split, have {n}")
        n_held = min(max(1, round(frac * n) if count is None else count), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        held = np.sort(perm[:n_held])
        rest = np.sort(perm[n_held:])
        return self.subset(torch.from_numpy(rest)), self.subset(torch.from_numpy(held))


# ------------------------------------------------------------------------ entry point


def load_images(
    path: str | os.PathLike,
    prep: Preprocess,
    size: int | None = None,
    seed: int = 0,
    classes_file: str | os.PathLike | None = None,
    *,
    classes: Sequence[str] | None = None,
    classes_origin: str = "the model's class list",
    cache: bool = True,
    draft: bool = True,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> CalibData:
    """Read an ImageFolder tree, a flat folder of images or an ``.npz`` and preprocess it.

    Labels of an ImageFolder come from, in order: ``classes_file`` (one class per line,
    first word = folder name, line number = label), ``classes`` (names in label order,
    matched case-insensitively when no exact match; ``classes_origin`` names them in the
    error for folders that match none), a ``synset_words.txt`` next to or inside the
    folder, else sorted folder names. Symlinks are followed, each real file once.
    ``size`` picks a seeded random subset of that many images (all when None/larger).
    Unreadable images are skipped and counted in ``CalibData.skipped``.
    """
    p = Path(path)
    if size is not None and size < 1:
        raise InputError(f"{p}: number of images must be >= 1, got {size}")
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return _load_npz(p, prep, size, seed, workers)
        raise InputError(f"{p}: expected a folder of images (or class sub-folders) or an .npz")

    files, folder_labels, names = _list_folder(p, classes_file, classes, classes_origin)
    if size is not None and size < len(files):
        keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:size])
        files = [files[i] for i in keep]
        if folder_labels is not None:
            folder_labels = [folder_labels[i] for i in keep]

    key = _cache_key(files, prep, draft) if cache else None
    cached = _cache_read(key) if key else None
    if cached is not None:
        images, ok, errors = cached
    else:
        images, ok, errors = _decode_all(files, prep, draft, workers, progress)
        if key:
            _cache_write(key, images, ok, errors)

    kept_files = [str(f) for f, good in zip(files, ok, strict=True) if good]
    if not kept_files:
        why = f" (e.g. {errors[0]})" if errors else ""
        raise InputError(f"{p}: none of the {len(files)} images could be read{why}")
    labels = None
    if folder_labels is not None:
        labels = torch.tensor(
            [lab for lab, good in zip(folder_labels, ok, strict=True) if good], dtype=torch.int64
        )
    return CalibData(
        images=torch.from_numpy(images),
        labels=labels,
        mean=tuple(float(v) for v in prep.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep.std),  # type: ignore[arg-type]
        files=kept_files,
        skipped=len(files) - len(kept_files),
        source=str(p),
        classes=names,
        skipped_examples=errors[:3],
    )


# ---------------------------------------------------------------------------- listing


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()


def _file_id(p: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``p`` points to (None when it cannot be stat'ed)."""
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _images_under(folder: Path, seen_dirs: set, seen_files: set) -> list[Path]:
    """Images below ``folder`` (sorted, depth first), following symlinks, but each real
    file once and never into a folder already in ``seen_dirs`` (so symlink loops end).
    Both sets are updated: sharing them across class folders keeps one class from
    reading another through a link."""
    found: list[Path] = []
    stack = [folder]
    while stack:
        d = stack.pop()
        did = _file_id(d)
        if did is None or did in seen_dirs:
            continue
        seen_dirs.add(did)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue  # unreadable sub-folder: skipped, as os.walk does
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                continue
            if is_dir:
                subdirs.append(path)
            elif _is_image(path):
                fid = _file_id(path)
                if fid is not None and fid not in seen_files:
                    seen_files.add(fid)
                    found.append(path)
        stack += reversed(subdirs)
    return found


def _read_classes_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read classes file ({exc.strerror})") from None
    names = [ln.split()[0] for ln in lines if ln.strip()]
    if not names:
        raise InputError(f"{path}: classes file is empty")
    return names


def _list_folder(
    p: Path,
    classes_file: str | os.PathLike | None,
    classes: Sequence[str] | None,
    classes_origin: str = "the model's class list",
) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files (sorted), their labels (None for a flat folder) and the class names."""
    try:
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError:
        raise InputError(f"{p}: folder not readable (permission denied)") from None
    # the root and every class folder count as visited up front: a link inside one
    # class folder never reads the root or another class's images again
    seen_dirs = {i for i in map(_file_id, [p, *subdirs]) if i is not None}
    seen_files: set = set()
    per_class = {}
    for d in subdirs:
        did = _file_id(d)
        seen_dirs.discard(did)
        per_class[d.name] = _images_under(d, seen_dirs, seen_files)
        seen_dirs.add(did)
    per_class = {k: v for k, v in per_class.items() if v}
    if not per_class:  # flat folder
        files = []
        for f in sorted(f for f in p.iterdir() if _is_image(f)):
            fid = _file_id(f)
            if fid is not None and fid not in seen_files:
                seen_files.add(fid)
                files.append(f)
        if not files:
            raise InputError(
                f"{p}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))}, "
                "directly or in class sub-folders)"
            )
        return files, None, None

    order: list[str] | None = None
    index: tuple[dict[str, int], dict[str, int]] | None = None
    origin = ""
    if classes_file is not None:
        order, origin = _read_classes_file(Path(classes_file)), str(classes_file)
    elif classes is not None:
        order, origin = [str(c) for c in classes], classes_origin
    if order is not None:
        index = _class_index(order)
        unknown = sorted(n for n in per_class if _lookup(index, n) is None)
        if unknown:
            raise InputError(
                f"{p}: class folders not in {origin}: {', '.join(unknown[:3])}"
                + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
            )
    else:
        for cand in (p / CLASSES_FILE, p.parent / CLASSES_FILE):
            if cand.is_file():
                names = _read_classes_file(cand)
                if set(per_class) <= set(names):  # only when it describes these folders
                    order = names
                    break
    if order is None:
        order = sorted(per_class)
    if index is None:
        index = _class_index(order)
    files: list[Path] = []
    labels: list[int] = []
    for name in sorted(per_class):
        files += per_class[name]
        labels += [_lookup(index, name)] * len(per_class[name])  # type: ignore[list-item]
    return files, labels, order


def _class_index(order: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """``(exact, lower)``: name -> label, and lower-cased name -> label for the names
    that stay unambiguous lower-cased (first occurrence wins in both)."""
    exact: dict[str, int] = {}
    lower: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        exact.setdefault(name, i)
        lower.setdefault(name.lower(), []).append(i)
    return exact, {k: v[0] for k, v in lower.items() if len(v) == 1}


def _lookup(index: tuple[dict[str, int], dict[str, int]], name: str) -> int | None:
    """Label of a class folder: its exact name first, then case-insensitively."""
    exact, lower = index
    return exact[name] if name in exact else lower.get(name.lower())


# --------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB (alpha dropped, as torchvision's loader does)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _resized_short(prep: Preprocess) -> int:
    return int(round(prep.resolution / prep.crop))


def _draft_request(img: Image.Image, prep: Preprocess) -> tuple[int, int] | None:
    """Smallest decode size that leaves the geometry step (nearly) unaffected."""
    w, h = img.size
    margin = DRAFT_MARGIN[prep.resize_mode]
    if prep.resize_mode == "resize_then_crop":
        scale = _resized_short(prep) / min(w, h)  # antialiased resize: output size suffices
    else:
        scale = prep.resolution / (prep.crop * min(w, h))
    scale *= margin
    if scale >= 0.5:  # draft could not even halve it
        return None
    return (math.ceil(w * scale), math.ceil(h * scale))


def preprocess_image(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """RGB PIL image -> uint8 (3, R, R) after resize and crop (no normalisation)."""
    img = to_rgb(img)
    res = prep.resolution
    if prep.resize_mode == "resize_then_crop":
        # torchvision: Resize(shorter side -> s, PIL bilinear w/ antialias) + CenterCrop(res)
        s = _resized_short(prep)
        w, h = img.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        top = int(round((nh - res) / 2.0))
        left = int(round((nw - res) / 2.0))
        arr = np.asarray(img.crop((left, top, left + res, top + res)))
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    # TF-slim: tf.image.central_crop(fraction) on both axes, then bilinear resize
    # (half-pixel centers, no antialias), computed in float and rounded back to uint8.
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    top = int((h - h * prep.crop) / 2)
    left = int((w - w * prep.crop) / 2)
    arr = arr[top : h - top, left : w - left]
    chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if chw.shape[1:] != (res, res):
        x = F.interpolate(
            chw.unsqueeze(0).float(), size=(res, res), mode="bilinear", align_corners=False
        )
        chw = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return chw.numpy()


def _decode_one(path: Path, prep: Preprocess, draft: bool) -> tuple[np.ndarray | None, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC chatter; broken files raise anyway
            with Image.open(path) as img:
                if draft and img.format == "JPEG":
                    req = _draft_request(img, prep)
                    if req is not None:
                        img.draft(None, req)
                img.load()
                return preprocess_image(img, prep), ""
    except Exception as exc:  # any decode failure means "skip this file"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{path.name}: {msg[:100]}"


def _decode_all(
    files: list[Path],
    prep: Preprocess,
    draft: bool,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode in a thread pool; returns (stacked good images, ok mask, error messages)."""
    res = prep.resolution
    out = np.empty((len(files), 3, res, res), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda f: _decode_one(f, prep, draft), files)
        for i, (arr, err) in enumerate(results):
            if arr is None:
                errors.append(err)
            else:
                out[i] = arr
                ok[i] = True
            if progress is not None:
                progress(i + 1, len(files))
    return (out if ok.all() else out[ok]), ok, errors  # no 2x copy in the common case


def _load_npz(
    p: Path, prep: Preprocess, size: int | None, seed: int, workers: int
) -> CalibData:
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z.files:
                raise InputError(f"{p}: .npz has no 'images' array (found: {', '.join(z.files)})")
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz ({str(exc)[:100]})") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(
            f"{p}: 'images' must be uint8 of shape (N, H, W, 3), got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise InputError(f"{p}: 'images' is empty")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{p}: 'labels' must be {images.shape[0]} integers, got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
    idx = np.arange(images.shape[0])
    if size is not None and size < len(idx):
        idx = np.sort(np.random.default_rng(seed).permutation(len(idx))[:size])

    def one(i: int) -> np.ndarray:
        return preprocess_image(Image.fromarray(images[i], "RGB"), prep)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = np.stack(list(pool.map(one, idx.tolist())))
    return CalibData(
        images=torch.from_numpy(out),
        labels=None if labels is None else torch.from_numpy(labels[idx].astype(np.int64)),
        mean=tuple(float(v) for v in prep.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep.std),  # type: ignore[arg-type]
        files=[f"{p}[{i}]" for i in idx.tolist()],
        skipped=0,
        source=str(p),
    )


# ------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    return Path(os.environ.get("HFB_CACHE") or Path.home() / ".cache" / "hfbconvert")


def _cache_key(files: list[Path], prep: Preprocess, draft: bool) -> str | None:
    """Hash of everything the uint8 result depends on (not mean/std: applied lazily)."""
    entries = []
    try:
        for f in files:
            st = f.stat()
            entries.append((str(f.resolve()), st.st_mtime_ns, st.st_size))
    except OSError:
        return None  # a file vanished or is unreadable: decode (and report) instead
    desc = {
        "v": CACHE_VERSION,
        "files": entries,
        "resolution": prep.resolution,
        "crop": prep.crop,
        "resize_mode": prep.resize_mode,
        "draft": draft,
        "draft_margin": DRAFT_MARGIN,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def _cache_path(key: str) -> Path:
    return cache_dir() / f"calib-{key}.npz"


def _cache_read(key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    path = _cache_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["ok"], [str(e) for e in z["errors"]]
    except Exception:  # a damaged cache is just a miss
        return None


def _cache_write(key: str, images: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
    """Best effort: a read-only or full cache folder must never fail the run."""
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=images, ok=ok, errors=np.array(errors, dtype=str))

        atomic_write(path, write)
    except OSError:
        pass
