"""The ``.hfb.pt`` artifact: compact lossless storage, checksums, refusal of malformed
metadata (one line, before anything is allocated), weights-only loading."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hfbconvert import actquant, tensorcodec
from hfbconvert.artifact import (
    FORMAT,
    FORMAT_V1,
    artifact_dict,
    build_compressed,
    header_digest,
    hybrid_layers,
    layer_spec,
    load_compressed,
    save_compressed,
)
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.errors import InputError
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import set_submodule
from hfbconvert.weightquant import apply_weight_bits, fake_quant

from .test_cli import one_error, run
from .tiny import TINY_RES, tiny_info, tiny_v1

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID_SITES = ("blocks.1.conv_pw", "blocks.12.conv_pw", "classifier")


def tiny_hybrid(bits: int = 16, folded: bool = False, act8: bool = False,
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny MobileNetV1 with three random frozen hybrid layers, as compress leaves it."""
    net = tiny_v1()
    g = torch.Generator().manual_seed(0)
    for name in HYBRID_SITES:
        m = net.get_submodule(name)
        lin = isinstance(m, torch.nn.Linear)
        c_in, c_out = (m.in_features, m.out_features) if lin else (m.in_channels,
                                                                    m.out_channels)
        crit = torch.randperm(c_out, generator=g)[: c_out // 3]
        r = max(1, c_out // 2)
        h = HybridPointwise(c_in, c_out, crit, r, "linear" if lin else "conv")
        h.set_factors(torch.randint(-1, 2, (r, c_in), generator=g),
                      torch.rand(r, generator=g) + 0.5,
                      torch.randint(-1, 2, (h.n_tolerant, r), generator=g))
        with torch.no_grad():
            h.w_crit.normal_(generator=g)
            h.bias.normal_(generator=g)
        h.freeze()
        set_submodule(net, name, h)
    meta: dict[str, Any] = {"weight_bits": bits, "source_model": "/nowhere/model.pt"}
    if folded:
        meta["bn_folded"] = [list(p) for p in fold_batchnorms(net)]
    if act8:
        actquant.attach(net, 8)
        meta.update(activation_bits=8, hidden_bits=8)
    apply_weight_bits(net, bits)
    return net.eval(), meta


def bits_of(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    t = t.detach().contiguous()
    return str(t.dtype), tuple(t.shape), bytes(tensorcodec.tensor_bytes(t))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert bits_of(sa[k]) == bits_of(sb[k]), k


def v1_dict(net: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What ``save_compressed`` wrote before format 2."""
    return {"format": FORMAT_V1, "model_info": tiny_info().to_dict(),
            "layers": {n: layer_spec(m) for n, m in hybrid_layers(net).items()},
            "state_dict": {k: v.detach().contiguous() for k, v in net.state_dict().items()},
            "meta": meta}


def saved_size(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


# --------------------------------------------------------------------------- codec
def _ternary():
    shapes = st.tuples(st.integers(0, 7), st.integers(0, 33))
    return shapes.flatmap(lambda s: arrays(np.int8, s, elements=st.integers(-1, 1)))


def _floats():
    shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3))
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=st.floats(width=32)))


@settings(max_examples=120, deadline=None)
@given(codes=_ternary(), w=_floats(), idx=arrays(np.int64, st.integers(0, 40),
                                                 elements=st.integers(-2**40, 2**40)))
def test_codec_round_trip_is_bit_exact(codes, w, idx) -> None:
    wt = torch.from_numpy(w)
    finite = wt.nan_to_num(0.0).clamp(-1e6, 1e6)  # fake_quant needs finite, sane values
    for t, kw in ((torch.from_numpy(codes), {"ternary": True}),
                  (wt, {"int8": True}), (fake_quant(finite, 8), {"int8": True}),
                  (fake_quant(finite, 16), {}), (torch.from_numpy(idx), {})):
        rec = tensorcodec.encode(t, **kw)
        assert rec["sha256"] == tensorcodec.record_digest(rec)
        assert bits_of(tensorcodec.decode(rec)) == bits_of(t)
    assert tensorcodec.encode(torch.from_numpy(codes), ternary=True)["enc"] == "ternary2"


def test_codec_picks_the_compact_encodings() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (7, 13), generator=g, dtype=torch.int8)
    rec = tensorcodec.encode(codes, ternary=True)
    assert rec["enc"] == "ternary2" and rec["data"].numel() == (7 * 13 + 3) // 4
    w = torch.randn(6, 4, 3, 3, generator=g)
    rec = tensorcodec.encode(fake_quant(w, 8), int8=True)
    assert rec["enc"] == "int8" and rec["data"].dtype == torch.int8
    assert rec["scale"].shape == (6,)
    assert tensorcodec.encode(fake_quant(w, 16))["enc"] == "float16"
    assert tensorcodec.encode(w)["enc"] == "raw"  # not representable: stored as is
    assert tensorcodec.encode(torch.arange(300))["data"].dtype == torch.int16
    # a ternary payload with the unused code 3 is refused
    bad = dict(rec := tensorcodec.encode(codes, ternary=True), data=rec["data"].clone())
    bad["data"][0] = 0xFF
    with pytest.raises(ValueError, match="outside"):
        tensorcodec.decode(bad)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded_int8act"])
def test_round_trip_is_bit_identical_and_smaller(tmp_path: Path, bits: int,
                                                 folded: bool) -> None:
    net, meta = tiny_hybrid(bits, folded=folded, act8=folded)
    path = tmp_path / "m.hfb.pt"
    save_compressed(path, net, tiny_info(), meta)
    assert torch.load(path, weights_only=True)["format"] == "hfbconvert-compressed/2"
    back, info, meta2 = load_compressed(path)
    assert_same_state(net, back)
    assert meta2 == meta and info.resolution == TINY_RES
    x = torch.randn(2, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x), back(x))
    # the same model as format 1 (int8 codes, float32 weights)
    v1 = saved_size(v1_dict(net, meta))
    limit = {32: 0.97, 16: 0.6, 8: 0.45}[bits]
    assert path.stat().st_size < limit * v1, (path.stat().st_size, v1)


def test_reads_format_1_artifacts(tmp_path: Path) -> None:
    net, meta = tiny_hybrid(16, folded=True, act8=True)
    old, new = tmp_path / "v1.hfb.pt", tmp_path / "v2.hfb.pt"
    torch.save(v1_dict(net, meta), old)
    save_compressed(new, net, tiny_info(), meta)
    a, _, _ = load_compressed(old)
    b, _, _ = load_compressed(new)
    assert_same_state(net, a)
    assert_same_state(a, b)
    assert new.stat().st_size < 0.6 * old.stat().st_size


def test_cifar_artifact_is_smaller_than_the_original(tmp_path: Path, shared) -> None:
    src = shared("models/mobilenet_v1_0.5_cifar10.pt")
    out = tmp_path / "c10.hfb.pt"
    # no calibration data and a loose ADD cap: the size is the point here, and the
    # weight-space fit under the default cap spends minutes in the MILP planner
    res = run("compress", src, "-o", out, "--steps", "0", "--no-reconstruct",
              "--min-agreement", "0", "--max-add-increase", "5", "--quiet")
    assert res.exit_code == 0, res.output
    # 5.01 MB as format 1; the original checkpoint is 3.39 MB
    assert out.stat().st_size < 0.6 * src.stat().st_size
    net, _, meta = load_compressed(out)
    assert meta["weight_bits"] == 16


# --------------------------------------------------------------------------- integrity
def _entry_of(path: Path, payload: torch.Tensor) -> str:
    """The zip entry (``archive/data/N``) holding ``payload``'s storage."""
    want = bytes(tensorcodec.tensor_bytes(payload.contiguous()))
    with zipfile.ZipFile(path) as z:
        hits = [i.filename for i in z.infolist()
                if "/data/" in i.filename and z.read(i.filename) == want]
    assert len(hits) == 1, hits
    return hits[0]


def _flip(path: Path, entry: str, n: int = 16) -> None:
    """XOR ``n`` bytes in the middle of a stored entry, in place (sizes unchanged)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(entry)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28],
                                         "little"), int.from_bytes(
        raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + max(0, info.file_size // 2 - n // 2)
    for i in range(start, start + min(n, info.file_size)):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("key", ["blocks.1.conv_pw.wb_codes", "blocks.1.conv_pw.w_crit",
                                 "blocks.3.conv_dw.weight", "blocks.12.conv_pw.perm",
                                 "blocks.5.bn_pw.running_var"])
def test_flipped_bytes_are_refused(tmp_path: Path, key: str) -> None:
    net, meta = tiny_hybrid(8 if "w_crit" in key else 16)
    good, bad = tmp_path / "good.hfb.pt", tmp_path / "bad.hfb.pt"
    save_compressed(good, net, tiny_info(), meta)
    bad.write_bytes(good.read_bytes())
    rec = torch.load(good, weights_only=True)["tensors"][key]
    _flip(bad, _entry_of(bad, rec["data"]))
    assert torch.load(bad, weights_only=True)  # torch itself does not notice
    with pytest.raises(InputError) as ei:
        load_compressed(bad)
    msg = str(ei.value)
    assert msg.startswith(f"{bad}: corrupt or modified") and key in msg and "\n" not in msg
    assert_same_state(net, load_compressed(good)[0])
    one_error(run("report", bad), str(bad), "corrupt or modified")
    one_error(run("export", "onnx", bad, "-o", tmp_path / "x.onnx"), "corrupt or modified")


def test_modified_metadata_or_swapped_tensors_are_refused(tmp_path: Path) -> None:
    net, meta = tiny_hybrid()
    obj = artifact_dict(net, tiny_info(), meta)
    variants: list[Callable[[dict[str, Any]], None]] = [
        lambda o: o["meta"].update(weight_bits=32),
        lambda o: o["layers"]["classifier"].update(channel_scale=True),
        lambda o: o["model_info"].update(resolution=64),
        lambda o: o["tensors"].update({
            "blocks.1.bn_pw.running_mean": o["tensors"]["blocks.1.bn_pw.running_var"],
            "blocks.1.bn_pw.running_var": o["tensors"]["blocks.1.bn_pw.running_mean"]}),
    ]
    for i, change in enumerate(variants):
        o = torch.load(io.BytesIO(_dump(obj)), weights_only=True)
        change(o)
        path = tmp_path / f"m{i}.hfb.pt"
        path.write_bytes(_dump(o))
        with pytest.raises(InputError, match="corrupt or modified"):
            load_compressed(path)


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- validation
def reseal(obj: dict[str, Any]) -> dict[str, Any]:
    """Recompute every checksum (a crafted file: validation, not integrity, must catch it)."""
    for rec in obj["tensors"].values():
        if isinstance(rec, dict) and "enc" in rec:
            rec["sha256"] = tensorcodec.record_digest(rec)
    obj["sha256"] = header_digest(obj)
    return obj


def _set_codes(obj: dict[str, Any], key: str, value: int) -> None:
    if obj["format"] == FORMAT_V1:
        obj["state_dict"][key] = obj["state_dict"][key].clone()
        obj["state_dict"][key].view(-1)[0] = value
    else:
        rec = obj["tensors"][key]
        rec["data"] = rec["data"].clone()
        rec["data"][0] = 0xFF  # code 3: the value 2


def _layer(o: dict[str, Any], name: str = "blocks.1.conv_pw") -> dict[str, Any]:
    return o["layers"][name]


def _tensor(o: dict[str, Any], key: str, t: torch.Tensor) -> None:
    if o["format"] == FORMAT_V1:
        o["state_dict"][key] = t
    else:
        o["tensors"][key] = tensorcodec.encode(t)


# (id, mutation, words the message must contain)
MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("c_in_str", lambda o: _layer(o).update(c_in="16"), "c_in must be an integer"),
    ("c_in_bool", lambda o: _layer(o).update(c_in=True), "c_in must be an integer"),
    ("c_out_negative", lambda o: _layer(o).update(c_out=-4), "c_out -4 is out of range"),
    ("c_in_huge", lambda o: _layer(o).update(c_in=10**12), "c_in 1000000000000 is out"),
    ("r_negative", lambda o: _layer(o).update(r=-1), "r -1 is out of range"),
    ("r_huge", lambda o: _layer(o).update(r=10**9), "r 1000000000 is out of range"),
    ("r_large", lambda o: _layer(o).update(r=10**6), "wb_codes has shape"),
    ("r_float", lambda o: _layer(o).update(r=8.0), "r must be an integer"),
    ("kind", lambda o: _layer(o).update(kind="depthwise"), "kind 'depthwise'"),
    ("spec_missing_r", lambda o: _layer(o).pop("r"), "lacks 'r'"),
    ("spec_unknown_key", lambda o: _layer(o).update(evil=1), "unknown key 'evil'"),
    ("spec_not_dict", lambda o: o["layers"].update(classifier=[1, 2]), "must be a dict"),
    ("crit_out_of_range", lambda o: _layer(o)["critical_idx"].__setitem__(0, 32),
     "critical_idx entry 32 is out of range"),
    ("crit_negative", lambda o: _layer(o)["critical_idx"].__setitem__(0, -1),
     "critical_idx entry -1"),
    ("crit_duplicated", lambda o: _layer(o)["critical_idx"].__setitem__(
        1, _layer(o)["critical_idx"][0]), "duplicate"),
    ("crit_float", lambda o: _layer(o)["critical_idx"].__setitem__(0, 1.5),
     "must be an integer"),
    ("crit_not_list", lambda o: _layer(o).update(critical_idx="0,1"), "critical_idx must be"),
    ("layer_not_in_model", lambda o: o["layers"].update(
        {"blocks.99.conv_pw": o["layers"].pop("blocks.1.conv_pw")}), "not a module"),
    ("layer_is_depthwise", lambda o: o["layers"].update(
        {"blocks.1.conv_dw": o["layers"].pop("blocks.1.conv_pw")}), "pointwise"),
    ("codes_outside", lambda o: _set_codes(o, "blocks.1.conv_pw.wb_codes", 2),
     "outside {-1, 0, 1}"),
    ("codes_int8_min", lambda o: _set_codes(o, "blocks.12.conv_pw.wc_codes", -128),
     "outside {-1, 0, 1}"),
    ("perm_mismatch", lambda o: _tensor(o, "blocks.1.conv_pw.perm",
                                        torch.arange(32).flip(0)), "perm does not match"),
    ("weight_dtype", lambda o: _tensor(o, "blocks.0.bn_pw.running_var",
                                       torch.ones(16, dtype=torch.float64)), "dtype"),
    ("missing_tensor", lambda o: (o["state_dict"] if "state_dict" in o else o["tensors"]).pop(
        "blocks.0.bn_pw.running_var"), "missing 'blocks.0.bn_pw.running_var'"),
    ("no_layers", lambda o: o.pop("layers"), "no 'layers'"),
    ("no_model_info", lambda o: o.pop("model_info"), "no 'model_info'"),
    ("no_arch", lambda o: o["model_info"].pop("arch"), "lacks 'arch'"),
    ("arch_unknown", lambda o: o["model_info"].update(arch="resnet50"), "model_info.arch"),
    ("info_unknown_key", lambda o: o["model_info"].update(weights="x"), "unknown model_info"),
    ("config_not_dict", lambda o: o["model_info"].update(config=[0.25]), "must be a dict"),
    ("config_unknown_key", lambda o: o["model_info"]["config"].update(evil=1), "unknown key"),
    ("config_huge_width", lambda o: o["model_info"]["config"].update(width_mult=1e6),
     "more than"),
    ("config_nan_width", lambda o: o["model_info"]["config"].update(width_mult=float("nan")),
     "bad value"),
    ("config_bad_padding", lambda o: o["model_info"]["config"].update(padding="valid"),
     "does not build"),
    ("resolution_absurd", lambda o: o["model_info"].update(resolution=10**6),
     "resolution 1000000 is not an integer in 8..4096"),
    ("resolution_4097", lambda o: o["model_info"].update(resolution=4097), "8..4096"),
    ("resolution_zero", lambda o: o["model_info"].update(resolution=0), "8..4096"),
    ("resolution_str", lambda o: o["model_info"].update(resolution="224"), "8..4096"),
    ("num_classes_str", lambda o: o["model_info"].update(num_classes="10"),
     "num_classes must be an integer"),
    ("mean_short", lambda o: o["model_info"].update(mean=[0.5]), "mean must be 3 numbers"),
    ("std_zero", lambda o: o["model_info"].update(std=[0.0, 1.0, 1.0]), "positive"),
    ("resize_mode", lambda o: o["model_info"].update(resize_mode="stretch"), "resize_mode"),
    ("classes_not_list", lambda o: o["model_info"].update(classes="cat dog"), "classes"),
    ("weight_bits_float", lambda o: o["meta"].update(weight_bits=16.0),
     "unsupported weight_bits 16.0"),
    ("activation_bits_float", lambda o: o["meta"].update(activation_bits=8.0),
     "unsupported activation_bits 8.0"),
    ("hidden_bits_float", lambda o: o["meta"].update(activation_bits=8, hidden_bits=8.0),
     "unsupported hidden_bits 8.0"),
    ("meta_not_dict", lambda o: o.update(meta=[1]), "meta must be a dict"),
    ("bn_folded_missing_module", lambda o: o["meta"].update(
        bn_folded=[["blocks.0.conv_pw", "blocks.0.bn_nope"]]), "missing module"),
    ("bn_folded_not_pairs", lambda o: o["meta"].update(bn_folded="blocks.0"), "bn_folded"),
    ("bn_folded_not_bn", lambda o: o["meta"].update(
        bn_folded=[["blocks.0.conv_pw", "blocks.0.conv_dw"]]), "not a layer and its BatchNorm"),
]
V1_TOO = {"codes_outside", "codes_int8_min", "crit_out_of_range", "crit_duplicated", "r_large",
          "perm_mismatch", "weight_dtype", "missing_tensor", "resolution_absurd", "c_in_huge"}


@pytest.fixture(scope="module")
def artifact_objs() -> dict[str, bytes]:
    net, meta = tiny_hybrid(16)
    return {FORMAT: _dump(artifact_dict(net, tiny_info(), meta)),
            FORMAT_V1: _dump(v1_dict(net, meta))}


CASES = [pytest.param(FORMAT, *m, id=f"v2-{m[0]}") for m in MALFORMED] + [
    pytest.param(FORMAT_V1, *m, id=f"v1-{m[0]}") for m in MALFORMED if m[0] in V1_TOO]


@pytest.mark.parametrize(("fmt", "name", "mutate", "needle"), CASES)
def test_malformed_artifacts_are_refused_in_one_line(artifact_objs, fmt, name, mutate,
                                                     needle) -> None:
    obj = torch.load(io.BytesIO(artifact_objs[fmt]), weights_only=True)
    mutate(obj)
    if fmt == FORMAT and "tensors" in obj:
        reseal(obj)
    with pytest.raises(InputError) as ei:
        build_compressed(obj, "x.hfb.pt")
    msg = str(ei.value)
    assert msg.startswith("x.hfb.pt: ") and "\n" not in msg and len(msg) < 300, msg
    assert needle in msg, msg


def test_cli_refuses_a_malformed_artifact(tmp_path: Path, artifact_objs) -> None:
    for blob in artifact_objs.values():  # the unmodified ones load
        build_compressed(torch.load(io.BytesIO(blob), weights_only=True), "x.hfb.pt")
    obj = torch.load(io.BytesIO(artifact_objs[FORMAT]), weights_only=True)
    _layer(obj).update(r=10**9)
    path = tmp_path / "crafted.hfb.pt"
    path.write_bytes(_dump(reseal(obj)))
    one_error(run("report", path), str(path), "malformed compressed model")


# --------------------------------------------------------------------------- trust
def test_loading_is_weights_only_and_never_touches_source_model(tmp_path: Path,
                                                                monkeypatch) -> None:
    net, meta = tiny_hybrid(16)
    pickled = tmp_path / "pickled.pt"
    torch.save(tiny_v1(), pickled)  # a whole nn.Module: unpickling it would run code
    meta["source_model"] = str(pickled)
    path = tmp_path / "m.hfb.pt"
    save_compressed(path, net, tiny_info(), meta)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # only torch's tensor rebuilders: no classes, nothing that runs code when unpickled
    globs = {str(arg) for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert globs and all(g.startswith(("torch._utils ", "torch ", "collections OrderedDict"))
                         for g in globs), globs
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _, _, meta2 = load_compressed(path)
    assert calls == [(str(path), True)]
    assert meta2["source_model"] == str(pickled)
    assert torch.load(path, weights_only=True)["format"] == "hfbconvert-compressed/2"


def test_compress_refuses_an_artifact_as_its_input(tmp_path: Path) -> None:
    from hfbconvert.models.loading import load_model

    net, meta = tiny_hybrid(16)
    path = tmp_path / "m.hfb.pt"
    save_compressed(path, net, tiny_info(), meta)
    assert torch.load(path, weights_only=True)["format"] == "hfbconvert-compressed/2"
    with pytest.raises(InputError, match="already an hfbconvert compressed model"):
        load_model(str(path))
