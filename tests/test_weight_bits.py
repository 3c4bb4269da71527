"""``compress --weight-bits 32|16|8``: storage precision of the full-precision weights.

The per-channel int8 quantizer's properties (hypothesis), exact re-derivation of the codes
from the fake-quantized weights, the cost model's bytes, and the exported ONNX files
(float16 + Cast, int8 + DequantizeLinear) against PyTorch, end to end on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from hfbconvert.artifact import load_compressed
from hfbconvert.costs import hybrid_cost, model_cost
from hfbconvert.errors import CheckFailed, InputError
from hfbconvert.export import build_onnx, export_onnx
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.verify import verify_onnx
from hfbconvert.weightquant import (
    INT8_MAX,
    apply_weight_bits,
    check_bits,
    fake_quant,
    int8_codes,
    quantize_int8,
    weight_params,
)

from .test_cli import _write_healthy_checkpoint, ok, one_error, run
from .test_export import RES, images, make_net
from .tiny import TINY_RES, tiny_v1, write_npz

FASTEST = ["--steps", "0", "--no-reconstruct", "--min-agreement", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- quantizer
def _weights():
    """Float32 weight matrices/kernels, some rows all zero, some with outliers."""
    floats = st.floats(-8.0, 8.0, allow_nan=False, width=32)
    shapes = st.tuples(st.integers(1, 6), st.integers(1, 40))
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=floats)).map(torch.from_numpy)


@settings(max_examples=150, deadline=None)
@given(_weights())
def test_int8_no_clipping_error_is_half_a_step(w: torch.Tensor) -> None:
    codes, scale = quantize_int8(w, clip_ratios=(1.0,))
    assert codes.dtype == torch.int8 and scale.shape == (w.shape[0],)
    assert int(codes.abs().max()) <= INT8_MAX
    q = codes.float() * scale[:, None]
    err = (w - q).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())


@settings(max_examples=150, deadline=None)
@given(_weights())
def test_int8_clip_search(w: torch.Tensor) -> None:
    codes, scale = quantize_int8(w)
    assert int(codes.abs().max()) <= INT8_MAX and bool((scale > 0).all())
    q = codes.float() * scale[:, None]
    inside = w.abs() <= INT8_MAX * scale[:, None]
    err = (w - q).abs()
    # inside the clipping range: round to nearest; outside: saturated at ±127 steps
    assert bool((err[inside] <= (scale[:, None] / 2 * (1 + 1e-5)).expand_as(w)[inside]).all())
    assert bool((codes[~inside].abs() == INT8_MAX).all())
    assert bool((torch.sign(codes[~inside].float()) == torch.sign(w[~inside])).all())
    # never worse, per channel, than no clipping
    c1, s1 = quantize_int8(w, clip_ratios=(1.0,))
    e1 = (w.double() - (c1.float() * s1[:, None]).double()).pow(2).sum(1)
    e = (w.double() - q.double()).pow(2).sum(1)
    assert bool((e <= e1 * (1 + 1e-6) + 1e-30).all())


@settings(max_examples=150, deadline=None)
@given(_weights(), st.sampled_from([8, 16]))
def test_fake_quant_is_idempotent(w: torch.Tensor, bits: int) -> None:
    q = fake_quant(w, bits)
    assert torch.equal(fake_quant(q, bits), q)


@settings(max_examples=150, deadline=None)
@given(_weights())
def test_codes_re_derive_exactly(w: torch.Tensor) -> None:
    """What the exporter does: scale and codes from the fake-quantized values alone."""
    codes, scale = quantize_int8(w)
    q = (codes.float() * scale[:, None]).numpy()
    for axis, arr in ((0, q), (1, q.T.copy())):
        c2, s2 = int8_codes(arr, axis=axis)
        nonzero = (codes != 0).any(1).numpy()
        assert np.array_equal(s2[nonzero], scale.numpy()[nonzero])
        assert np.array_equal(np.moveaxis(c2, axis, 0), codes.numpy())
        assert np.array_equal((np.moveaxis(c2, axis, 0) * s2[:, None]).astype(np.float32), q)


def test_int8_codes_refuses_unquantized_weights() -> None:
    w = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError):
        int8_codes(w)


@pytest.mark.parametrize("bits", [4, 0, 64, True])
def test_check_bits(bits) -> None:
    with pytest.raises(InputError, match="choose 32, 16 or 8"):
        check_bits(bits)


# --------------------------------------------------------------------------- model
def test_apply_weight_bits_covers_every_fp_weight() -> None:
    net = make_net("linear")  # stem, depthwise, 1x1 conv with bias, hybrid classifier
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = apply_weight_bits(net, 8)
    assert set(stats) == {"stem.0.weight", "dw.0.weight", "pw.weight", "fc.w_crit"}
    after = net.state_dict()
    for k, v in after.items():
        changed = not torch.equal(v, before[k])
        assert changed == (k in stats), k  # biases, BN, a, codes untouched
    for _name, mod, attr in weight_params(net):
        int8_codes(getattr(mod, attr).detach().numpy())  # exactly representable


def test_cost_bytes_follow_weight_bits() -> None:
    h = HybridPointwise(8, 6, torch.tensor([0, 3]), r=5)
    h.freeze()
    tern = 10 + 5  # ternary at 2 bits, packed per matrix
    assert hybrid_cost("x", h, 10).bytes == (2 * 8 + 6 + 5) * 4 + tern
    # critical rows at 1 byte plus one fp32 scale per row; bias and a stay fp32
    assert hybrid_cost("x", h, 10, weight_bits=8).bytes == 2 * 8 + 2 * 4 + (6 + 5) * 4 + tern
    assert hybrid_cost("x", h, 10, weight_bits=16).bytes == 2 * 8 * 2 + (6 + 5) * 4 + tern
    net = tiny_v1()
    c32 = model_cost(net, TINY_RES)
    apply_weight_bits(net, 8)
    c8 = model_cost(net, TINY_RES)  # the model's own bits
    assert c8.weight_bits == 8 and c8.totals()["weight_bits"] == 8
    assert c8.muls == c32.muls and c8.energy_pj == c32.energy_pj  # weight-only
    n_w = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_ch = sum(m.weight.shape[0] for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert c32.bytes - c8.bytes == pytest.approx(n_w * 3 - n_ch * 4)
    assert all(c.extra["weight_bits"] == 8 for c in c8.layers)


# --------------------------------------------------------------------------- export
def _init_types(mp: onnx.ModelProto) -> set[str]:
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in mp.graph.initializer}


def _fp_bytes(mp: onnx.ModelProto) -> int:
    """Initializer bytes of everything but the packed ternary codes and int64 indices."""
    skip = (onnx.TensorProto.UINT8, onnx.TensorProto.INT64)
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in mp.graph.initializer
               if t.data_type not in skip)


@pytest.mark.parametrize("case", ["mixed", "linear", "channel_scale", "plain"])
@pytest.mark.parametrize("bits", [16, 8])
def test_export_small_nets(tmp_path: Path, case: str, bits: int) -> None:
    net = make_net(case)
    apply_weight_bits(net, bits)
    path = tmp_path / "m.onnx"
    stats = export_onnx(net, path, RES)
    assert stats["weight_bits"] == bits
    mp = onnx.load(str(path))
    onnx.checker.check_model(mp, full_check=True)
    weights = {n.input[1] for n in mp.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert not weights & {t.name for t in mp.graph.initializer}  # all produced by Cast/DQ
    res = verify_onnx(path, net, images(6), reference_batch=2)
    assert res.passed, res.summary()


@pytest.mark.parametrize("opset", [19, 21])
def test_int8_export_at_higher_opsets(tmp_path: Path, opset: int) -> None:
    net = make_net("mixed")
    apply_weight_bits(net, 8)
    export_onnx(net, tmp_path / "m.onnx", RES, opset=opset)
    assert verify_onnx(tmp_path / "m.onnx", net, images(3), reference_batch=1).passed


def test_unrounded_weights_are_refused() -> None:
    with pytest.raises(CheckFailed, match="int8"):
        build_onnx(make_net("plain"), RES, weight_bits=8)
    with pytest.raises(CheckFailed, match="float16"):
        build_onnx(make_net("plain"), RES, weight_bits=16)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model compressed at 32, 16 and 8 bits and exported (verified) to ONNX."""
    d = tmp_path_factory.mktemp("wbits")
    npz = write_npz(d / "calib.npz")
    model = _write_healthy_checkpoint(d / "tiny.pt", npz)
    out: dict = {"dir": d, "calib": npz, "model": model}
    for bits in (32, 16, 8):
        pt, onx = d / f"c{bits}.pt", d / f"c{bits}" / "m.onnx"
        onx.parent.mkdir()
        # int8: error-feedback codes, which the export must carry exactly as well
        rounding = ["--weight-rounding", "gptq"] if bits == 8 else []
        ok(run("compress", model, "--calib", npz, *FASTEST, "--weight-bits", bits, *rounding,
               "-o", pt, "-q"))
        exp = ok(run("export", "onnx", pt, "-o", onx, "--calib", npz, "--json", "-q"))
        out[bits] = {"pt": pt, "onnx": onx, "export": json.loads(exp.stdout)}
    return out


