"""Calibration readers and presets: every input layout, odd image modes, bad files,
deterministic subsets, exact preprocessing geometry and the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hfbconvert.calib import (
    PRESETS,
    Preprocess,
    apply_overrides,
    get_preset,
    load_images,
    preset_for,
    readers,
)
from hfbconvert.calib.readers import CalibData, preprocess_image
from hfbconvert.errors import InputError
from hfbconvert.models import ModelInfo

RES = 16
PREP = Preprocess(RES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0, "crop_then_resize")


def _rgb(w: int = 24, h: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_rgb(seed=seed))
    if mode == "P":
        img = img.convert("P")
        img.info["transparency"] = 0
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ImageFolder with every awkward mode/format and one corrupt file."""
    root = tmp_path / "train"
    _write(root / "cat" / "a.jpg", "L")
    _write(root / "cat" / "b.jpg", "CMYK")
    _write(root / "cat" / "c.png", "RGBA")
    _write(root / "dog" / "d.png", "P")
    _write(root / "dog" / "e.bmp", "RGB")
    _write(root / "dog" / "sub" / "f.JPEG", "RGB", fmt="JPEG")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored")
    (root / "empty_class").mkdir()
    return root


# --------------------------------------------------------------------------- layouts


def test_image_folder_modes_and_skips(folder: Path) -> None:
    data = load_images(folder, PREP, cache=False)
    assert len(data) == 6 and data.skipped == 1
    assert "broken.jpg" in data.skipped_examples[0]
    assert data.images.dtype == torch.uint8 and data.images.shape == (6, 3, RES, RES)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.classes == ["cat", "dog"]
    assert [Path(f).name for f in data.files] == ["a.jpg", "b.jpg", "c.png", "d.png", "e.bmp",
                                                  "f.JPEG"]
    gray = data.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"{i}.png", seed=i)
    data = load_images(tmp_path, PREP, cache=False)
    assert len(data) == 3 and data.labels is None and data.classes is None


def test_npz_input(tmp_path: Path) -> None:
    imgs = np.stack([_rgb(seed=i) for i in range(5)])
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(5))
    data = load_images(tmp_path / "d.npz", PREP)
    assert data.images.shape == (5, 3, RES, RES) and data.labels.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "u.npz", images=imgs)
    assert load_images(tmp_path / "u.npz", PREP).labels is None
    sub = load_images(tmp_path / "d.npz", PREP, size=2, seed=3)
    assert len(sub) == 2 and sub.labels.tolist() == [int(f[-2]) for f in sub.files]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((2, 8, 8), np.uint8)}, "uint8 of shape"),
        ({"images": np.zeros((2, 8, 8, 3), np.float32)}, "uint8 of shape"),
        ({"pixels": np.zeros((2, 8, 8, 3), np.uint8)}, "no 'images'"),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.zeros(3)}, "'labels'"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=match):
        load_images(tmp_path / "bad.npz", PREP)


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=str(tmp_path)):
        load_images(tmp_path, PREP)
    with pytest.raises(InputError, match="no such file"):
        load_images(tmp_path / "nope", PREP)
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(InputError, match="none of the 1 images"):
        load_images(tmp_path, PREP, cache=False)
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(InputError, match="expected a folder"):
        load_images(tmp_path / "file.txt", PREP)
    with pytest.raises(InputError, match=">= 1"):
        load_images(tmp_path, PREP, size=0)


# ---------------------------------------------------------------------------- labels


def test_sibling_synset_words_orders_labels(tmp_path: Path) -> None:
    """DATA.md: class index = line in synset_words.txt, even with classes missing."""
    (tmp_path / "synset_words.txt").write_text("n03 zebra\nn01 apple\nn02 banana\n")
    _write(tmp_path / "val" / "n02" / "a.png")
    _write(tmp_path / "val" / "n03" / "b.png")
    data = load_images(tmp_path / "val", PREP, cache=False)
    assert data.labels.tolist() == [2, 0]
    assert data.classes == ["n03", "n01", "n02"]


