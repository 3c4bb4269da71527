"""``eval`` intervals and ``eval --compare A B``: paired figures that agree with the
single evaluations, the wording rule, refusals, and JSON that matches its schema."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hfbconvert.metrics import decode_bits, decode_classes

from .test_eval_cmd import _checkpoint, ok, one_error, run
from .tiny import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def _schema(name: str) -> dict:
    return json.loads((resources.files("hfbconvert") / "schemas" / name).read_text())


def _check(obj: Any, schema: dict, root: dict, where: str = "$") -> None:
    """The subset of JSON Schema the eval schemas use (fallback when ``jsonschema`` is
    not installed)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        py = {"object": dict, "array": list, "string": str, "null": type(None),
              "boolean": bool, "integer": int, "number": (int, float)}
        ok_type = any(isinstance(obj, py[t]) and not (t in ("integer", "number")
                                                       and isinstance(obj, bool))
                      for t in names)
        assert ok_type, f"{where}: {obj!r} is not {names}"
    if obj is None:
        return
    if "const" in schema:
        assert obj == schema["const"], where
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        assert obj >= schema.get("minimum", -np.inf), where
        assert obj <= schema.get("maximum", np.inf), where
    if isinstance(obj, str) and "pattern" in schema:
        assert re.search(schema["pattern"], obj), f"{where}: {obj!r}"
    if isinstance(obj, list):
        assert schema.get("minItems", 0) <= len(obj) <= schema.get("maxItems", 10**9), where
        for i, v in enumerate(obj):
            _check(v, schema.get("items", {}), root, f"{where}[{i}]")
    if isinstance(obj, dict):
        for k in schema.get("required", []):
            assert k in obj, f"{where}: missing {k}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(obj) <= set(props), f"{where}: extra {set(obj) - set(props)}"
        for k, v in obj.items():
            if k in props:
                _check(v, props[k], root, f"{where}.{k}")


def validate(obj: Any, name: str) -> None:
    schema = _schema(name)
    try:
        import jsonschema
    except ImportError:
        _check(obj, schema, schema)
        return
    jsonschema.validate(obj, schema)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("cmp")
    npz = write_npz(d / "data.npz", n=64)
    images = np.load(npz)["images"]
    a = d / "a.pt"
    _checkpoint(a, images)
    b = d / "b.hfb.pt"
    ok(run("compress", a, "--calib", npz, "--steps", "0", "--no-reconstruct", "-o", b,
           "--min-agreement", "0", "-q"))
    return {"dir": d, "npz": npz, "images": images, "a": a, "b": b}


def _json(*args: Any) -> dict:
    return json.loads(ok(run("eval", *args, "--json", "-q")).stdout)


def test_single_eval_json_has_intervals_and_matches_the_schema(models) -> None:
    res = _json(models["b"], "--data", models["npz"], "--original", models["a"])
    validate(res, "eval.json")
    assert res["schema_version"] == 1 and res["n"] == 64
    for k in ("top1", "agreement", "kl"):
        lo, hi = res[f"{k}_ci95"]
        assert lo <= res[k] <= hi
    assert res["kl"] >= 0.0
    # deterministic: same inputs and seed, same intervals
    assert _json(models["b"], "--data", models["npz"], "--original", models["a"]) == res


def test_single_eval_without_reference_has_null_agreement_and_kl(models) -> None:
    res = _json(models["a"], "--data", models["npz"])
    validate(res, "eval.json")
    assert res["agreement"] is None and res["agreement_ci95"] is None
    assert res["kl"] is None and res["kl_ci95"] is None and res["top1_ci95"] is not None


def test_per_image_record_decodes_to_the_top1(models) -> None:
    res = _json(models["a"], "--data", models["npz"], "--per-image")
    validate(res, "eval.json")
    p = res["per_image"]
    bits = decode_bits(p["correct_hex"], p["n"])
    assert bits.mean() == pytest.approx(res["top1"])
    labels = np.load(models["npz"])["labels"]
    assert ((decode_classes(p["pred_b64"]) == labels) == bits).all()