@pytest.mark.parametrize("bits", [16, 8])
def test_cli_exports_are_smaller_and_verified(tiny, bits: int) -> None:
    ex = tiny[bits]["export"]
    assert ex["verify"]["passed"] and ex["verify"]["agreement"] == 1.0
    assert ex["verify"]["max_rel_diff"] <= 1e-4
    assert ex["export"]["weight_bits"] == bits
    size = {b: tiny[b]["onnx"].stat().st_size for b in (32, 16, 8)}
    assert size[8] < size[16] < size[32]
    fp = {b: _fp_bytes(onnx.load(str(tiny[b]["onnx"]))) for b in (32, bits)}
    # BN, biases and per-channel scales stay fp32: on this tiny net they are a large share
    assert fp[bits] < fp[32] * (0.65 if bits == 16 else 0.55)
    mp = onnx.load(str(tiny[bits]["onnx"]))
    onnx.checker.check_model(mp, full_check=True)
    types = _init_types(mp)
    assert ("FLOAT16" in types) == (bits == 16) and ("INT8" in types) == (bits == 8)
    ops = {n.op_type for n in mp.graph.node}
    assert ("DequantizeLinear" in ops) == (bits == 8)


def test_cli_int8_weights_are_exact(tiny) -> None:
    """DequantizeLinear(codes, scale) reproduces the PyTorch weights bit for bit, and
    onnxruntime matches the rebuilt model."""
    net, _, meta = load_compressed(tiny[8]["pt"])
    assert meta["weight_bits"] == 8 and meta["config"]["weight_bits"] == 8
    assert [s["stage"] for s in meta["stages"]][-2:] == ["weights_8bit", "mean_shift"]
    # --weight-rounding gptq: error-feedback codes on the same grid, never worse
    assert meta["config"]["weight_rounding"] == "gptq"
    assert {s["rounding"] for s in meta["weight_quant"].values()} == {"gptq"}
    assert all(s["output_err_vs_nearest"] <= 1 + 1e-9 for s in meta["weight_quant"].values())
    mp = onnx.load(str(tiny[8]["onnx"]))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in mp.graph.initializer}
    sd = net.state_dict()
    dq = [n for n in mp.graph.node if n.op_type == "DequantizeLinear"]
    crit = {f"{name}.w_crit" for name, m in net.named_modules()
            if isinstance(m, HybridPointwise) and m.n_critical and m.kind == "conv"}
    assert crit and {n.output[0] for n in dq} >= {"conv_stem.weight",
                                                  "blocks.0.conv_dw.weight"} | crit
    for n in dq:
        axis = next(a.i for a in n.attribute if a.name == "axis")
        codes, scale, zp = (inits[i] for i in n.input)
        assert codes.dtype == np.int8 and not zp.any() and axis == 0
        assert int(np.abs(codes).max()) <= INT8_MAX
        w = (codes.astype(np.float32) * scale.reshape((-1,) + (1,) * (codes.ndim - 1)))
        if n.output[0] in sd:
            assert np.array_equal(w.astype(np.float32).ravel(), sd[n.output[0]].numpy().ravel())
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(1))
    assert verify_onnx(tiny[8]["onnx"], net, x, reference_batch=1).passed


