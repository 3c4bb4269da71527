"""Progress bars on stderr (rich), off when stderr is not a TTY or with --quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_STATE = {"quiet": False, "silent": False}


def set_quiet(q: bool) -> None:
    _STATE["quiet"] = q


def is_quiet() -> bool:
    return bool(_STATE["quiet"])


def set_silent(s: bool) -> None:
    """Nothing at all, warnings included: ranks other than 0 of a torchrun job (rank 0
    says it once)."""
    _STATE["silent"] = s


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def enabled() -> bool:
    return not _STATE["quiet"] and not _STATE["silent"] and sys.stderr.isatty()


class CountColumn(ProgressColumn):
    """``done/total``, or just ``done`` while the total is unknown (``total=None``).

    rich keeps ``task.total`` as None for an indeterminate task; a format spec such as
    ``{task.total:.0f}`` raises on None, which crashed every run in a real terminal.
    """

    def render(self, task: Task) -> Text:
        done = f"{task.completed:.0f}"
        return Text(done if task.total is None else f"{done}/{task.total:.0f}")


class _NullTask:
    def advance(self, n: float = 1, **fields) -> None:  # noqa: D401 - trivial
        pass

    def update(self, **fields) -> None:
        pass


class _Task:
    def __init__(self, progress: Progress, tid) -> None:
        self.p, self.tid = progress, tid

    def advance(self, n: float = 1, **fields) -> None:
        self.p.update(self.tid, advance=n, **fields)

    def update(self, **fields) -> None:
        self.p.update(self.tid, **fields)


@contextlib.contextmanager
def task(description: str, total: float | None,
         console: Console | None = None) -> Iterator[_Task | _NullTask]:
    """A single progress bar (``total`` None: unknown length, a pulsing bar); a no-op
    object when progress is disabled. ``console`` is for tests that render to a buffer."""
    if console is None and not enabled():
        yield _NullTask()
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(),
            CountColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console or stderr_console(), transient=True) as p:
        tid = p.add_task(description, total=total, info="")
        yield _Task(p, tid)


def info(msg: str) -> None:
    """One status line on stderr (suppressed by --quiet, shown on non-TTYs too)."""
    if not _STATE["quiet"] and not _STATE["silent"]:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """Warnings are shown even with --quiet: the user must see them."""
    if not _STATE["silent"]:
        print(f"warning: {msg}", file=sys.stderr, flush=True)