def test_unrelated_sibling_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "synset_words.txt").write_text("n01 apple\n")
    _write(tmp_path / "val" / "b" / "a.png")
    _write(tmp_path / "val" / "a" / "b.png")
    assert load_images(tmp_path / "val", PREP, cache=False).labels.tolist() == [0, 1]


def test_classes_file_and_list(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "x" / "a.png")
    _write(tmp_path / "d" / "y" / "b.png")
    cf = tmp_path / "classes.txt"
    cf.write_text("y\nx\n")
    assert load_images(tmp_path / "d", PREP, classes_file=cf, cache=False).labels.tolist() == [
        1,
        0,
    ]
    data = load_images(tmp_path / "d", PREP, classes=["q", "x", "y"], cache=False)
    assert data.labels.tolist() == [1, 2]
    cf.write_text("y\n")
    with pytest.raises(InputError, match="not in .*classes.txt: x"):
        load_images(tmp_path / "d", PREP, classes_file=cf, cache=False)


# ------------------------------------------------------------------------ subsampling


def test_subsample_is_seeded(tmp_path: Path) -> None:
    for i in range(12):
        _write(tmp_path / f"c{i % 3}" / f"{i:02d}.png", seed=i)
    a = load_images(tmp_path, PREP, size=5, seed=1, cache=False)
    b = load_images(tmp_path, PREP, size=5, seed=1, cache=False)
    c = load_images(tmp_path, PREP, size=5, seed=2, cache=False)
    assert a.files == b.files and torch.equal(a.images, b.images) and len(a) == 5
    assert a.files != c.files
    assert a.files == sorted(a.files)  # subset keeps the sorted order
    assert len(load_images(tmp_path, PREP, size=100, cache=False)) == 12


