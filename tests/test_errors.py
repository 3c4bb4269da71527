"""Library errors keep every field: through pickle and copy (a worker process's error
reaches the parent pickled), and when another error's message wraps theirs, so the CLI
still renders the fields as its flags."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

import hfbconvert.distributed  # noqa: F401 - defines DistributedFailure, which the walk must see
import hfbconvert.fileio  # noqa: F401 - defines HfbError subclasses the walk must see
from hfbconvert import cli
from hfbconvert.artifact import build_compressed, save_compressed
from hfbconvert.errors import ConfigError, HfbError, InputError

from .test_artifact import tiny_hybrid
from .test_cli import one_error, run
from .tiny import tiny_info


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def _instances(cls: type[HfbError]) -> list[HfbError]:
    if issubclass(cls, ConfigError):
        return [cls("budget", 1.5, "must be in (0, 1]"),
                cls("max_bytes", 12.5, "cannot be met with {other} 0.5", other="budget"),
                cls("weight_bits", None, "needs {other} 8", other="activation_bits")]
    return [cls("plain message {with} braces"),
            cls("x.pt: exists (pass {force}); or {src}", force="force=True",
                src="source_model")]


def _same(a: HfbError, b: HfbError) -> None:
    assert type(a) is type(b)
    assert str(a) == str(b) and a.args == b.args
    assert a.render(cli._flag) == b.render(cli._flag)
    assert a.template_fields() == b.template_fields()
    assert vars(a) == vars(b)  # template, fields; ConfigError's field, value, reason, other


def test_every_error_class_round_trips_through_pickle_and_copy() -> None:
    classes = {HfbError} | _subclasses(HfbError)
    expected = {"HfbError", "InputError", "CheckFailed", "ConfigError", "LockHeld",
                "PickleRefused", "DistributedFailure"}
    assert expected <= {c.__name__ for c in classes}  # the walk sees them all
    for cls in classes:
        for exc in _instances(cls):
            exc.add_note("a note")  # state set after construction travels too
            for again in (pickle.loads(pickle.dumps(exc)), copy.copy(exc),
                          copy.deepcopy(exc)):
                _same(exc, again)
                assert again.exit_code == cls.exit_code


def test_fields_survive_pickling() -> None:
    exc = pickle.loads(pickle.dumps(ConfigError("budget", 1.5, "needs {other} 8",
                                                other="weight_bits")))
    assert (exc.field, exc.value, exc.reason, exc.other) == ("budget", 1.5, "needs {other} 8",
                                                             "weight_bits")
    assert str(exc) == "budget 1.5: needs weight_bits 8"
    assert exc.render(cli._flag) == "--budget 1.5: needs --weight-bits 8"
    exc2 = pickle.loads(pickle.dumps(InputError("pass {force}", force="force=True")))
    assert exc2.fields == {"force": "force=True"}
    assert exc2.render(cli._flag) == "pass --force"
    assert str(exc2) == "pass force=True"


@pytest.mark.parametrize("inner", [
    InputError("cannot rebuild {a}: pass {src} {a}", src="source_model", a="arch"),
    ConfigError("opset", 99, "not with {other}", other="arch"),
    InputError("no fields, braces {kept}"),
])
def test_template_fields_wrap_an_error_without_losing_them(inner: HfbError) -> None:
    what, fields = inner.template_fields()
    outer = InputError(f"m.pt {{x}}: malformed ({what})", **fields)
    assert str(outer) == f"m.pt {{x}}: malformed ({inner})"
    assert outer.render(cli._flag) == f"m.pt {{x}}: malformed ({inner.render(cli._flag)})"


def test_artifact_keeps_the_fields_of_a_rebuild_error(tmp_path: Path, monkeypatch) -> None:
    """A compressed model whose network cannot be rebuilt: the artifact reader wraps the
    rebuild's error in its own line, and the CLI still shows the flag the rebuild named
    (it used to pass the rendered text on, so the field's library name reached the user)."""
    from hfbconvert.models import loading

    net, meta = tiny_hybrid(16)
    path = tmp_path / "m.hfb.pt"
    save_compressed(path, net, tiny_info(), meta)

    def refuse(info):  # noqa: ANN001, ANN202
        raise InputError("cannot rebuild it here; pass {src}", src="source_model")

    monkeypatch.setattr(loading, "build_model", refuse)
    with pytest.raises(InputError) as ei:
        build_compressed(hfbconvert.fileio.load_torch(path), str(path))
    assert ei.value.fields == {"src": "source_model"}
    assert str(ei.value).endswith("(cannot rebuild it here; pass source_model)")
    line = one_error(run("export", "onnx", path, "-o", tmp_path / "m.onnx", "--no-verify"),
                     str(path), "malformed compressed model", "pass --source-model")
    assert "source_model" not in line
