"""JSON Schemas (draft 2020-12) of every JSON hfbconvert writes, shipped as package data.

====================  ==================================================================
``analyze``           ``analyze --json`` and ``analyze -o FILE``
``compress``          ``compress --json`` (summary of a finished conversion)
``compress-plan``     ``compress --dry-run --json``
``report``            ``report --json`` and ``report.json``
``export-onnx``       ``export onnx --json``
``hw``                ``hw --json`` and ``hw -o FILE``
``artifact-meta``     the ``meta`` dict inside a ``.hfb.pt``
``eval``              ``eval --json``
``eval-compare``      ``eval --compare A B --json``
``finetune``          ``finetune --json``
====================  ==================================================================

:func:`validate` uses the ``jsonschema`` package when it is installed (the ``dev``
extra) and otherwise a built-in checker of the keywords these schemas use
(:data:`KEYWORDS`), so it works on a plain install.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from importlib import resources
from typing import Any

NAMES = ("analyze", "compress", "compress-plan", "report", "export-onnx", "hw",
         "artifact-meta", "eval", "eval-compare", "finetune")

# what the built-in checker understands; a test keeps the schemas inside this set
KEYWORDS = frozenset({
    "$schema", "$id", "$defs", "$ref", "title", "description", "type", "const", "enum",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "required",
    "properties", "additionalProperties", "items", "minItems", "maxItems", "anyOf"})


@cache
def _text(name: str) -> str:
    stem = name.removesuffix(".json")
    if stem not in NAMES:
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(NAMES)}")
    return (resources.files(__name__) / f"{stem}.json").read_text(encoding="utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` (``"analyze"`` or ``"analyze.json"``), a fresh dict each call."""
    return json.loads(_text(name))


def validate(obj: Any, name: str) -> None:
    """Raise a one-line ValueError naming the first place where ``obj`` breaks schema
    ``name`` (as ``$.layers[3].c_in``); return None when it conforms."""
    schema = load_schema(name)
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the dev extra installs it
        err = _first_error(obj, schema, schema, "$")
    else:
        v = jsonschema.Draft202012Validator(schema)
        errors = sorted(v.iter_errors(obj), key=lambda e: _path_key(e.absolute_path))
        err = None
        if errors:
            e = errors[0]
            err = (_path(e.absolute_path), _short_message(e))
    if err is not None:
        where, msg = err
        raise ValueError(f"{name.removesuffix('.json')} schema: {where}: {msg}")


# ------------------------------------------------------------------------ messages
def _path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _path_key(parts: Any) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in parts)


def _short(x: Any, n: int = 60) -> str:
    s = " ".join(repr(x).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _short_message(e: Any) -> str:
    """jsonschema's message, with the offending value shortened to one short line."""
    text = " ".join(str(e.message).split())
    inst = " ".join(repr(e.instance).split())
    if len(inst) > 60 and inst in text:
        text = text.replace(inst, _short(e.instance))
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------ built-in checker
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(x: Any, t: str) -> bool:
    if t in ("integer", "number"):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        return t == "number" or isinstance(x, int) or (math.isfinite(x) and x == int(x))
    return isinstance(x, _TYPES[t])


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        schema = root["$defs"][ref.split("/")[-1]]
    return schema


def _first_error(x: Any, schema: Any, root: dict, where: str) -> tuple[str, str] | None:
    """(path, message) of the first violation, depth first in document order."""
    if schema is True:
        return None
    if schema is False:
        return where, "no value is allowed here"
    s = _resolve(schema, root)
    if "anyOf" in s and all(_first_error(x, sub, root, where) for sub in s["anyOf"]):
        return where, f"{_short(x)} is not valid under any of the given schemas"
    types = s.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(x, t) for t in names):
            return where, f"{_short(x)} is not of type {', '.join(map(repr, names))}"
    if "const" in s and not _equal(x, s["const"]):
        return where, f"{s['const']!r} was expected"
    if "enum" in s and not any(_equal(x, v) for v in s["enum"]):
        return where, f"{_short(x)} is not one of {s['enum']!r}"
    if _is_type(x, "number"):
        for key, bad in (("minimum", lambda v, b: v < b), ("maximum", lambda v, b: v > b),
                         ("exclusiveMinimum", lambda v, b: v <= b),
                         ("exclusiveMaximum", lambda v, b: v >= b)):
            if key in s and bad(x, s[key]):
                return where, f"{x!r} fails {key} {s[key]!r}"
    if isinstance(x, str) and "pattern" in s and not re.search(s["pattern"], x):
        return where, f"{_short(x)} does not match {s['pattern']!r}"
    if isinstance(x, list):
        if len(x) < s.get("minItems", 0):
            return where, f"{_short(x)} has fewer than {s['minItems']} items"
        if "maxItems" in s and len(x) > s["maxItems"]:
            return where, f"{_short(x)} has more than {s['maxItems']} items"
        if "items" in s:
            for i, v in enumerate(x):
                err = _first_error(v, s["items"], root, f"{where}[{i}]")
                if err:
                    return err
    if isinstance(x, dict):
        for k in s.get("required", []):
            if k not in x:
                return where, f"{k!r} is a required property"
        props = s.get("properties", {})
        extra = s.get("additionalProperties", True)
        for k, v in x.items():
            sub = props.get(k, extra)
            err = _first_error(v, sub, root, f"{where}.{k}")
            if err:
                if sub is False:
                    return where, f"additional property {k!r} is not allowed"
                return err
    return None


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) \
        else a == b