def test_split_batches_and_normalization(tmp_path: Path) -> None:
    for i in range(10):
        _write(tmp_path / f"{i}.png", seed=i)
    data = load_images(tmp_path, PREP, cache=False)
    rest, held = data.split(0.3, seed=0)
    assert (len(rest), len(held)) == (7, 3)
    assert not set(rest.files) & set(held.files)
    assert held.files == data.split(0.3, seed=0)[1].files
    x = data.normalized()
    torch.testing.assert_close(x, (data.images.float() / 255 - 0.5) / 0.25)
    batches = list(data.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and batches[0][1] is None
    assert data.normalized(0).shape == (1, 3, RES, RES)


# ------------------------------------------------------------------- preprocessing


def test_crop_then_resize_matches_tf_central_crop() -> None:
    """central_crop keeps the central fraction of both axes (not a square)."""
    arr = _rgb(w=50, h=40)
    prep = Preprocess(32, (0.5,) * 3, (0.5,) * 3, 0.8, "crop_then_resize")
    out = preprocess_image(Image.fromarray(arr), prep)
    # h: start int((40 - 32) / 2) = 4 -> 32 rows; w: start 5 -> 40 columns -> resize 40->32
    crop = torch.from_numpy(arr[4:36, 5:45]).permute(2, 0, 1).float()[None]
    ref = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
    assert np.array_equal(out, ref[0].round().clamp(0, 255).byte().numpy())
    square = preprocess_image(Image.fromarray(arr[:, :40]), prep)  # 40x40: pure crop
    assert np.array_equal(square, arr[4:36, 4:36].transpose(2, 0, 1))


def test_resize_then_crop_matches_torchvision() -> None:
    """Resize(256) on the shorter side (PIL bilinear) then CenterCrop(224)."""
    img = Image.fromarray(_rgb(w=300, h=200))
    out = preprocess_image(img, PRESETS["torchvision-imagenet"])
    big = np.asarray(img.resize((384, 256), Image.BILINEAR))
    assert out.shape == (3, 224, 224)
    assert np.array_equal(out, big[16:240, 80:304].transpose(2, 0, 1))


def test_jpeg_draft_changes_little(tmp_path: Path) -> None:
    """Draft (DCT-domain downscaling) must not change the preprocessed pixels noticeably."""
    yy, xx = np.mgrid[0:768, 0:1024]
    smooth = np.stack([xx % 256, yy % 256, (xx + yy) // 8 % 256], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    for prep in (PRESETS["torchvision-imagenet"], PRESETS["tf-inception"]):
        full = load_images(tmp_path, prep, draft=False, cache=False).images.float()
        fast = load_images(tmp_path, prep, draft=True, cache=False).images.float()
        assert (full - fast).abs().mean() < 4.0


# ---------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFB_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "imgs"
    for i in range(3):
        _write(src / f"{i}.png", seed=i)
    (src / "bad.png").write_bytes(b"nope")
    first = load_images(src, PREP)
    assert len(list((tmp_path / "cache").glob("calib-*.u8"))) == 1
    assert len(list((tmp_path / "cache").glob("calib-*.json"))) == 1  # the index, last

    def boom(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(readers, "_decode_all", boom)
    again = load_images(src, PREP)
    assert torch.equal(first.images, again.images) and again.files == first.files
    assert again.skipped == 1 and again.skipped_examples == first.skipped_examples
    other_norm = load_images(src, Preprocess(RES, (0.1,) * 3, (0.2,) * 3, 1.0, PREP.resize_mode))
    assert torch.equal(other_norm.images, first.images)  # mean/std are applied lazily

    st = (src / "0.png").stat()
    os.utime(src / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_images(src, PREP)


def test_unwritable_cache_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("HFB_CACHE", str(blocker / "sub"))
    _write(tmp_path / "imgs" / "a.png")
    assert len(load_images(tmp_path / "imgs", PREP)) == 1


# --------------------------------------------------------------------------- presets


def test_preset_for_and_overrides() -> None:
    info = ModelInfo("mobilenet_v1", {}, resolution=160, mean=(0.5,) * 3, std=(0.5,) * 3,
                     crop=0.875, resize_mode="crop_then_resize")
    prep = preset_for(info)
    assert prep == Preprocess(160, (0.5,) * 3, (0.5,) * 3, 0.875, "crop_then_resize")
    assert apply_overrides(prep) is prep
    p2 = apply_overrides(prep, resolution=128, mean=[0.4], crop=1.0)
    assert (p2.resolution, p2.mean, p2.crop, p2.std) == (128, (0.4,) * 3, 1.0, (0.5,) * 3)
    p3 = apply_overrides(prep, preset="torchvision-imagenet")
    assert p3.resolution == 160 and p3.resize_mode == "resize_then_crop"
    assert get_preset("cifar10").resolution == 32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop": 1.5}, "crop"),
        ({"crop": 0.0}, "crop"),
        ({"resolution": 2}, "resolution"),
        ({"std": [0.0]}, "std"),
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"resize_mode": "stretch"}, "resize mode"),
        ({"preset": "nope"}, "unknown preprocessing preset"),
    ],
)
def test_bad_overrides(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        apply_overrides(PRESETS["tf-inception"], **kwargs)


def test_sample_is_seeded_spread_and_in_file_order():
    """Statistics must come from a random sample, never the first n (class-sorted)."""
    n = 100
    data = CalibData(images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
                     labels=torch.arange(n) // 10, files=[f"f{i}" for i in range(n)],
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="mem")
    a, b = data.sample(20, seed=3), data.sample(20, seed=3)
    assert a.files == b.files and len(a) == 20
    idx = [int(f[1:]) for f in a.files]
    assert idx == sorted(idx) and len(set(idx)) == 20
    assert len(set(a.labels.tolist())) >= 6  # spread over classes, not the first two
    assert data.sample(20, seed=4).files != a.files
    assert len(data.sample(500)) == n
