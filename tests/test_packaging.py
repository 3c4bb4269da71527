"""Installing hfbconvert must not replace a user's torch: a range in the package, the
exact pin only in the Makefile's own venv, and the tested versions inside the range."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _torch_requirement() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    (req,) = [r for r in reqs if re.match(r"torch\b", r)]
    return req


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def test_package_declares_a_range_not_a_pin() -> None:
    req = _torch_requirement()
    assert "==" not in req, req
    assert re.fullmatch(r"torch>=\d+\.\d+(\.\d+)?,<\d+", req), req


def test_makefile_pins_the_lowest_supported_torch() -> None:
    """The venv tests exactly the lowest version the range admits, so the floor is tested."""
    pin = re.search(r"torch==(\d+\.\d+\.\d+)", (REPO / "Makefile").read_text()).group(1)
    floor = re.search(r">=(\d+\.\d+(?:\.\d+)?)", _torch_requirement()).group(1)
    assert _version(pin)[:2] == _version(floor)[:2]


def test_installed_torch_is_in_range() -> None:
    req = _torch_requirement()
    lo = _version(re.search(r">=([\d.]+)", req).group(1))
    hi = int(re.search(r"<(\d+)", req).group(1))
    have = _version(torch.__version__)
    assert lo <= have[: len(lo)] and have[0] < hi, (torch.__version__, req)