def test_cli_no_mean_shift_skips_the_stage_alone(tiny) -> None:
    """--no-mean-shift: the same int8 codes as the run with the mean shift, which changes
    only biases; the stage and its meta are absent and the config says so."""
    pt = tiny["dir"] / "c8-noms.pt"
    ok(run("compress", tiny["model"], "--calib", tiny["calib"], *FASTEST, "--weight-bits", 8,
           "--weight-rounding", "gptq", "--no-mean-shift", "-o", pt, "-q"))
    net, _, meta = load_compressed(pt)
    ref, _, ref_meta = load_compressed(tiny[8]["pt"])
    assert meta["config"]["mean_shift"] is False and ref_meta["config"]["mean_shift"] is True
    assert [s["stage"] for s in meta["stages"]][-1] == "weights_8bit"
    assert "mean_shift" not in meta and ref_meta["mean_shift"]
    sd, rsd = net.state_dict(), ref.state_dict()
    assert sd.keys() == rsd.keys()
    moved = {k for k in sd if not torch.equal(sd[k], rsd[k])}
    assert moved and all(k.endswith("bias") for k in moved)


def test_cli_no_mean_shift_needs_8_bit_weights(tiny) -> None:
    res = run("compress", tiny["model"], "--calib", tiny["calib"], *FASTEST,
              "--weight-bits", 16, "--no-mean-shift", "-o", tiny["dir"] / "x.pt", "-q")
    assert res.exit_code == 2
    assert "--no-mean-shift" in one_error(res) and "--weight-bits 8" in one_error(res)
    assert not (tiny["dir"] / "x.pt").exists()


