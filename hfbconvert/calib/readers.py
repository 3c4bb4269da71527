"""Calibration / evaluation image readers.

Images are decoded once, preprocessed geometrically (resize + crop) and written as uint8
3 x R x R records to a file on disk (the decode cache, or an anonymous temporary file
when caching is off); :class:`CalibData` reads them back batch by batch, so memory stays
flat in the number of images (a 100k-image training set costs a file, not RAM).
Normalisation is applied lazily per batch so that one decode serves any mean/std.
Decoding runs in a small thread pool (Pillow releases the GIL); the second run with the
same files and geometry reads the cache and decodes nothing.
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
import torch.utils.data
from PIL import Image

from hfbconvert.errors import HfbError, InputError
from hfbconvert.fileio import atomic_write

from .presets import Preprocess

IMAGE_EXTS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CLASSES_FILE = "synset_words.txt"
CACHE_VERSION = 2  # 2: raw record file + JSON index (1: one .npz, read whole)
# JPEG draft decoding (DCT downscaling) may shrink an image only while it stays at least
# this many times larger than what the geometry step needs; see _draft_request.
# images decoded per round before they are written out: what the decode pass holds
DECODE_CHUNK = 64
# DataLoader workers of CalibData.batches when load_images is given none; a constant (the
# CLI's --data-workers is passed to load_images and carried by CalibData.workers)
DEFAULT_LOADER_WORKERS = 0
DRAFT_MARGIN = {"resize_then_crop": 1.0, "crop_then_resize": 2.0}


class _Backing:
    """An open file of fixed-size uint8 records, shared by every view of it. Reads use
    ``os.pread`` (no file position, so forked DataLoader workers share the descriptor
    safely) and never map the file: mapped pages would count as the process's memory."""

    def __init__(self, fh: Any, shape: tuple[int, int, int, int], path: str = "") -> None:
        self.fh, self.shape, self.path = fh, shape, path
        self.record = int(np.prod(shape[1:]))
        self.reads = 0  # records read so far (tests bound what a pass holds with it)

    def read(self, pos: np.ndarray) -> np.ndarray:
        """Records at positions ``pos`` (any order), as a (k, 3, R, R) uint8 array; runs
        of consecutive positions are read with one call each."""
        out = np.empty((len(pos), *self.shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(pos), -1)
        fd, rec = self.fh.fileno(), self.record
        i = 0
        while i < len(pos):
            j = i + 1
            while j < len(pos) and pos[j] == pos[j - 1] + 1:
                j += 1
            want = (j - i) * rec
            buf = os.pread(fd, want, int(pos[i]) * rec)
            if len(buf) != want:
                raise InputError(f"{self.path or 'decoded image file'}: truncated (changed "
                                 "while in use?)")
            flat[i:j] = np.frombuffer(buf, dtype=np.uint8).reshape(j - i, rec)
            i = j
        self.reads += len(pos)
        return out

    def __getstate__(self) -> dict:  # spawn-started workers reopen the file by path
        if not self.path:
            raise TypeError("an anonymous decoded-image file cannot be sent to another "
                            "process; use fork-started workers or a cache")
        return {"shape": self.shape, "path": self.path, "record": self.record, "reads": 0}

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        self.fh = open(self.path, "rb")  # noqa: SIM115 - lives as long as the backing


class ImageFile:
    """A lazy (N, 3, R, R) uint8 image array on disk: indexing reads just those images
    (``images[idx]`` is a tensor), :meth:`view` selects without reading, :meth:`chunks`
    streams in order. Anything else a tensor has (``.float()``, ``.numpy()``,
    ``torch.equal``) reads the whole array into memory: a convenience for small sets;
    the pipeline never does it."""

    dtype = torch.uint8

    def __init__(self, backing: _Backing, index: np.ndarray | None = None) -> None:
        self.backing = backing
        self.index = np.arange(backing.shape[0]) if index is None else index

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.backing.shape[1:]))

    def __len__(self) -> int:
        return len(self.index)

    def dim(self) -> int:
        return 4

    @property
    def ndim(self) -> int:
        return 4

    def positions(self, key: Any) -> np.ndarray | int:
        if isinstance(key, (int, np.integer)):
            return int(self.index[key])
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return self.index[key if isinstance(key, slice) else np.asarray(key, dtype=np.int64)]

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):  # images[i, c, y, x]: the image first, then the rest
            return self[key[0]][(slice(None), *key[1:]) if not isinstance(
                key[0], (int, np.integer)) else key[1:]]
        pos = self.positions(key)
        if isinstance(pos, int):
            return torch.from_numpy(self.backing.read(np.array([pos]))[0])
        return torch.from_numpy(self.backing.read(pos))

    def view(self, idx: Any) -> ImageFile:
        return ImageFile(self.backing, np.asarray(self.positions(idx)).reshape(-1))

    def chunks(self, n: int = 256) -> Iterator[torch.Tensor]:
        for s in range(0, len(self), n):
            yield self[s:s + n]

    def tensor(self) -> torch.Tensor:
        """All images in memory (O(N)): for small sets and tests only."""
        return self[:]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.tensor().numpy()
        return a if dtype is None else a.astype(dtype)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("backing", "index"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        def conv(a: Any) -> Any:
            if isinstance(a, ImageFile):
                return a.tensor()
            if isinstance(a, (list, tuple)):
                return type(a)(conv(x) for x in a)
            return a
        return func(*conv(tuple(args)), **{k: conv(v) for k, v in (kwargs or {}).items()})


def chunks_of(images: torch.Tensor | ImageFile, n: int = 256) -> Iterator[torch.Tensor]:
    """The images in order, ``n`` at a time (bounded memory for a file-backed array)."""
    if isinstance(images, ImageFile):
        yield from images.chunks(n)
    else:
        for s in range(0, images.shape[0], n):
            yield images[s:s + n]


class _BatchSet(torch.utils.data.Dataset):
    """Dataset whose item ``i`` is the i-th batch (uint8 images, labels): one pread per
    run of consecutive images instead of one per image."""

    def __init__(self, images: torch.Tensor | ImageFile, labels: torch.Tensor | None,
                 batch_size: int) -> None:
        self.images, self.labels, self.bs = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.bs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        sl = slice(i * self.bs, (i + 1) * self.bs)
        return self.images[sl], None if self.labels is None else self.labels[sl]


class _Failed:
    """A DataLoader worker's library error, sent back whole: torch re-raises a worker's
    exception as ``type(msg)`` with the worker's traceback in the message (a multi-line
    message, or a RuntimeError when the type cannot be built from one string), so the
    CLI's one-line error and exit code would be lost."""

    def __init__(self, exc: HfbError) -> None:
        self.exc = exc


def _keep(batch: Any) -> Any:
    return batch


class _WorkerSet(torch.utils.data.Dataset):
    """:class:`_BatchSet` as a DataLoader worker reads it: library errors come back as
    :class:`_Failed` items, re-raised in the reading process."""

    def __init__(self, ds: _BatchSet) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.ds[i]
        except HfbError as exc:
            return _Failed(exc)


@dataclass
class CalibData:
    """Preprocessed images (uint8 NCHW: a tensor in memory, or an :class:`ImageFile` on
    disk) plus labels and the normalisation to apply. ``workers``: DataLoader worker
    processes of :meth:`batches` (0: read in this process; reads from the decoded file
    are cheap, so more only pays on machines with spare cores)."""

    images: torch.Tensor | ImageFile
    labels: torch.Tensor | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: list[str]
    skipped: int = 0
    source: str = ""
    classes: list[str] | None = None  # class name per label index, when known
    skipped_examples: list[str] = field(default_factory=list)  # "file: reason", a few
    workers: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def take(self, idx: Any) -> torch.Tensor:
        """uint8 images at ``idx`` (reads only those from disk)."""
        return self.images[idx]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N)CHW -> float32 model input with this data's mean/std."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (x.float() - mean) / std

    def normalized(self, idx: Any = None) -> torch.Tensor:
        """Float32 model input for ``images[idx]`` (all when ``idx`` is None: O(N) memory,
        prefer :meth:`batches`)."""
        return self.normalize(self.images[:] if idx is None else self.images[idx])

    def batches(self, batch_size: int = 64, workers: int | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(normalized float NCHW, labels or None)`` in file order, streamed from
        disk through a DataLoader (``workers`` processes; default ``self.workers``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        workers = self.workers if workers is None else workers
        ds = _BatchSet(self.images, self.labels, batch_size)
        if workers <= 0 or not isinstance(self.images, ImageFile) or len(ds) < 2:
            it: Iterator = (ds[i] for i in range(len(ds)))
        else:
            it = iter(torch.utils.data.DataLoader(_WorkerSet(ds), batch_size=None,
                                                  shuffle=False, num_workers=workers,
                                                  collate_fn=_keep, prefetch_factor=2))
        for item in it:
            if isinstance(item, _Failed):
                raise item.exc
            x, y = item
            yield self.normalize(x), y

    def subset(self, idx: Sequence[int] | range | np.ndarray | torch.Tensor) -> CalibData:
        """The images at ``idx`` (any integer sequence), labels and files alike; on disk
        a view (nothing is read)."""
        idx_np = np.asarray(idx, dtype=np.int64).reshape(-1)
        idx_t = torch.as_tensor(idx_np)
        images = self.images.view(idx_np) if isinstance(self.images, ImageFile) \
            else self.images[idx_t]
        return replace(
            self,
            images=images,
            labels=None if self.labels is None else self.labels[idx_t],
            files=[self.files[i] for i in idx_np.tolist()],
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
    loader_workers: int | None = None,
) -> CalibData:
    """Read an ImageFolder tree, a flat folder of images or an ``.npz`` and preprocess it.

    Labels of an ImageFolder come from, in order: ``classes_file`` (one class per line,
    first word = folder name, line number = label), ``classes`` (names in label order,
    matched case-insensitively when no exact match; ``classes_origin`` names them in the
    error for folders that match none), a ``synset_words.txt`` next to or inside the
    folder, else sorted folder names. Symlinks are followed, each real file once.
    ``size`` picks a seeded random subset of that many images (all when None/larger).
    Unreadable images are skipped and counted in ``CalibData.skipped``. The decoded
    images live in a file (the cache, else an anonymous temporary file) and are read back
    per batch; ``workers``: decoding threads, ``loader_workers``: DataLoader processes of
    :meth:`CalibData.batches`.
    """
    p = Path(path)
    if loader_workers is None:
        loader_workers = DEFAULT_LOADER_WORKERS
    if size is not None and size < 1:
        raise InputError(f"{p}: number of images must be >= 1, got {size}")
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return _load_npz(p, prep, size, seed, workers, loader_workers)
        raise InputError(f"{p}: expected a folder of images (or class sub-folders) or an .npz")

    files, folder_labels, names = _list_folder(p, classes_file, classes, classes_origin)
    keep = _sample_index(len(files), size, seed)
    files = [files[i] for i in keep]
    if folder_labels is not None:
        folder_labels = [folder_labels[i] for i in keep]
    backing, ok, errors = _decoded(files, prep, cache, draft, workers, progress)
    return _folder_data(p, prep, files, folder_labels, names, (backing, ok, errors),
                        loader_workers)


def _sample_index(n: int, size: int | None, seed: int) -> np.ndarray:
    """Positions of the seeded random ``size`` of ``n`` items, in order (all of them when
    ``size`` is None or not smaller): the same subset for a folder and an .npz."""
    if size is not None and size < n:
        return np.sort(np.random.default_rng(seed).permutation(n)[:size])
    return np.arange(n)


def _decoded(files: list[Path], prep: Preprocess, cache: bool, draft: bool, workers: int,
             progress: Callable[[int, int], None] | None,
             ) -> tuple[_Backing, np.ndarray, list[str]]:
    """(records file, ok mask, errors) of ``files``: read from the decode cache when a
    complete entry for these files and geometry exists, else decoded (and cached)."""
    key = _cache_key(files, prep, draft) if cache else None
    cached = _cache_read(key, len(files), prep.resolution) if key else None
    if cached is not None:
        return cached
    return _decode_all(files, prep, draft, workers, progress, key)


def _folder_data(p: Path, prep: Preprocess, files: list[Path], folder_labels: list[int] | None,
                 names: list[str] | None, decoded: tuple[_Backing, np.ndarray, list[str]],
                 loader_workers: int) -> CalibData:
    """The images that decoded (a view of the records that skips the others) with their
    files and labels; refuses a folder where none did."""
    backing, ok, errors = decoded
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
        images=ImageFile(backing, np.flatnonzero(ok)),
        labels=labels,
        mean=tuple(float(v) for v in prep.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep.std),  # type: ignore[arg-type]
        files=kept_files,
        skipped=len(files) - len(kept_files),
        source=str(p),
        classes=names,
        skipped_examples=errors[:3],
        workers=loader_workers,
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
    per_class, seen_files = _class_folders(p)
    if not per_class:  # flat folder
        return _flat_images(p, seen_files), None, None
    order, index = _class_order(p, per_class, classes_file, classes, classes_origin)
    files: list[Path] = []
    labels: list[int] = []
    for name in sorted(per_class):
        files += per_class[name]
        labels += [_lookup(index, name)] * len(per_class[name])  # type: ignore[list-item]
    return files, labels, order


def _class_folders(p: Path) -> tuple[dict[str, list[Path]], set]:
    """``(class folder name -> its images, the real files seen)`` for the sub-folders of
    ``p`` that hold images (empty: ``p`` is a flat folder)."""
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
    return {k: v for k, v in per_class.items() if v}, seen_files


def _flat_images(p: Path, seen_files: set) -> list[Path]:
    """The images directly in ``p`` (sorted, each real file once); refuses none."""
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
    return files


def _class_order(
    p: Path, per_class: dict[str, list[Path]], classes_file: str | os.PathLike | None,
    classes: Sequence[str] | None, classes_origin: str,
) -> tuple[list[str], tuple[dict[str, int], dict[str, int]]]:
    """Class names in label order and their lookup index: from ``classes_file``, else
    ``classes`` (every folder must be one of them), else a ``synset_words.txt`` next to
    or inside ``p`` that names every folder, else the sorted folder names."""
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
    return order, index


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


def _scratch_file() -> Any:
    """An anonymous file for decoded images when there is no cache to write (deleted by
    the OS when closed); in the cache folder when it exists, else the temp folder."""
    import tempfile

    d = cache_dir()
    try:
        return tempfile.TemporaryFile(dir=d if d.is_dir() else None)
    except OSError:
        return tempfile.TemporaryFile()


def _write_records(fh: Any, arrays: Iterator[np.ndarray | None], rec: int) -> None:
    zero = bytes(rec)
    for arr in arrays:
        fh.write(zero if arr is None else np.ascontiguousarray(arr).tobytes())


def _decode_all(
    files: list[Path],
    prep: Preprocess,
    draft: bool,
    workers: int,
    progress: Callable[[int, int], None] | None,
    key: str | None = None,
) -> tuple[_Backing, np.ndarray, list[str]]:
    """Decode in a thread pool, ``DECODE_CHUNK`` images at a time, each written as a
    record (zeros for an unreadable one) to the cache file of ``key`` (an anonymous file
    without one, or when the cache cannot be written); returns (the file, ok mask, error
    messages). Memory: one chunk, whatever the number of images."""
    res = prep.resolution
    shape = (len(files), 3, res, res)
    rec = 3 * res * res
    ok = np.zeros(len(files), dtype=bool)
    errors: list[str] = []
    tmp = _cache_tmp(key) if key else None
    fh = None
    if tmp is not None:
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "w+b")  # noqa: SIM115 - becomes the backing's file
        except OSError:
            tmp = None
    if fh is None:
        fh = _scratch_file()
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for s in range(0, len(files), DECODE_CHUNK):
                part = files[s:s + DECODE_CHUNK]
                out: list[np.ndarray | None] = []
                for i, (arr, err) in enumerate(pool.map(lambda f: _decode_one(f, prep, draft),
                                                        part), start=s):
                    if arr is None:
                        errors.append(err)
                    else:
                        ok[i] = True
                    out.append(arr)
                    if progress is not None:
                        progress(i + 1, len(files))
                _write_records(fh, iter(out), rec)
        fh.flush()
    except OSError as exc:  # e.g. the disk filled up: a one-line error, not a traceback
        fh.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise InputError(f"{getattr(fh, 'name', 'decoded image file')}: cannot write decoded "
                         f"images ({exc.strerror or exc})") from None
    if tmp is not None and key is not None:
        final = _cache_path(key)
        try:
            os.replace(tmp, final)
            _cache_write_index(key, shape, ok, errors)
            return _Backing(fh, shape, str(final)), ok, errors
        except OSError:
            tmp.unlink(missing_ok=True)  # the open file stays readable: used uncached
    return _Backing(fh, shape), ok, errors


def _load_npz(
    p: Path, prep: Preprocess, size: int | None, seed: int, workers: int,
    loader_workers: int | None = None,
) -> CalibData:
    """An .npz's 'images' (N, H, W, 3) read member by member from the zip (never the
    whole array at once), preprocessed into an anonymous decoded-image file."""
    import zipfile

    try:
        zf = zipfile.ZipFile(p)
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz ({str(exc)[:100]})") from None
    with zf:
        labels, member, (shape, fortran, dtype) = _npz_open(zf, p)
        with member:
            labels = _npz_checked(p, shape, fortran, dtype, labels)
            idx = _sample_index(shape[0], size, seed)
            fh = _preprocess_npz(member, p, shape, idx, prep, workers)
    res = prep.resolution
    backing = _Backing(fh, (len(idx), 3, res, res))
    return CalibData(
        images=ImageFile(backing),
        labels=None if labels is None else torch.from_numpy(labels[idx].astype(np.int64)),
        mean=tuple(float(v) for v in prep.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep.std),  # type: ignore[arg-type]
        files=[f"{p}[{i}]" for i in idx.tolist()],
        skipped=0,
        source=str(p),
        workers=loader_workers,
    )


def _npz_open(zf: Any, p: Path) -> tuple[np.ndarray | None, Any, tuple[Any, bool, Any]]:
    """``(labels or None, the open 'images' member positioned at its data, its .npy
    header (shape, fortran order, dtype))``: the labels are read whole (one integer per
    image), the images not yet."""
    names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    if "images" not in names:
        raise InputError(f"{p}: .npz has no 'images' array (found: {', '.join(names)})")
    try:
        labels = None
        if "labels" in names:
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
        member = zf.open("images.npy")
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        header = read_header(member, max_header_size=100_000)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz ({str(exc)[:100]})") from None
    return labels, member, header


def _npz_checked(p: Path, shape: tuple[int, ...], fortran: bool, dtype: Any,
                 labels: np.ndarray | None) -> np.ndarray | None:
    """Refuses 'images' that are not a non-empty (N, H, W, 3) uint8 array in C order, and
    'labels' that are not N integers; returns the labels flat."""
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
        raise InputError(
            f"{p}: 'images' must be uint8 of shape (N, H, W, 3), got "
            f"{dtype} {tuple(shape)}"
        )
    if shape[0] == 0:
        raise InputError(f"{p}: 'images' is empty")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{p}: 'labels' must be {shape[0]} integers, got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
    return labels


def _preprocess_npz(member: Any, p: Path, shape: tuple[int, ...], idx: np.ndarray,
                    prep: Preprocess, workers: int) -> Any:
    """The images at ``idx`` (sorted) of the .npy data in ``member``, read one record at
    a time and preprocessed ``DECODE_CHUNK`` at a time in a thread pool, as records in an
    anonymous file (returned, flushed)."""
    want = set(idx.tolist())
    rec_in = int(np.prod(shape[1:]))
    res = prep.resolution
    fh = _scratch_file()

    def raw() -> Iterator[np.ndarray]:
        for i in range(shape[0]):
            buf = member.read(rec_in)
            if len(buf) != rec_in:
                raise InputError(f"{p}: 'images' is truncated at image {i}")
            if i in want:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(shape[1:])

    def one(a: np.ndarray) -> np.ndarray:
        return preprocess_image(Image.fromarray(a, "RGB"), prep)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = raw()
        while True:
            part = [a for _, a in zip(range(DECODE_CHUNK), it, strict=False)]
            if not part:
                break
            _write_records(fh, iter(pool.map(one, part)), 3 * res * res)
    fh.flush()
    return fh


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
    """The decoded records (raw uint8, one 3 x R x R record per listed file)."""
    return cache_dir() / f"calib-{key}.u8"


def _cache_index(key: str) -> Path:
    """Shape, ok mask and errors of :func:`_cache_path`; written last, so it marks a
    complete cache entry."""
    return cache_dir() / f"calib-{key}.json"


def _cache_tmp(key: str) -> Path:
    return cache_dir() / f".calib-{key}.u8.{os.getpid()}.tmp"


def _cache_read(key: str, n: int, res: int) -> tuple[_Backing, np.ndarray, list[str]] | None:
    path, index = _cache_path(key), _cache_index(key)
    try:
        meta = json.loads(index.read_text())
        shape = (n, 3, res, res)
        if tuple(meta["shape"]) != shape or path.stat().st_size != int(np.prod(shape)):
            return None
        ok = np.zeros(n, dtype=bool)
        ok[np.asarray(meta["ok"], dtype=np.int64)] = True
        errors = [str(e) for e in meta["errors"]]
        fh = open(path, "rb")  # noqa: SIM115 - lives as long as the backing
    except Exception:  # missing, damaged or foreign: just a miss
        return None
    return _Backing(fh, shape, str(path)), ok, errors


def _cache_write_index(key: str, shape: tuple, ok: np.ndarray, errors: list[str]) -> None:
    text = json.dumps({"v": CACHE_VERSION, "shape": list(shape),
                       "ok": np.flatnonzero(ok).tolist(), "errors": errors})
    atomic_write(_cache_index(key), lambda tmp: tmp.write_text(text))
