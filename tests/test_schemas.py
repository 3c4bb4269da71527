"""Every JSON hfbconvert writes matches its schema in hfbconvert/schemas/ (issue #16):
the real commands run on the tiny model and their output is validated, with
``jsonschema`` and with the built-in checker; a broken copy of each output is refused."""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

from hfbconvert import schemas

from .test_cli import FASTEST, _write_healthy_checkpoint, ok, run
from .tiny import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
HAS_ZIGZAG = importlib.util.find_spec("zigzag") is not None


@pytest.fixture(params=["jsonschema", "builtin"])
def backend(request, monkeypatch) -> str:
    """Run a test with ``jsonschema`` and again with the built-in checker."""
    if request.param == "builtin":
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # import raises ImportError
    else:
        pytest.importorskip("jsonschema")
    return request.param


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each command's real JSON on the tiny model, once for the module."""
    d = tmp_path_factory.mktemp("schemas")
    npz = write_npz(d / "calib.npz")
    model = _write_healthy_checkpoint(d / "tiny.pt", npz)
    art = d / "m.hfb.pt"
    out: dict[str, Any] = {"_dir": d, "_artifact": art}
    res = ok(run("analyze", model, "--calib", npz, "--budgets", "1,2", "--json", "-q",
                 "-o", d / "analyze.json"))
    out["analyze"] = json.loads(res.stdout)
    out["analyze -o"] = json.loads((d / "analyze.json").read_text())
    res = ok(run("compress", model, "--calib", npz, "--dry-run", "--json", "-q"))
    out["compress-plan"] = json.loads(res.stdout)
    res = ok(run("compress", model, "--calib", npz, *FASTEST, "-o", art, "--json", "-q",
                 "--min-agreement", "0"))
    out["compress"] = json.loads(res.stdout)
    out["artifact-meta"] = torch.load(art, weights_only=True)["meta"]
    out["report"] = json.loads(ok(run("report", art, "--json", "-q")).stdout)
    ok(run("report", art, "--output-dir", d / "rep", "-q"))
    out["report.json"] = json.loads((d / "rep" / "report.json").read_text())
    (d / "onnx").mkdir()
    res = ok(run("export", "onnx", art, "-o", d / "onnx" / "m.onnx", "--json", "-q"))
    out["export-onnx"] = json.loads(res.stdout)
    out["report.json (export)"] = json.loads((d / "onnx" / "m.report.json").read_text())
    return out


SCHEMA_OF = {"analyze": "analyze", "analyze -o": "analyze", "compress-plan": "compress-plan",
             "compress": "compress", "artifact-meta": "artifact-meta", "report": "report",
             "report.json": "report", "export-onnx": "export-onnx",
             "report.json (export)": "report"}


# ------------------------------------------------------------------------ the schemas
def test_every_schema_is_listed_valid_and_shipped() -> None:
    files = sorted(p.name for p in (resources.files("hfbconvert") / "schemas").iterdir()
                   if p.name.endswith(".json"))
    assert files == sorted(f"{n}.json" for n in schemas.NAMES)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    data = cfg["options.package_data"]
    assert "schemas/*.json" in data["hfbconvert"] and "*.json" in data["hfbconvert.schemas"]
    jsonschema = pytest.importorskip("jsonschema")
    for name in schemas.NAMES:
        s = schemas.load_schema(name)
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert s["$id"] == f"hfbconvert/schemas/{name}.json"
        assert s == schemas.load_schema(f"{name}.json")


def _keywords(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            found.add(k)
            if k in ("properties", "$defs"):
                for sub in v.values():
                    _keywords(sub, found)
            elif k in ("items", "additionalProperties"):
                _keywords(v, found)
            elif k == "anyOf":
                for sub in v:
                    _keywords(sub, found)
    return found


@pytest.mark.parametrize("name", schemas.NAMES)
def test_schema_uses_only_what_the_builtin_checker_knows(name: str) -> None:
    assert _keywords(schemas.load_schema(name), set()) <= schemas.KEYWORDS


@pytest.mark.parametrize("name", [n for n in schemas.NAMES if not n.startswith("eval")])
def test_new_schemas_state_their_policy(name: str) -> None:
    """Extra keys allowed at the top level (forward compatibility), said in words too;
    a schema_version, where the output has one, is pinned."""
    s = schemas.load_schema(name)
    assert s["additionalProperties"] is True and "Policy:" in s["description"]
    if "schema_version" in s["properties"]:
        assert s["properties"]["schema_version"]["const"] == 1
        assert "schema_version" in s["required"]


def test_unknown_schema_name() -> None:
    with pytest.raises(ValueError, match="unknown schema 'nope'.*analyze"):
        schemas.validate({}, "nope")


# ------------------------------------------------------------------------ real outputs
@pytest.mark.parametrize("which", list(SCHEMA_OF))
def test_real_output_matches_schema(outputs, which: str, backend: str) -> None:
    schemas.validate(outputs[which], SCHEMA_OF[which])


def test_outputs_cover_the_optional_parts(outputs) -> None:
    """The fixture exercises what the schemas describe, not only the minimum."""
    assert outputs["analyze"]["calibration"] is not None
    assert outputs["compress"]["final_agreement_interval"] is not None
    ex = outputs["export-onnx"]
    assert ex["verify"]["passed"] and len(ex["report"]) == 3
    assert outputs["report.json (export)"]["export"]["sha256"] == ex["export"]["sha256"]
    meta = outputs["artifact-meta"]
    assert {"source_model", "source_sha256", "versions", "weight_quant"} <= set(meta)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ZIGZAG, reason="zigzag-dse not installed (hfbconvert[hw])")