def test_per_image_record_carries_agreement_and_kl_with_a_reference(models) -> None:
    """With a reference, the record's agreement bits and per-image KL decode to the
    reported agreement and mean KL (what the paired fidelity intervals are built from)."""
    from hfbconvert.metrics import decode_floats

    res = _json(models["b"], "--data", models["npz"], "--original", models["a"],
                "--per-image")
    validate(res, "eval.json")
    p = res["per_image"]
    assert decode_bits(p["agree_hex"], p["n"]).mean() == pytest.approx(res["agreement"])
    kl = decode_floats(p["kl_b64"], p["n"])
    assert (kl >= 0).all() and kl.mean() == pytest.approx(res["kl"], rel=1e-5)
    plain = _json(models["a"], "--data", models["npz"], "--per-image")["per_image"]
    assert "agree_hex" not in plain and "kl_b64" not in plain  # no reference, no fidelity


def test_compare_agrees_with_the_single_evaluations(models) -> None:
    res = _json("--compare", models["a"], models["b"], "--data", models["npz"])
    validate(res, "eval-compare.json")
    a = _json(models["a"], "--data", models["npz"])
    b = _json(models["b"], "--data", models["npz"], "--original", models["a"])
    assert res["a"]["top1"] == pytest.approx(a["top1"])
    assert res["b"]["top1"] == pytest.approx(b["top1"])
    assert res["agreement"] == pytest.approx(b["agreement"])
    assert res["kl"] == pytest.approx(b["kl"])
    d = res["difference"]
    assert d["top1"] == pytest.approx(a["top1"] - b["top1"])
    assert (d["a_only_correct"] - d["b_only_correct"]) / res["n"] == pytest.approx(d["top1"])
    lo, hi = d["ci95"]
    assert lo <= d["top1"] <= hi
    if lo > 0:
        assert d["verdict"] == "A better than B"
    elif hi < 0:
        assert d["verdict"] == "A worse than B"
    else:
        assert d["verdict"].startswith("within noise (±")


