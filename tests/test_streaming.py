"""Calibration images streamed from disk: results identical to holding them in memory,
bounded reads whatever the number of images, and one-line errors for bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hfbconvert.calib import preset_for, readers
from hfbconvert.calib.readers import ImageFile, load_images
from hfbconvert.cli import main
from hfbconvert.distill import FinetuneConfig
from hfbconvert.errors import InputError
from hfbconvert.pipeline import CompressConfig, compress
from hfbconvert.stats import collect_input_stats

from .test_cli import one_error
from .tiny import tiny_info, tiny_v1, write_npz, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _on_disk(tmp_path: Path, n: int) -> readers.CalibData:
    data = load_images(write_npz(tmp_path / f"d{n}.npz", n=n), preset_for(tiny_info()))
    assert isinstance(data.images, ImageFile)  # read from a file, not held
    return data


def _cfg() -> CompressConfig:
    return CompressConfig(budget=0.6, stats_images=48, fragility=True,
                          finetune=FinetuneConfig(steps=3, batch_size=8, eval_every=1))


def test_streamed_compress_equals_in_memory(tmp_path: Path) -> None:
    """Same images on disk or in memory: the same weights and metadata, bit for bit
    (statistics, held-apart checks and fine-tune draws see the same bytes)."""
    disk = _on_disk(tmp_path, 80)
    mem = replace(disk, images=disk.images.tensor())
    assert isinstance(mem.images, torch.Tensor)
    out = [compress(tiny_v1(), tiny_info(), d, _cfg()) for d in (disk, mem)]
    (a, meta_a), (b, meta_b) = out
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for key in ("plan", "layer_errors", "finetune_log", "calibration", "sensitivity"):
        assert meta_a[key] == meta_b[key], key
    assert [(s["stage"], s["agreement"]) for s in meta_a["stages"]] == \
        [(s["stage"], s["agreement"]) for s in meta_b["stages"]]
    assert meta_a["finetune_log"]["loss"]  # the fine-tune ran (its draws are compared)


def test_streamed_statistics_equal_in_memory_and_batching(tmp_path: Path) -> None:
    """Σ and the mean are sums over batches: streaming in batches of 7 from disk gives
    what one in-memory batch of all images gives, to float64 rounding. The network runs in
    float64 here: float32 convolutions may round differently at another batch size (they
    did by 3e-5 relative on an AMD EPYC), which is not what this tests."""
    disk = _on_disk(tmp_path, 40)
    model = tiny_v1().double()
    names = ["blocks.0.conv_pw", "blocks.3.conv_pw", "classifier"]
    streamed = collect_input_stats(model, names, (x.double() for x, _ in disk.batches(7)),
                                   max_pixels=10**6)
    whole = collect_input_stats(model, names,
                                [disk.normalize(disk.images.tensor()).double()],
                                max_pixels=10**6)
    for n in names:
        torch.testing.assert_close(streamed[n].sigma, whole[n].sigma, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(streamed[n].mean, whole[n].mean, rtol=1e-10, atol=1e-12)
        assert streamed[n].count == whole[n].count


def test_reads_are_bounded_and_nothing_holds_the_whole_set(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Instrumented reads: a compress over 300 images never reads more than one batch at
    a time, never materializes the set, and the decode pass holds one chunk at a time."""
    chunks: list[int] = []
    real_write = readers._write_records
    monkeypatch.setattr(readers, "_write_records",
                        lambda fh, arrays, rec: real_write(
                            fh, iter(chunks.append(len(a := list(arrays))) or a), rec))
    data = _on_disk(tmp_path, 300)
    assert chunks and max(chunks) <= readers.DECODE_CHUNK < 300

    reads: list[int] = []
    real_read = readers._Backing.read
    monkeypatch.setattr(readers._Backing, "read",
                        lambda self, pos: reads.append(len(pos)) or real_read(self, pos))

    def whole(self):
        raise AssertionError("the pipeline read every image into memory")

    monkeypatch.setattr(ImageFile, "tensor", whole)
    compress(tiny_v1(), tiny_info(), data, _cfg())
    assert reads and max(reads) <= 64 < len(data)  # 64: the statistics batch


