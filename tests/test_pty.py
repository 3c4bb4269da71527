"""The CLI in a real terminal: stderr a TTY turns the rich progress bars on.

Pipes (CliRunner, CI logs) switch progress off, which is how a crash in the bar's
formatting of an unknown total reached every user at a terminal and no test. These run the
commands a user types under a pseudo-terminal and exercise bars of unknown length.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from hfbconvert import progress

from .tiny import write_npz, write_reference_checkpoint

REPO = Path(__file__).resolve().parent.parent


def run_in_pty(*args: str | os.PathLike, timeout: float = 240) -> tuple[int, str]:
    """Run ``python -m hfbconvert.cli ARGS`` with stdin/stdout/stderr on a pseudo-terminal;
    return its exit code and everything it wrote to the terminal."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm-256color",
               OMP_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "hfbconvert.cli", *map(str, args)],
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{args[0]} did not finish in {timeout} s under a terminal")
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pty")
    write_reference_checkpoint(d / "tiny.pt")
    images = np.load(write_npz(d / "calib.npz", n=48))["images"]
    folder = d / "images"
    folder.mkdir()
    for i, img in enumerate(images):  # a flat folder: read with a bar of unknown length
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return d


def _clean(res: tuple[int, str], what: str) -> str:
    rc, out = res
    assert "Traceback" not in out, out[-3000:]
    assert rc == 0, (what, rc, out[-3000:])
    return out


def test_workflow_in_a_terminal(workdir: Path) -> None:
    """analyze -> compress -> export onnx --calib, each as typed at a terminal."""
    d = workdir
    out = _clean(run_in_pty("analyze", d / "tiny.pt", "--calib", d / "images",
                            "--budgets", "1,2", "-o", d / "a.json"), "analyze")
    assert (d / "a.json").is_file() and "\x1b[" in out  # rich drew on the terminal
    _clean(run_in_pty("compress", d / "tiny.pt", "--calib", d / "images", "--steps", "3",
                      "--batch-size", "8", "--min-agreement", "0", "-o", d / "t.hfb.pt"),
           "compress")
    assert (d / "t.hfb.pt").is_file()
    _clean(run_in_pty("export", "onnx", d / "t.hfb.pt", "-o", d / "t.onnx", "--calib",
                      d / "images", "--calib-size", "8", "--no-report"), "export")
    assert (d / "t.onnx").is_file()


def test_error_in_a_terminal_is_one_line(workdir: Path) -> None:
    rc, out = run_in_pty("compress", workdir / "missing.pt", "-o", workdir / "x.hfb.pt")
    assert rc == 2 and "Traceback" not in out
    assert [ln for ln in out.splitlines() if ln.startswith("error: ")] == \
        [f"error: {workdir / 'missing.pt'}: no such file"]


@pytest.mark.parametrize("total", [None, 0, 5])
def test_progress_renders_any_total(total: float | None) -> None:
    """Every total, unknown included, renders on a terminal console."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with progress.task("reading images", total, console=console) as t:
        t.advance(3, info="note")
        t.update(info="more")
    text = buf.getvalue()
    assert "reading images" in text
    assert ("3/" not in text) if total is None else (f"3/{total}" in text)