def test_cli_report_shows_bits(tiny) -> None:
    rep = json.loads(ok(run("report", tiny[8]["pt"], "--json", "-q")).stdout)
    assert rep["conventions"]["weight_bits"] == 8
    assert {r["weight_bits"] for r in rep["layers"]} == {8}
    b32 = json.loads(ok(run("report", tiny[32]["pt"], "--json", "-q")).stdout)
    assert rep["totals"]["compressed"]["bytes"] < b32["totals"]["compressed"]["bytes"]
    # stem and depthwise: all full precision, 1 byte per weight + a 4-byte scale per channel
    assert rep["other_layers"]["after"]["bytes"] < 0.4 * b32["other_layers"]["after"]["bytes"]
    text = ok(run("report", tiny[8]["pt"])).stdout
    assert "int8" in text


def test_plain_model_export_is_unchanged(tiny, tmp_path) -> None:
    res = json.loads(ok(run("export", "onnx", tiny["model"], "-o", tmp_path / "p.onnx",
                            "--json", "-q")).stdout)
    assert res["export"]["weight_bits"] == 32 and res["verify"]["passed"]
    mp = onnx.load(str(tmp_path / "p.onnx"))
    assert _init_types(mp) == {"FLOAT"}
    assert "BatchNormalization" not in {n.op_type for n in mp.graph.node}  # folded as before


@pytest.mark.parametrize("bits", ["4", "0", "abc"])
def test_unsupported_weight_bits(tiny, tmp_path, bits: str) -> None:
    out = tmp_path / "x.pt"
    res = run("compress", tiny["model"], "--calib", tiny["calib"], *FASTEST,
              "--weight-bits", bits, "-o", out)
    if bits == "abc":  # not an integer: click's own usage error, still exit 2
        assert res.exit_code == 2 and "Traceback" not in res.output
    else:
        one_error(res, "--weight-bits", bits, "32", "16", "8")
    assert not out.exists()