def test_dataloader_workers_give_the_same_batches(tmp_path: Path) -> None:
    data = _on_disk(tmp_path, 30)
    a = [(x, y) for x, y in data.batches(8, workers=0)]
    b = [(x, y) for x, y in data.batches(8, workers=1)]
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_views_read_nothing_until_indexed(tmp_path: Path) -> None:
    data = _on_disk(tmp_path, 50)
    backing = data.images.backing
    before = backing.reads
    train, held = data.split(0.2, seed=3)
    sub = train.sample(10, seed=1)
    assert backing.reads == before  # splitting and sampling are index arithmetic
    x = sub.take(torch.tensor([3, 1]))
    assert backing.reads == before + 2 and x.shape == (2, 3, 32, 32)
    full = data.images.tensor()
    pos = sub.images.index[[3, 1]]
    assert torch.equal(x, full[torch.as_tensor(pos)])


# ------------------------------------------------------------------------ bad input


def test_empty_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    model = write_reference_checkpoint(tmp_path / "m.pt")
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["compress", str(model), "--calib", str(tmp_path / "empty"),
                                    "-o", str(tmp_path / "o.hfb.pt")])
    one_error(res, str(tmp_path / "empty"), "no images found")


def test_unreadable_image_is_one_line_exit_2_naming_it(tmp_path: Path) -> None:
    model = write_reference_checkpoint(tmp_path / "m.pt")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["compress", str(model), "--calib", str(tmp_path / "imgs"),
                                    "-o", str(tmp_path / "o.hfb.pt")])
    one_error(res, "broken.png")


