"""Never lose the user's work: each case is a one-line reproduction of a way a file was
destroyed, clobbered, left unverified or written after a failed check."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hfbconvert import fileio, verify
from hfbconvert.errors import InputError

from .test_cli import FASTEST, _write_healthy_checkpoint, ok, one_error, run, temp_leftovers
from .tiny import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nlw")
    npz = write_npz(d / "calib.npz")
    model = _write_healthy_checkpoint(d / "tiny.pt", npz)
    art = d / "c.hfb.pt"
    ok(run("compress", model, "--calib", npz, *FASTEST, "-o", art, "-q"))
    return {"dir": d, "calib": npz, "model": model, "art": art}


def _fresh(work: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the artifact, so a test may try to destroy it."""
    p = tmp_path / "c.hfb.pt"
    p.write_bytes(work["art"].read_bytes())
    return p


def test_compress_refuses_output_equal_to_input(work, tmp_path) -> None:
    model = tmp_path / "m.pt"
    model.write_bytes(work["model"].read_bytes())
    before = model.read_bytes()
    one_error(run("compress", model, "-o", model, "--force", *FASTEST), str(model), "input")
    assert model.read_bytes() == before


def test_export_refuses_output_equal_to_input(work, tmp_path) -> None:
    art = _fresh(work, tmp_path)
    before = art.read_bytes()
    one_error(run("export", "onnx", art, "-o", art, "--force"), str(art), "input")
    assert art.read_bytes() == before
    link = tmp_path / "alias.onnx"  # the same file under another name
    os.link(art, link)
    one_error(run("export", "onnx", art, "-o", link, "--force"), "input")
    assert art.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dir"])
def test_force_never_replaces_a_non_regular_file(work, tmp_path, kind) -> None:
    target = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "real.onnx").write_text("keep me")
        target.symlink_to(tmp_path / "real.onnx")
    else:
        target.mkdir()
    one_error(run("export", "onnx", work["art"], "-o", target, "--force", "--no-verify"),
              str(target))
    assert os.path.lexists(target)
    if kind == "symlink":
        assert target.is_symlink() and (tmp_path / "real.onnx").read_text() == "keep me"


def test_device_nodes_are_refused_up_front() -> None:
    """/dev/null and /dev/full: refused by the check, before anything is written."""
    for dev in ("/dev/null", "/dev/full"):
        if os.path.exists(dev):
            with pytest.raises(InputError, match="character device"):
                fileio.check_output_path(dev, force=True)


def test_export_keeps_existing_reports_without_force(work, tmp_path) -> None:
    (tmp_path / "m.report.json").write_text("mine")
    one_error(run("export", "onnx", work["art"], "-o", tmp_path / "m.onnx", "--no-verify"),
              "m.report.json", "--force")
    assert (tmp_path / "m.report.json").read_text() == "mine"
    assert not (tmp_path / "m.onnx").exists()
    ok(run("export", "onnx", work["art"], "-o", tmp_path / "m.onnx", "--no-verify", "--force",
           "-q"))
    assert (tmp_path / "m.report.json").read_text() != "mine"


def test_two_models_exported_into_one_folder_keep_their_reports(work, tmp_path) -> None:
    """Each export's report is named after its ONNX file: the second export into a folder
    neither fails on nor replaces the first one's report (nor a report.json of the user's,
    e.g. one that ``report --output-dir`` wrote there)."""
    import json

    (tmp_path / "report.json").write_text("mine")
    b = tmp_path / "b.hfb.pt"
    b.write_bytes(work["art"].read_bytes())
    ok(run("export", "onnx", work["art"], "-o", tmp_path / "a.onnx", "--no-verify", "-q"))
    ok(run("export", "onnx", b, "-o", tmp_path / "b.onnx", "--no-verify", "-q"))
    assert {p.name for p in tmp_path.iterdir()} == {
        "report.json", "b.hfb.pt", "a.onnx", "b.onnx",
        *(f"{s}.report.{e}" for s in "ab" for e in ("json", "md", "html"))}
    assert (tmp_path / "report.json").read_text() == "mine"
    for s in "ab":  # each report describes its own file
        rep = json.loads((tmp_path / f"{s}.report.json").read_text())
        assert rep["export"]["output"] == str(tmp_path / f"{s}.onnx")


