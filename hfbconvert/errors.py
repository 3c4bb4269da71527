"""Exceptions the CLI maps to exit codes (2: bad input/usage, 1: a failed check)."""

from __future__ import annotations

import re
from collections.abc import Callable

_FIELD = re.compile(r"\{(\w+)\}")


def _plain(field: str) -> str:
    return field


def _rebuild(cls: type[HfbError], args: tuple, kwargs: dict) -> HfbError:
    """Unpickling: the error built again from its constructor's arguments."""
    return cls(*args, **kwargs)


class HfbError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with, the message is one line.

    The library never spells CLI flags: a message that points at a setting writes it as a
    placeholder ``{key}`` and passes ``key=FIELD``, FIELD being the library's name for it
    (a configuration field, a parameter, or ``param=True`` for a switch). ``str(exc)``
    shows FIELD; the CLI renders it as its flag (:meth:`render`), so neither side parses
    the other's text. ``HfbError(f"{p}: exists (pass {{force}})", force="force=True")``.
    Only ``{key}`` for a key given is replaced (a path's other braces are left alone)."""

    exit_code = 2

    def __new__(cls, *args: object, **kwargs: object) -> HfbError:
        """Records the constructor's arguments, whatever the subclass's signature: the
        message ``Exception`` keeps in ``args`` is the rendered one, which neither
        ``HfbError`` (fields lost) nor ``ConfigError`` (four arguments) can be rebuilt
        from, so pickling (multiprocessing sends a worker's error pickled; ``copy``)
        would fail or drop fields."""
        self = super().__new__(cls, *args)
        self._ctor = (args, kwargs)
        return self

    def __init__(self, message: str = "", /, **fields: str) -> None:
        self.template, self.fields = message, fields
        super().__init__(self.render(_plain) if fields else message)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every field placeholder passed through ``name``."""
        if not self.fields:
            return str(self)
        return _FIELD.sub(lambda m: name(self.fields[m[1]]) if m[1] in self.fields
                          else m[0], self.template)

    def template_fields(self) -> tuple[str, dict[str, str]]:
        """``(template, fields)`` such that ``HfbError(template, **fields)`` renders as
        this error: for putting its message inside a longer one without losing the
        fields (``HfbError(f"{p}: bad ({t})", **f)``)."""
        return self.template, dict(self.fields)

    def __reduce__(self) -> tuple:
        args, kwargs = self._ctor
        return _rebuild, (type(self), args, kwargs), self.__dict__


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
        super().__init__(self.render(_plain))

    def render(self, name: Callable[[str], str]) -> str:
        """One line with every field name passed through ``name``."""
        shown = "" if self.value is None else f" {self.value:g}" \
            if isinstance(self.value, float) else f" {self.value}"
        reason = self.reason.format(other=name(self.other)) if self.other else self.reason
        return f"{name(self.field)}{shown}: {reason}"

    def template_fields(self) -> tuple[str, dict[str, str]]:
        """Each field name as a placeholder (``{field0}``, ``{field1}``)."""
        keys = {f: f"field{i}" for i, f in enumerate(dict.fromkeys(
            f for f in (self.field, self.other) if f))}
        return self.render(lambda f: "{" + keys[f] + "}"), {k: f for f, k in keys.items()}
