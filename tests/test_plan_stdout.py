"""The exact planner's solver (HiGHS) prints debug lines from C++ straight to file descriptor
1; `compress --json` prints its JSON there, so the solve must not reach stdout."""

from __future__ import annotations

import os

import pytest

from hfbconvert.plan import _stdout_to_stderr


def test_native_writes_to_fd1_go_to_stderr_during_the_solve(
        capfd: pytest.CaptureFixture[str]) -> None:
    os.write(1, b"before\n")
    with _stdout_to_stderr():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"  # fd 1 restored afterwards
    assert "HighsMipSolverData" in err