def test_compare_with_itself_is_within_noise(models) -> None:
    res = _json("--compare", models["a"], models["a"], "--data", models["npz"])
    d = res["difference"]
    assert d["top1"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["mcnemar_p"] == 1.0
    assert d["verdict"] == "within noise (±0.00 points)"
    assert res["agreement"] == 1.0 and res["kl"] == pytest.approx(0.0, abs=1e-9)


def test_compare_text_output(models) -> None:
    out = ok(run("eval", "--compare", models["a"], models["b"], "--data", models["npz"],
                 "-q")).stdout
    for needle in ("A: ", "B: ", "A - B top-1:", "McNemar exact: p = ", "agreement A/B:",
                   "KL(A||B):"):
        assert needle in out, (needle, out)
    assert ("within noise (±" in out) != ("better than" in out or "worse than" in out)


def test_compare_without_labels_reports_agreement_and_kl(models, tmp_path) -> None:
    npz = write_npz(tmp_path / "u.npz", n=16, labels=False)
    res = _json("--compare", models["a"], models["b"], "--data", npz)
    validate(res, "eval-compare.json")
    assert res["difference"] is None and res["a"]["top1"] is None
    assert 0.0 <= res["agreement"] <= 1.0


def test_compare_refuses_another_class_count(models, tmp_path) -> None:
    other = tmp_path / "k1001.pt"
    _checkpoint(other, models["images"], num_classes=1001, label_offset=1)
    one_error(run("eval", "--compare", models["a"], other, "--data", models["npz"]),
              "--compare", str(other), "1001", "10")


def test_compare_refuses_other_preprocessing(models, tmp_path) -> None:
    other = tmp_path / "std.pt"
    _checkpoint(other, models["images"])
    ck = __import__("torch").load(other, weights_only=True)
    ck["normalize"] = {"mean": [0.5] * 3, "std": [0.5] * 3}
    __import__("torch").save(ck, other)
    one_error(run("eval", "--compare", models["a"], other, "--data", models["npz"]),
              "--compare", "preprocessing", "std")


def test_compare_and_model_are_exclusive(models) -> None:
    res = run("eval", models["a"], "--compare", models["a"], models["b"], "--data",
              models["npz"])
    assert res.exit_code == 2 and "--compare" in res.stderr
    res = run("eval", "--data", models["npz"])
    assert res.exit_code == 2 and "MODEL" in res.stderr


def test_schemas_are_package_data() -> None:
    cfg = (Path(__file__).parents[1] / "setup.cfg").read_text()
    assert "schemas/*.json" in cfg
    for name in ("eval.json", "eval-compare.json"):
        assert _schema(name)["properties"]["schema_version"]["const"] == 1


# --------------------------------------------------------------------------- bench


def test_bench_per_image_record_matches_the_cli(models) -> None:
    """The int8 cell's in-process record has the CLI's image fingerprint, so
    bench/compare.py can pair it with any hfbconvert-evaluated cell."""
    import torch

    from bench.measure import per_image_from_logits
    from hfbconvert.calib.presets import preset_for
    from hfbconvert.calib.readers import load_images
    from hfbconvert.models.loading import load_model

    cli = _json(models["a"], "--data", models["npz"], "--per-image")["per_image"]
    net, info = load_model(str(models["a"]))
    data = load_images(models["npz"], preset_for(info), seed=0)
    with torch.no_grad():
        logits = torch.cat([net.eval()(x) for x, _ in data.batches(16)]).numpy()
    assert per_image_from_logits(logits, data, info.label_offset) == cli
    # against a reference: the same agreement bits and KL as `eval --original`
    ref = _json(models["a"], "--data", models["npz"], "--per-image", "--original",
                models["a"])["per_image"]
    assert per_image_from_logits(logits, data, info.label_offset, logits) == ref


def _cell(bits: np.ndarray | None, sha: str = "x" * 64) -> dict:
    from hfbconvert.metrics import encode_bits

    c: dict = {"model": "m", "method": "h", "top1": None if bits is None else bits.mean(),
               "n_eval": None if bits is None else bits.size}
    if bits is not None:
        c["per_image"] = {"n": bits.size, "images_sha256": sha,
                          "correct_hex": encode_bits(bits), "pred_b64": ""}
    return c


def test_bench_compare_pairs_cells_with_per_image_results() -> None:
    from bench.compare import paired_line, paired_section

    rng = np.random.default_rng(0)
    old = rng.random(1300) < 0.72
    new = old.copy()
    new[np.flatnonzero(~old)[:40]] = True  # new fixes 40 images, breaks none
    line = paired_line(_cell(old), _cell(new))
    assert line.startswith("new - old +3.08pp [") and "only new right 40, only old 0" in line
    assert line.endswith("new better than old")
    same = paired_line(_cell(old), _cell(old))
    assert "+0.00pp" in same and same.endswith("within noise (±0.00 points)")
    other = paired_line(_cell(old), _cell(new, "y" * 64))
    assert "different evaluation images" in other
    # unpaired, the same +3.08 is wider and gets its interval and verdict all the same
    lo, hi = (float(v) for v in re.search(r"\[([+-][\d.]+), ([+-][\d.]+)\]ᵘ", other).groups())
    assert "unpaired new - old +3.08pp [" in other and lo < 3.08 < hi and hi - lo > 4
    bare = _cell(old)
    bare.pop("per_image")
    unp = paired_line(bare, _cell(new))
    assert "the old file" in unp and "]ᵘ: " in unp
    lines = paired_section({"cells": [_cell(old)]}, {"cells": [_cell(new)]})
    i = next(i for i, ln in enumerate(lines) if ln.startswith("m ") and " -> " in ln)
    assert f"{100 * old.mean():.2f} [" in lines[i] and lines[i + 1].endswith("than old")


def test_single_eval_text_shows_intervals(models) -> None:
    out = ok(run("eval", models["b"], "--data", models["npz"], "--original", models["a"],
                 "-q")).stdout
    assert re.search(r"top1 \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", out), out
    assert "agreement " in out and "kl " in out and "bootstrap over images" in out
