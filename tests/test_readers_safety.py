"""Folder listing is safe on symlink loops and maps class folders to the model's classes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hfbconvert.calib.imagenet import imagenet_classes
from hfbconvert.calib.presets import Preprocess
from hfbconvert.calib.readers import _list_folder, load_images
from hfbconvert.errors import InputError

PREP = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0, "crop_then_resize")


def _img(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)


def _tree(root: Path, classes: dict[str, int]) -> None:
    for i, (name, n) in enumerate(classes.items()):
        for j in range(n):
            _img(root / name / f"{j:03d}.png", seed=10 * i + j)


def _within(fn: Callable[[], Any], seconds: float = 20) -> Any:
    """``fn()`` with a time limit: a symlink loop must fail the test, not hang the run."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "listing did not terminate"
    return out[0]


def _list(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    return _within(lambda: _list_folder(root, None, None))


def test_one_symlink_loop_counts_each_file_once(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 24, "b": 24})
    os.symlink("..", tmp_path / "a" / "up")  # a/up -> the ImageFolder root
    files, labels, _ = _list(tmp_path)
    assert len(files) == 48
    assert labels.count(0) == 24 and labels.count(1) == 24  # b's images stay b's
    assert len({f.resolve() for f in files}) == 48


def test_two_symlink_loops_terminate(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "deep").mkdir()
    os.symlink("..", tmp_path / "a" / "deep" / "loop1")  # -> a
    os.symlink("../..", tmp_path / "a" / "deep" / "loop2")  # -> root
    os.symlink(".", tmp_path / "b" / "self")  # -> b
    os.symlink("../a", tmp_path / "b" / "other")  # -> the other class folder
    files, labels, _ = _list(tmp_path)
    assert len(files) == 6 and sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_symlinked_files_and_folders_are_read_once(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "sub").mkdir()
    os.symlink("../000.png", tmp_path / "a" / "sub" / "alias.png")  # same file again
    os.symlink(tmp_path / "b", tmp_path / "c")  # a class folder that is another one
    files, labels, _ = _list(tmp_path)
    assert len(files) == 4 and sorted(labels) == [0, 0, 1, 1]


def test_symlinks_outside_the_tree_are_followed(tmp_path: Path) -> None:
    """Links to real data elsewhere (a common way to assemble a folder) still count."""
    _tree(tmp_path / "store", {"x": 3})
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(tmp_path / "store" / "x", root / "a")
    _img(root / "b" / "1.png")
    files, labels, _ = _list(root)
    assert len(files) == 4 and sorted(labels) == [0, 0, 0, 1]


def test_flat_folder_symlink_duplicates(tmp_path: Path) -> None:
    _img(tmp_path / "1.png")
    _img(tmp_path / "2.png", 1)
    os.symlink("1.png", tmp_path / "3.png")
    files, labels, _ = _list(tmp_path)
    assert labels is None and [f.name for f in files] == ["1.png", "2.png"]


def test_load_images_on_a_loop(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 2, "b": 2})
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink("..", tmp_path / "b" / "up")
    assert len(_within(lambda: load_images(tmp_path, PREP, cache=False))) == 4


# ------------------------------------------------------------------ class mapping


def test_class_names_map_case_insensitively(tmp_path: Path) -> None:
    _tree(tmp_path, {"Dog": 2, "cat": 1})
    data = load_images(tmp_path, PREP, classes=["bird", "CAT", "dog"], cache=False)
    assert data.labels.tolist() == [2, 2, 1]  # Dog (sorted first) -> 2, cat -> 1


def test_unknown_class_names_name_the_folder(tmp_path: Path) -> None:
    _tree(tmp_path, {"cat": 1, "zebra": 1, "okapi": 1})
    with pytest.raises(InputError, match="okapi, zebra") as exc:
        load_images(tmp_path, PREP, classes=["cat", "dog"], cache=False,
                    classes_origin="the model's 2 class names")
    assert str(tmp_path) in str(exc.value) and "2 class names" in str(exc.value)


def test_imagenet_wnids_in_class_index_order() -> None:
    wnids, names = imagenet_classes()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert (wnids[0], names[0]) == ("n01440764", "tench, Tinca tinca")
    assert wnids[999] == "n15075141"


def test_wnid_folders_get_imagenet_indices(tmp_path: Path) -> None:
    wnids, _ = imagenet_classes()
    _tree(tmp_path, {wnids[5]: 1, wnids[900]: 1})
    data = load_images(tmp_path, PREP, classes=wnids, cache=False)
    assert data.labels.tolist() == [5, 900]