def test_report_keeps_existing_files_without_force(work, tmp_path) -> None:
    (tmp_path / "report.md").write_text("mine")
    one_error(run("report", work["art"], "--output-dir", tmp_path), "report.md", "--force")
    assert (tmp_path / "report.md").read_text() == "mine"
    ok(run("report", work["art"], "--output-dir", tmp_path, "--force", "-q"))
    assert (tmp_path / "report.md").read_text() != "mine"


def test_export_reads_calib_before_writing(work, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    one_error(run("export", "onnx", work["art"], "-o", out, "--calib", tmp_path / "nope"),
              "nope")
    assert not out.exists() and not (tmp_path / "m.report.json").exists()
    assert temp_leftovers(tmp_path) == []


def test_export_failing_verification_never_takes_the_name(work, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(verify, "FLOAT_RTOL", -1.0)  # every logit is "off"
    monkeypatch.setattr(verify, "FLOAT_NOISE_FACTOR", 0.0)  # and no float32 rounding floor
    out = tmp_path / "m.onnx"
    res = run("export", "onnx", work["art"], "-o", out, "--no-report")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert not out.exists()
    assert (tmp_path / "m.unverified.onnx").is_file()
    assert "verify: FAIL" in res.stdout and "m.unverified.onnx" in res.stderr
    monkeypatch.undo()  # a rerun needs no --force: the good name was never taken
    ok(run("export", "onnx", work["art"], "-o", out, "--no-report", "-q"))
    assert out.is_file()


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_unwritable_output_folder_fails_before_work(work, tmp_path, where) -> None:
    if where == "under_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "m.hfb.pt"
    else:
        out = Path("/proc/m.hfb.pt")
    res = run("compress", work["model"], "--calib", work["calib"], *FASTEST, "-o", out)
    msg = one_error(res, str(out))
    assert ".tmp" not in msg and ".probe" not in msg


def test_second_run_on_a_locked_output_stops_at_once(work, tmp_path) -> None:
    out = tmp_path / "c.hfb.pt"
    with fileio.output_lock([out]):
        one_error(run("compress", work["model"], "--calib", work["calib"], *FASTEST, "-o",
                      out), str(out), "another hfbconvert run")
    assert not out.exists()
    ok(run("compress", work["model"], "--calib", work["calib"], *FASTEST, "-o", out, "-q"))
    assert not list(tmp_path.glob(".*.lock"))  # released and removed


def test_lock_excludes_a_second_holder_in_another_thread(tmp_path) -> None:
    out, errors = tmp_path / "x", []

    def second() -> None:
        try:
            with fileio.output_lock([out]):
                pass
        except InputError as exc:
            errors.append(str(exc))

    with fileio.output_lock([out]):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(errors) == 1 and "another hfbconvert run" in errors[0]
    with fileio.output_lock([out]):  # free again
        pass


def test_no_clobber_is_checked_again_at_the_rename(tmp_path) -> None:
    dest = tmp_path / "a.txt"
    with pytest.raises(InputError, match="appeared while this run worked"):
        with fileio.atomic_path(dest, overwrite=False) as tmp:
            tmp.write_text("new")
            dest.write_text("someone else's")  # created during the run
    assert dest.read_text() == "someone else's"
    assert temp_leftovers(tmp_path) == []


def test_report_json_pins_the_onnx_file(work, tmp_path) -> None:
    import hashlib
    import json

    out = tmp_path / "m.onnx"
    ok(run("export", "onnx", work["art"], "-o", out, "--no-verify", "-q"))
    rep = json.loads((tmp_path / "m.report.json").read_text())
    assert rep["export"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