def test_decoded_file_changed_under_a_run_is_one_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HFB_CACHE", str(tmp_path / "cache"))
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    data = load_images(tmp_path / "imgs", preset_for(tiny_info()))
    cached = Path(data.images.backing.path)
    assert cached.is_file() and cached.parent == tmp_path / "cache"
    with open(cached, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(InputError, match=str(cached)) as exc:
        data.take(torch.tensor([3]))
    assert "\n" not in str(exc.value)


def test_worker_error_arrives_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A library error in a DataLoader worker reaches the caller as itself, one line:
    torch would re-raise it with the worker's traceback in the message."""
    monkeypatch.setenv("HFB_CACHE", str(tmp_path / "cache"))
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    data = load_images(tmp_path / "imgs", preset_for(tiny_info()))
    assert sum(x.shape[0] for x, _ in data.batches(2, workers=1)) == 6
    with open(data.images.backing.path, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(InputError, match="truncated") as exc:
        list(data.batches(2, workers=1))
    assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


def test_rss_section_is_rendered_from_the_results_file_and_spliced(tmp_path: Path) -> None:
    from bench import rss

    rows = [{"label": lab, "commit": c, "calib_size": n, "peak_rss_mib": m, "wall_s": 10.0,
             "images_used": n} for lab, c, n, m in
            [("before", "aaa", 256, 869.4), ("before", "aaa", 5000, 2332.0),
             ("after", "bbb", 256, 600.0), ("after", "bbb", 5000, 610.0)]]
    res = {"command": "python -m bench.rss --x", "model": "/m/mobilenet.pt",
           "calib": "/d/calib", "rows": rows}
    text = rss.render(res)
    assert "| before (`aaa`) | 869 (10 s) | 2,332 (10 s) |" in text
    assert "| after (`bbb`) | 600 (10 s) | 610 (10 s) |" in text
    md = tmp_path / "B.md"
    md.write_text("# top\n\n<!-- generated:other -->\nkeep\n<!-- /generated -->\n")
    rss.splice(md, text)
    rss.splice(md, text.replace("610 (10 s)", "611 (10 s)"))
    out = md.read_text()
    assert out.count(rss.START) == 1 and "611 (10 s)" in out and "610 (10 s)" not in out
    assert "<!-- generated:other -->\nkeep\n<!-- /generated -->" in out
    noted = rss.render({**res, "note": "Only this note."})  # a run's own explanation
    assert noted.rstrip().endswith("Only this note.") and "*before*: every" not in noted


def test_digests_of_streamed_images_equal_in_memory_ones(tmp_path: Path) -> None:
    """Checkpoint identities and results files' image digests hash the images as they
    are read: the same digests as of the whole array (old checkpoints and per-image
    results still match)."""
    import numpy as np

    from hfbconvert.distill import fingerprint
    from hfbconvert.evaluation import PerImage, per_image_record

    disk = _on_disk(tmp_path, 70)
    mem = replace(disk, images=disk.images.tensor())
    assert fingerprint([("images", disk.images)]) == fingerprint([("images", mem.images)])
    r = PerImage(pred=np.zeros(70, dtype=np.int64), correct=None, correct5=None,
                 ref_pred=None, ref_correct=None, kl=None)
    assert per_image_record(r, disk)["images_sha256"] == per_image_record(r, mem)[
        "images_sha256"]
    sub = disk.sample(9, seed=2)
    assert fingerprint([("x", sub.images)]) == fingerprint([("x", sub.images.tensor())])


def test_data_workers_is_passed_down_not_left_in_a_module(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """--data-workers reaches the data it reads (``CalibData.workers``) as an argument:
    the next command in the same process reads with the default again (it once set a
    module-level default that outlived the command)."""
    from hfbconvert import cli

    model = write_reference_checkpoint(tmp_path / "m.pt")
    npz = write_npz(tmp_path / "c.npz", n=24)
    seen: list[int] = []
    monkeypatch.setattr(cli, "_compress", lambda net, info, data, *a, **k: seen.append(
        data.workers))
    for extra in (["--data-workers", "1"], []):
        res = CliRunner().invoke(main, ["compress", str(model), "--calib", str(npz),
                                        "-o", str(tmp_path / "o.hfb.pt"), *extra])
        assert res.exit_code == 0, res.output
    assert seen == [1, 0]
    assert readers.DEFAULT_LOADER_WORKERS == 0


def test_images_held_at_once_do_not_grow_with_the_number_of_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every normalized batch the pipeline makes is counted while it is alive: with 160 or
    1,000 images (200 held apart, four check batches) at most two 64-image batches are
    in memory at any time (the one in use and the next being read), never the held-apart
    set or the calibration set: what grows with N is bookkeeping, not images."""
    import weakref

    live, peak = [0], [0]
    real = readers.CalibData.normalize

    def counted(self: readers.CalibData, x: torch.Tensor) -> torch.Tensor:
        out = real(self, x)
        k = out.shape[0]
        live[0] += k
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, lambda: live.__setitem__(0, live[0] - k))
        return out

    monkeypatch.setattr(readers.CalibData, "normalize", counted)
    # uniform plan (no planner solve): the stages that read images are the same
    cfg = replace(_cfg(), budget=None, critical_fraction=0.5,
                  finetune=FinetuneConfig(steps=0))
    peaks, held = {}, {}
    for n in (160, 1000):
        peak[0] = 0
        _, meta = compress(tiny_v1(), tiny_info(), _on_disk(tmp_path, n), cfg)
        peaks[n], held[n] = peak[0], meta["calibration"]["held_images"]
    assert held[1000] == 200 > 2 * 64  # the held-apart set alone is over three batches
    assert 0 < peaks[160] <= 2 * 64 and 0 < peaks[1000] <= 2 * 64, peaks
    assert live[0] == 0  # nothing kept after the run


def test_output_errors_equal_comparing_both_networks_stored_outputs() -> None:
    """output_errors compares each hybrid output as it is produced (only the original's
    outputs are kept per batch): the same floats as storing both networks' outputs."""
    from hfbconvert.pipeline import output_errors

    torch.manual_seed(0)
    model, hybrid = tiny_v1(0).eval(), tiny_v1(1).eval()
    names = ["blocks.0.conv_pw", "blocks.3.conv_pw", "classifier"]
    images = [torch.randn(5, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    acc = {n: [0.0, 0.0] for n in names}
    with torch.no_grad():
        for x in images:
            outs = []
            for net in (model, hybrid):
                store: dict[str, torch.Tensor] = {}
                hs = [net.get_submodule(n).register_forward_hook(
                    lambda _m, _i, o, n=n, s=store: s.__setitem__(n, o.detach()))
                    for n in names]
                net(x)
                for h in hs:
                    h.remove()
                outs.append(store)
            for n in names:
                acc[n][0] += float((outs[1][n] - outs[0][n]).pow(2).sum())
                acc[n][1] += float(outs[0][n].pow(2).sum())
    want = {n: a / b for n, (a, b) in acc.items()}
    assert output_errors(model, hybrid, names, images) == want
    assert all(v > 0 for v in want.values())


def test_release_freed_finds_malloc_trim_on_glibc() -> None:
    import platform

    from hfbconvert.memory import release_freed

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; elsewhere release_freed is a no-op")
    assert release_freed() is True
