"""The library never spells CLI flags in its errors: a message that points at a setting
names the library's field (``ConfigError`` or an ``HfbError`` placeholder) and the CLI
renders it as its flag. Read from the source, so a new ``raise ... "--flag"`` fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import hfbconvert
from hfbconvert import cli
from hfbconvert.errors import ConfigError, HfbError, InputError

PKG = Path(hfbconvert.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# the command line itself (cli.py) and the demo (a script that drives the command line)
CLI_FILES = {"cli.py", "demo.py"}
# (file relative to hfbconvert/, flag) -> why it may stay
ALLOWED = {
    ("models/loading.py", "--no-deps"): "pip's own flag, in the pip command line to run",
    ("models/loading.py", "--force-reinstall"): "pip's own flag, in the pip command line",
}
PENDING: tuple[str, ...] = ()  # folders not yet converted (none)
# fields the library may name that no CLI flag sets (library-only settings)
LIBRARY_ONLY_FIELDS = {"bn_scope", "stop_on"}  # stop_on: compress has no --stop-on


def _library_files() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if p.name not in CLI_FILES]


def _message_nodes(tree: ast.AST) -> list[ast.AST]:
    """What can become an error message: raise statements, and helpers that build one
    (functions named *message* or *error*, whose text a raise passes on)."""
    out: list[ast.AST] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Raise) and n.exc is not None:
            out.append(n.exc)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                re.search(r"message|error", n.name):
            out.extend(n.body[1:] if ast.get_docstring(n) else n.body)
    return out


def _flags_in_messages() -> list[tuple[str, int, str]]:
    found = []
    for path in _library_files():
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(PENDING):
            continue
        for node in _message_nodes(ast.parse(path.read_text())):
            for s in ast.walk(node):
                if isinstance(s, ast.Constant) and isinstance(s.value, str):
                    for flag in FLAG.findall(s.value):
                        if (rel, flag) not in ALLOWED:
                            found.append((rel, s.lineno, flag))
    return found


def test_no_library_error_message_names_a_cli_flag() -> None:
    found = _flags_in_messages()
    assert not found, "library errors must name fields, not flags (use ConfigError or an " \
                      f"HfbError placeholder; the CLI maps it via CONFIG_FLAGS): {found}"


def test_the_scan_sees_a_flag() -> None:
    """The scanner itself: a raise that spells a flag is found."""
    tree = ast.parse('def f():\n    raise InputError(f"{p}: bad (pass --force)")\n')
    texts = [s.value for n in _message_nodes(tree) for s in ast.walk(n)
             if isinstance(s, ast.Constant) and isinstance(s.value, str)]
    assert any(FLAG.search(t) for t in texts)


def _named_fields() -> set[str]:
    """Field names library errors point at: ConfigError's field/other constants and the
    values of HfbError placeholder keywords."""
    names: set[str] = set()
    for path in _library_files():
        if path.relative_to(PKG).as_posix().startswith(PENDING):
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id.endswith(("Error", "Failed", "Failure", "Refused"))):
                continue
            if n.func.id == "ConfigError" and n.args and isinstance(n.args[0], ast.Constant):
                names.add(n.args[0].value)
            names |= {k.value.value for k in n.keywords
                      if k.arg and isinstance(k.value, ast.Constant)
                      and isinstance(k.value.value, str)}
    return names


def test_every_field_an_error_names_has_a_flag() -> None:
    names = _named_fields()
    assert {"force=True", "resume=True", "weight_bits", "opset"} <= names  # the scan works
    missing = names - set(cli.CONFIG_FLAGS) - LIBRARY_ONLY_FIELDS
    assert not missing, f"add these to cli.CONFIG_FLAGS: {sorted(missing)}"


def test_placeholders_render_per_reader(tmp_path: Path) -> None:
    """Python sees the field, the CLI its flag; a path with braces is left alone."""
    from hfbconvert.fileio import check_output_path

    out = tmp_path / "a{x}b.onnx"
    out.write_text("x")
    with pytest.raises(InputError) as ei:
        check_output_path(out, force=False)
    assert str(ei.value).endswith("already exists (pass force=True to overwrite)")
    assert ei.value.render(cli._flag).endswith("(pass --force to overwrite)")
    assert str(out) in str(ei.value)  # braces that name no field are left alone
    assert HfbError("plain {text}").render(cli._flag) == "plain {text}"
    exc = ConfigError("opset", 99, "not supported; choose 17..22")
    assert str(exc) == "opset 99: not supported; choose 17..22"
    assert exc.render(cli._flag) == "--opset 99: not supported; choose 17..22"


def test_cli_shows_flags_for_library_errors(tmp_path: Path) -> None:
    from .tiny import write_reference_checkpoint

    model = write_reference_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "m.hfb.pt"
    out.write_text("keep me")
    res = CliRunner().invoke(cli.main, ["compress", str(model), "-o", str(out), "--steps", "0"])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {out}: already exists (pass --force to overwrite)"
    assert out.read_text() == "keep me"
