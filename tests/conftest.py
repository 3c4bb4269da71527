"""Shared fixtures: where the real models/data live, and an isolated image cache."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / os.environ.get("HFB_SHARED", "../shared")).resolve()


def need_shared(relpath: str) -> Path:
    """Path of a shared model/data file; skips the test (not fails) when it is absent."""
    path = SHARED / relpath
    if not path.exists():
        pytest.skip(
            f"needs {path}; set HFB_SHARED to the folder with the shared models and data"
        )
    return path


@pytest.fixture
def shared() -> Callable[[str], Path]:
    """``shared(relpath)`` inside a test, same as :func:`need_shared`."""
    return need_shared


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the calibration cache out of the user's home unless they chose a folder."""
    if "HFB_CACHE" not in os.environ:
        os.environ["HFB_CACHE"] = str(tmp_path_factory.mktemp("hfb-cache"))


@pytest.fixture(scope="session")
def cifar10_test_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10,000 CIFAR-10 test JPEGs, extracted once per session (never into shared/)."""
    archive = need_shared("data/cifar10-jpeg.tar.gz")
    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tf:
        members = [m for m in tf if m.name.startswith("cifar10/test/")]
        tf.extractall(out, members=members, filter="data")
    return out / "cifar10" / "test"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: two OpenMP threads on a busy 2-core machine ran
    the CLI-heavy tests 10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