def test_hw_output_matches_schema(outputs, tmp_path) -> None:
    res = ok(run("hw", outputs["_artifact"], "--accelerator", "hybrid_int8", "--json", "-q",
                 "-o", tmp_path / "hw.json"))
    for rep in (json.loads(res.stdout), json.loads((tmp_path / "hw.json").read_text())):
        assert rep["hybrid_on_design"] is not None and "comparison" in rep
        schemas.validate(rep, "hw")
        bad = copy.deepcopy(rep)
        bad["original_on_baseline"]["totals"]["utilization"] = 1.5
        with pytest.raises(ValueError, match=r"\$\.original_on_baseline\.totals\.utilization"):
            schemas.validate(bad, "hw")


# ------------------------------------------------------------------------ broken outputs
def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return mutate


def _drop(key: str) -> Callable[[dict], None]:
    return lambda obj: obj.pop(key)


# (output, mutation, the path the error must name): a required key of the wrong type,
# out of its range, or missing
BROKEN = [
    ("analyze", _set(("layers", 0, "c_out"), "16"), r"\$\.layers\[0\]\.c_out"),
    ("analyze", _set(("pointwise_mul_share",), 1.5), r"\$\.pointwise_mul_share"),
    ("analyze", _set(("schema_version",), 2), r"\$\.schema_version"),
    ("compress", _set(("final_agreement",), "high"), r"\$\.final_agreement"),
    ("compress", _set(("cost", "muls"), -1), r"\$\.cost\.muls"),
    ("compress", _drop("output"), r"\$: 'output' is a required property"),
    ("compress-plan", _set(("plan", "layers", 0, "n_critical"), 1.5),
     r"\$\.plan\.layers\[0\]\.n_critical"),
    ("compress-plan", _set(("plan", "method"), "magic"), r"\$\.plan\.method"),
    ("report", _set(("layers", 0, "name"), None), r"\$\.layers\[0\]\.name"),
    ("report", _set(("totals", "budget", "mul_budget"), 0), r"\$\.totals\.budget\.mul_budget"),
    ("report", _drop("conventions"), r"\$: 'conventions' is a required property"),
    ("export-onnx", _set(("export", "sha256"), "xyz"), r"\$\.export\.sha256"),
    ("export-onnx", _set(("verify", "passed"), "yes"), r"\$\.verify\.passed"),
    ("artifact-meta", _set(("weight_bits",), 12), r"\$\.weight_bits"),
    ("artifact-meta", _set(("bn_folded",), [["a"]]), r"\$\.bn_folded\[0\]"),
    ("artifact-meta", _set(("stages", 0, "agreement"), 2.0), r"\$\.stages\[0\]\.agreement"),
]


@pytest.mark.parametrize("which,mutate,where", BROKEN,
                         ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(BROKEN)])
def test_broken_output_is_refused(outputs, which, mutate, where, backend: str) -> None:
    obj = copy.deepcopy(outputs[which])
    mutate(obj)
    with pytest.raises(ValueError, match=f"^{SCHEMA_OF[which]} schema: {where}") as exc:
        schemas.validate(obj, SCHEMA_OF[which])
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 300


@pytest.mark.parametrize("name", ["analyze", "compress", "compress-plan", "report",
                                  "export-onnx", "artifact-meta"])
def test_top_level_extra_keys_are_allowed_but_not_a_non_object(outputs, name: str,
                                                                  backend: str) -> None:
    obj = dict(outputs[name], added_by_a_newer_version={"x": 1})
    schemas.validate(obj, name)
    with pytest.raises(ValueError, match=r"^\S+ schema: \$: "):
        schemas.validate([obj], name)
