"""Exceptions the CLI maps to exit codes (2: bad input/usage, 1: a failed check)."""

from __future__ import annotations


class HfbError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with, the message is one line."""

    exit_code = 2


class InputError(HfbError):
    """A user-supplied file, flag or dataset is unusable (exit 2)."""

    exit_code = 2


class CheckFailed(HfbError):
    """The run finished but a check failed, e.g. ONNX/PyTorch mismatch (exit 1)."""

    exit_code = 1
