"""The demo's labelled photos: the manifest matches the installed files, and the builtin
model really recognises them (a property of the data, checked with one small forward)."""

from __future__ import annotations

import numpy as np
import pytest

from hfbconvert import demo


def _need_photos() -> None:
    missing = [img.name for img in demo.DEMO_IMAGES
               if (p := demo.image_path(img)) is None or not p.is_file()]
    if missing:
        pytest.skip(f"demo photos not installed ({', '.join(missing)}); "
                    f"`{demo.install_hint()}` (make venv does)")


def test_demo_manifest_is_well_formed() -> None:
    names = [img.name for img in demo.DEMO_IMAGES]
    assert len(names) == len(set(names)) >= 5
    for img in demo.DEMO_IMAGES:
        assert 0 <= img.label < 1000, img.name
        assert len(img.sha256) == 64 and int(img.sha256, 16) >= 0, img.name
        assert img.licence and img.credit and img.content and img.label_name, img.name
        # pinned packages come from the Makefile's install line, matplotlib from setup.cfg
        assert img.package[2] is None or img.package[1] in demo.install_hint(), img.name


def test_demo_photos_match_manifest() -> None:
    _need_photos()
    assert demo.check_images() == []
    for img in demo.DEMO_IMAGES:
        assert demo.sha256(demo.image_path(img)) == img.sha256, img.name


def test_demo_photos_npz(tmp_path) -> None:
    _need_photos()
    out = tmp_path / "photos.npz"
    demo.write_photos(out)
    with np.load(out) as z:
        assert z["images"].shape == (len(demo.DEMO_IMAGES), demo.PHOTO_SIZE,
                                     demo.PHOTO_SIZE, 3)
        assert z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [img.label for img in demo.DEMO_IMAGES]


def test_builtin_model_recognises_demo_photos(tmp_path, one_thread) -> None:
    """At 224 px (the model's own resolution) most photos are top-1 and all are top-5:
    the labels are ones the model can be judged against."""
    _need_photos()
    import torch

    from hfbconvert.calib.presets import preset_for
    from hfbconvert.calib.readers import load_images
    from hfbconvert.models.loading import builtin_path, load_model

    try:
        builtin_path("mobilenet_v2")
    except Exception as exc:  # noqa: BLE001 - the weights package is optional here
        pytest.skip(str(exc))
    net, info = load_model("builtin:mobilenet_v2")
    assert info.resolution == 224
    out = tmp_path / "photos.npz"
    demo.write_photos(out)
    data = load_images(str(out), preset_for(info))
    with torch.inference_mode():
        top5 = net.eval()(data.normalized()).topk(5, dim=1).indices
    labels = data.labels.unsqueeze(1)
    n = len(demo.DEMO_IMAGES)
    top1 = int((top5[:, :1] == labels).sum())
    assert top1 > n // 2, top5[:, 0].tolist()
    assert bool((top5 == labels).any(dim=1).all()), top5.tolist()


def test_summarize_counts() -> None:
    pred = {"labels": [1, 2, 3], "original": [[1, 9], [7, 2], [3, 0]],
            "hybrid": [[1, 9], [2, 7], [4, 5]]}
    s = demo.summarize(pred)
    assert s == {"n": 3, "top1": {"original": 2, "hybrid": 2},
                 "top5": {"original": 3, "hybrid": 2}, "agreement": 1}
