"""Exceptions the CLI maps to exit codes (2: bad input/usage, 1: a failed check)."""

from __future__ import annotations

from collections.abc import Callable


class HfbError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with, the message is one line."""

    exit_code = 2


class InputError(HfbError):
    """A user-supplied file, flag or dataset is unusable (exit 2)."""

    exit_code = 2


class CheckFailed(HfbError):
    """The run finished but a check failed, e.g. ONNX/PyTorch mismatch (exit 1)."""

    exit_code = 1


class ConfigError(InputError):
    """A configuration field holds an unusable value (exit 2).

    Typed so that callers never parse messages: ``field`` is the configuration field as
    the library spells it (``CompressConfig`` attribute or function parameter), ``value``
    what it held, ``reason`` why it is unusable. ``reason`` may refer to one other field
    as ``{other}`` (``other`` names it), e.g. "needs {other} 8". The message renders
    field names as they are; the CLI renders them as its flags (:meth:`render`)."""

    def __init__(self, field: str, value: object, reason: str, other: str | None = None,
                 ) -> None:
        self.field, self.value, self.reason, self.other = field, value, reason, other
        super().__init__(self.render(lambda f: f))

    def render(self, name: Callable[[str], str]) -> str:
        """One line with every field name passed through ``name``."""
        shown = "" if self.value is None else f" {self.value:g}" \
            if isinstance(self.value, float) else f" {self.value}"
        reason = self.reason.format(other=name(self.other)) if self.other else self.reason
        return f"{name(self.field)}{shown}: {reason}"
