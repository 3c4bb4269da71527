"""``compress --activation-bits 8``: int8 activations, BN folding, QDQ export, int8 costs.

The quantizer against a plain reference and onnxruntime's arithmetic (hypothesis), the
clipping search, BN folding (function unchanged), the one-pass calibration, and the tiny
model end to end through the CLI: artifact round trip, QDQ ONNX verified against
PyTorch, int8 cost counts, and one-line errors for bad input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hfbconvert import actquant
from hfbconvert.actquant import ActQuant, choose_range, fake_quant_ref, qparams
from hfbconvert.artifact import load_compressed
from hfbconvert.bnfold import conv_bn_pairs, fold_batchnorms
from hfbconvert.costs import ENERGY_PJ, model_cost
from hfbconvert.errors import InputError
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.verify import verify_onnx

from .test_cli import _write_healthy_checkpoint, ok, one_error, run
from .tiny import TINY_RES, tiny_v1, write_npz

FASTEST = ["--steps", "0", "--no-reconstruct", "--min-agreement", "0"]
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- quantizer
@settings(max_examples=100, deadline=None)
@given(lo=st.floats(-50, 0), width=st.floats(1e-3, 100), seed=st.integers(0, 2**16))
def test_quantizer_matches_reference_and_zero_is_exact(lo: float, width: float, seed: int):
    hi = lo + width
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi))
    q = ActQuant()
    q.scale.fill_(float(scale))
    q.zero_point.fill_(int(zp))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(512, generator=g) * (hi - lo) * 1.5 + lo - 0.25 * (hi - lo)
    y = q(x)
    ref = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    assert torch.equal(y, ref)
    assert q(torch.zeros(3)).abs().max() == 0  # zero (ReLU output, padding) stays exact
    inside = (x >= lo) & (x <= hi)
    slack = 1e-6 * (1 + x.abs())  # float32 rounding of (q - zp) * scale
    assert ((y - x).abs() <= scale / 2 + slack)[inside].all()  # half a step
    assert ((y >= -zp * scale - 1e-6) & (y <= (255 - zp) * scale + 1e-6)).all()


def test_quantizer_matches_onnxruntime_quantize_linear():
    """The same x / scale, round-half-to-even, saturate as ONNX QuantizeLinear in ORT."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    q = ActQuant()
    q.scale.fill_(0.0371)
    q.zero_point.fill_(77)
    node_q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    node_d = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node_q, node_d], "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [onnx.numpy_helper.from_array(np.array(0.0371, np.float32), "s"),
         onnx.numpy_helper.from_array(np.array(77, np.uint8), "z")])
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy()})[0]
    assert np.array_equal(y, q(x).numpy())


def test_straight_through_gradient():
    q = ActQuant()
    q.scale.fill_(0.1)
    x = torch.randn(64, requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(64))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), outlier=st.floats(1, 1000))
def test_clip_search_never_worse_than_minmax(seed: int, outlier: float):
    """The MSE search includes the MinMax range, so it can only do better."""
    g = torch.Generator().manual_seed(seed)
    v = torch.cat([torch.randn(2000, generator=g).abs(), torch.tensor([outlier])])
    lo, hi = float(v.min()), float(v.max())
    scale, zp, ratio = choose_range(v, lo, hi)

    def err(s, z):
        return float((fake_quant_ref(v, torch.tensor(s), torch.tensor(float(z))) - v)
                     .pow(2).sum())

    s0, z0 = qparams(torch.tensor(lo), torch.tensor(hi))
    assert err(scale, zp) <= err(float(s0), int(z0)) * (1 + 1e-6)
    assert ratio in actquant.CLIP_RATIOS


# --------------------------------------------------------------------------- BN folding
def _with_hybrid(seed: int = 0) -> nn.Module:
    """The tiny net with one pointwise conv replaced by a random hybrid layer."""
    net = tiny_v1(seed)
    conv = net.get_submodule("blocks.1.conv_pw")
    c_out, c_in = conv.out_channels, conv.in_channels
    h = HybridPointwise(c_in, c_out, torch.arange(0, c_out, 3), 2 * c_out, "conv")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h.w_crit.copy_(torch.randn(h.n_critical, c_in, generator=g) * 0.1)
        h.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
        h.set_factors(torch.randint(-1, 2, (h.r, c_in), generator=g),
                      torch.rand(h.r, generator=g) * 0.05,
                      torch.randint(-1, 2, (h.n_tolerant, h.r), generator=g))
    h.freeze()
    net.blocks[1].conv_pw = h
    return net.eval()


def test_fold_batchnorms_keeps_the_function():
    net = _with_hybrid()
    x = torch.randn(4, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = net(x)
        pairs = fold_batchnorms(net)
        after = net(x)
    assert ("blocks.1.conv_pw", "blocks.1.bn_pw") in pairs and ("conv_stem", "bn_stem") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net.blocks[1].conv_pw.channel_scale is not None  # BN factor of tolerant rows
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_bn_free_model_has_nothing_to_fold():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert conv_bn_pairs(net) == [] and fold_batchnorms(net) == []
    shared = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    class Branchy(nn.Module):  # the conv output also feeds a second consumer: no fold
        def __init__(self):
            super().__init__()
            self.conv, self.bn = shared[0], shared[1]

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert conv_bn_pairs(Branchy()) == []


# --------------------------------------------------------------------------- calibration
def test_calibration_is_one_pass_and_sequential():
    net = _with_hybrid()
    fold_batchnorms(net)
    assert len(actquant.attach(copy.deepcopy(net))) == len(actquant.quant_sites(net))
    qs = actquant.attach(net, hidden_bits=8)
    assert len(qs) == len(actquant.quant_sites(net)) + 1  # + the hidden units of one bank
    assert actquant.attach(net, hidden_bits=8) == []  # idempotent
    x = torch.randn(16, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(3))
    float_net = copy.deepcopy(net)  # the same quantizer sites, each a pass-through
    for _, q in actquant.quantizers(float_net):
        q.forward = lambda t: t
    calls = []
    handle = net.register_forward_pre_hook(lambda m, a: calls.append(1))
    rep = actquant.calibrate(net, x)
    handle.remove()
    assert len(calls) == 1  # one pass over the images
    assert set(rep) == {n for n, _ in actquant.quantizers(net)}
    assert actquant.model_act_bits(net) == 8

    def inputs(model: nn.Module) -> dict[str, torch.Tensor]:
        """What each per-tensor quantizer receives in a forward of ``model``."""
        seen = {}
        hooks = [q.register_forward_pre_hook(
                 lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone()))
                 for n, q in actquant.quantizers(model) if q.scale.dim() == 0]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return seen

    def minmax_mse(v: torch.Tensor) -> tuple[float, int]:
        scale, zp, _ = actquant.choose_range(v.reshape(-1), float(v.min()), float(v.max()))
        return scale, zp

    # sequential: each range is the best range for the input the int8 network feeds it
    # (earlier quantizers active); these tensors are below the sampling size, so exact
    int8_in = inputs(net)
    assert len(int8_in) == len(rep) - 1  # all but the hidden-unit (per-channel) one
    for n, v in int8_in.items():
        assert v.numel() <= actquant.SAMPLE_VALUES
        assert (rep[n]["scale"], rep[n]["zero_point"]) == minmax_mse(v), n
    # and that is a different range from the float network's for some later quantizer,
    # so a calibrator that ranged every tensor of the float network fails the check above
    float_in = inputs(float_net)
    differ = [n for n in int8_in if minmax_mse(float_in[n]) != minmax_mse(int8_in[n])]
    assert differ and "conv_stem.input_quant" not in differ


def test_output_objective_minimises_each_layers_output_error():
    """objective "output": every per-tensor range is the clip ratio whose quantized input
    gives the layer output closest to the float input's (brute force over the ratios on
    the input the int8 network feeds it), hidden units still calibrated; and it is not
    the tensor-MSE choice everywhere (else the test could not tell them apart)."""
    net = _with_hybrid()
    fold_batchnorms(net)
    actquant.attach(net, hidden_bits=8)
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(5))
    x[:, 0] *= 6.0  # one wide input channel: the stem's tensor MSE clips it
    other = copy.deepcopy(net)
    rep = actquant.calibrate(net, x, objective="output")
    rep_in = actquant.calibrate(other, x)
    assert set(rep) == set(rep_in)
    layers = {id(m.input_quant): m for _, m in actquant.quant_sites(net)}
    seen = {}
    hooks = [q.register_forward_pre_hook(lambda m, a, q=q: seen.setdefault(id(q), a[0]))
             for _, q in actquant.quantizers(net) if q.scale.dim() == 0]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    ratios = torch.tensor(actquant.CLIP_RATIOS)
    for name, q in actquant.quantizers(net):
        if q.scale.dim():
            assert rep[name]["units_per_shift"]  # hidden units: per-channel, as before
            continue
        layer, v = layers[id(q)], seen[id(q)]
        inner = [m for m in layer.modules() if isinstance(m, ActQuant)]
        errs = []
        with torch.no_grad():
            for m in inner:
                m.bypass = True
            ref = layer(v).double()
            for r in ratios:
                s, z = actquant.qparams(torch.tensor(float(v.min())) * r,
                                        torch.tensor(float(v.max())) * r)
                errs.append(float((layer(fake_quant_ref(v, s, z)).double() - ref)
                                  .pow(2).sum()))
            for m in inner:
                m.bypass = False
        best = min(range(len(errs)), key=lambda i: (errs[i], i))
        assert rep[name]["clip_ratio"] == pytest.approx(float(ratios[best])), name
    assert any(rep[n]["clip_ratio"] != rep_in[n]["clip_ratio"] for n in rep
               if "units_per_shift" not in rep[n])
    with pytest.raises(ValueError, match="objective"):
        actquant.calibrate(copy.deepcopy(other), x, objective="loss")


def test_depthwise_inputs_get_one_range_per_channel():
    """``depthwise_channels``: each depthwise conv's input quantizer has free per-channel
    ranges, each channel's the MSE clip of its own values (a per-channel loop over
    ``choose_range`` on the same sampled positions is the reference); other sites stay
    per tensor; the structure is what attach rebuilds for an artifact."""
    net = _with_hybrid()
    fold_batchnorms(net)
    qs = actquant.attach(net, depthwise_channels=True)
    dw = {n: m for n, m in actquant.quant_sites(net) if actquant.is_depthwise(m)}
    assert dw and all(m.input_quant.scale.shape == (m.in_channels,) for m in dw.values())
    assert all(q.scale.dim() == 0 for _, q in actquant.quantizers(net)
               if not any(q is m.input_quant for m in dw.values()))
    assert len(qs) == len(actquant.quant_sites(net))
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(2))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0]),
                                         prepend=True) for n, m in dw.items()]
    rep = actquant.calibrate(net, x)
    for h in hooks:
        h.remove()
    for n, m in dw.items():
        q, v = m.input_quant, seen[n]
        assert rep[f"{n}.input_quant"]["per_channel"]
        flat = v.transpose(0, 1).reshape(v.shape[1], -1)
        step = max(1, flat.shape[1] // actquant.CHANNEL_SAMPLE)
        for c in range(v.shape[1]):
            vals = flat[c]
            scale, zp, _ = actquant.choose_range(vals[::step], min(float(vals.min()), 0.0),
                                                 max(float(vals.max()), 0.0))
            assert float(q.scale[c]) == pytest.approx(scale, rel=1e-6), (n, c)
            assert int(q.zero_point[c]) == zp, (n, c)
    y = net(x)  # quantizes per channel along dim 1
    assert torch.isfinite(y).all()


def test_unreached_quantizer_is_an_input_error():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x)

    net = Unused()
    actquant.attach(net)
    with pytest.raises(InputError, match="no calibration image reaches b.input_quant"):
        actquant.calibrate(net, torch.randn(2, 3, 4, 4))


def test_hidden_scales_are_powers_of_two_apart():
    """Per-unit ranges spanning 2^10: every unit gets s_max · 2^-e with its values inside
    its symmetric range (unless e is capped), and no unit is rounded away."""
    q = ActQuant(channels=12)
    g = torch.Generator().manual_seed(0)
    ranges = 2.0 ** -torch.arange(12.0)
    x = (torch.rand(64, 12, 3, 3, generator=g) * 2 - 1) * ranges[None, :, None, None]
    rep = actquant._fit_pow2(q, x, lambda v: (*choose_range(v, float(v.min()),
                                                            float(v.max())),
                                              float(v.min()), float(v.max())))
    e = torch.log2(q.scale[0] / q.scale)
    assert torch.equal(e, torch.round(e)) and e.min() == 0 and e.max() <= 7
    assert ((q.zero_point >= 0) & (q.zero_point <= 255)).all()
    assert sum(rep["units_per_shift"]) == 12
    y = q(x)
    amax = x.abs().amax(dim=(0, 2, 3))
    lo_c, hi_c = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    top = (255 - q.zero_point) * q.scale + q.scale / 2
    bottom = -q.zero_point * q.scale - q.scale / 2
    assert ((hi_c <= top) & (lo_c >= bottom))[:8].all()  # within 2^7: whole range kept
    assert amax.shape == (12,)
    rel = (y - x).pow(2).sum((0, 2, 3)) / x.pow(2).sum((0, 2, 3))
    assert (rel[:8] < 1e-3).all()  # ≥ 64 levels each: nothing rounded away


def test_int32_hidden_units_are_the_integer_pipeline():
    """Default int32 hidden units: uint8 input codes, integer W_b accumulation, one
    fixed-point multiplier per hidden unit (a_k · s_x, at a common scale), integer W_c
    sums. The float layer the model runs equals that pipeline to float32 precision, so
    the exported float graph is the int32 kernel's arithmetic."""
    torch.manual_seed(0)
    net = _with_hybrid()
    h = next(m for m in net.modules() if isinstance(m, HybridPointwise))
    actquant.attach(net)
    assert h.hidden_quant is None and h.input_quant is not None
    x = torch.randn(4, h.c_in, 5, 5, generator=torch.Generator().manual_seed(1)) * 3
    h.input_quant.scale.fill_(0.05)
    h.input_quant.zero_point.fill_(100)
    with torch.no_grad():
        want = h(x)[:, h.tolerant_idx]
        tb, a, tc = h.ternary_factors()
        q = torch.clamp(torch.round(x / 0.05) + 100, 0, 255).to(torch.int64) - 100
        acc = torch.einsum("rc,nchw->nrhw", tb.to(torch.int64), q)  # exact integers
        common = float((a.abs() * 0.05).max()) / 2**20  # one fixed-point scale for all units
        mult = torch.round(a.double() * 0.05 / common).to(torch.int64)  # the int32 MUL
        hidden = acc * mult[None, :, None, None]
        assert hidden.abs().max() < 2**31  # fits the int32 accumulator
        y = torch.einsum("tr,nrhw->nthw", tc.to(torch.int64), hidden).double() * common
        if h.channel_scale is not None:
            y = y * h.channel_scale.double()[None, :, None, None]
        y = y + h.bias.double()[h.tolerant_idx][None, :, None, None]
    torch.testing.assert_close(y.float(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_int8_energy_constants():
    net = _with_hybrid()
    fold_batchnorms(net)
    actquant.attach(net)
    c = model_cost(net, TINY_RES)
    assert c.act_bits == 8
    h = next(r for r in c.layers if r.kind == "hybrid")
    assert h.scale_muls == h.pixels * h.extra["r"]  # the a's; BN scales: in the requant
    assert h.muls == h.pixels * (h.extra["critical"] * h.extra["c_in"] + h.extra["r"])
    by = c.muls_by_bits()
    assert by["int8"] + by["int32"] == c.muls and by["int32"] == h.scale_muls
    want = (by["int8"] * ENERGY_PJ["int8_mul"] + by["int32"] * ENERGY_PJ["int32_mul"]
            + c.adds * ENERGY_PJ["int32_add"])
    assert c.energy_pj == pytest.approx(want)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def a8(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("a8")
    npz = write_npz(d / "calib.npz", 96)
    model = _write_healthy_checkpoint(d / "tiny.pt", npz)
    pt, onx = d / "a8.hfb.pt", d / "a8.onnx"
    res = ok(run("compress", model, "--calib", npz, *FASTEST, "--activation-bits", "8",
                 "-o", pt, "--json", "-q"))
    # default export: quantizers as arithmetic, verified against PyTorch by the CLI
    exp = ok(run("export", "onnx", pt, "-o", onx, "--calib", npz, "--json", "-q"))
    # --qdq: standard Q/DQ; onnxruntime's rewrites move rounding boundaries and the tiny
    # random net's logits are near-tied (max 0.25), so only the file's semantics are checked
    # (against onnx.reference) for it
    qdq = d / "a8.qdq.onnx"
    ok(run("export", "onnx", pt, "-o", qdq, "--qdq", "--no-verify", "--no-report", "-q"))
    # uint8 hidden units (power-of-two scales), exported and verified the same way
    pt8, onx8 = d / "h8.hfb.pt", d / "h8.onnx"
    res8 = ok(run("compress", model, "--calib", npz, *FASTEST, "--activation-bits", "8",
                  "--hidden-bits", "8", "-o", pt8, "--json", "-q"))
    exp8 = ok(run("export", "onnx", pt8, "-o", onx8, "--calib", npz, "--json", "--no-report", "-q"))
    qdq8 = d / "h8.qdq.onnx"
    ok(run("export", "onnx", pt8, "-o", qdq8, "--qdq", "--no-verify", "--no-report", "-q"))
    return {"dir": d, "calib": npz, "model": model, "pt": pt, "onnx": onx, "qdq": qdq,
            "compress": json.loads(res.stdout), "export": json.loads(exp.stdout),
            "pt8": pt8, "onnx8": onx8, "qdq8": qdq8, "compress8": json.loads(res8.stdout),
            "export8": json.loads(exp8.stdout)}


def _assert_int8_verified(ver: dict, max_rel: float = 0.05) -> None:
    """The arithmetic export computes what PyTorch computes, to float rounding, on almost
    every image. The exceptions are codes flipped at a rounding tie: the runtime's conv
    sums in another order, so a value within an ulp of a .5 boundary may round the other
    way (onnx.reference shows the same), and the tiny net's small logits (max ~0.3)
    magnify one flipped code. Measured: 6 of 64 images differ at all, by at most 4.1% of
    the largest logit (uint8 hidden units: 4 images, 11%)."""
    ort = ver["ort"]
    assert ver["passed"] and ver["max_rel_diff"] <= max_rel
    # at least 85% of the images (all but the 10 worst listed, of 64) to float rounding
    assert ort["n_images"] >= 64 and len(ort["worst"]) == 10
    assert ort["worst"][-1]["max_abs_diff"] <= 1e-5 * ort["max_abs_logit"]
    assert ort["top1_mismatches"] <= ort["allowed"] <= 0.05 * ort["n_images"] + 1
    assert ort["n_over_tolerance"] <= 0.05 * ort["n_images"]


def test_cli_int8_activations_end_to_end(a8):
    stages = [s["stage"] for s in a8["compress"]["stages"]]
    assert stages[-3:] == ["weights_8bit", "mean_shift", "activations_8bit"]
    cost = a8["compress"]["cost"]
    assert cost["activation_bits"] == 8 and cost["weight_bits"] == 8
    net, _, meta = load_compressed(a8["pt"])
    assert meta["activation_bits"] == 8 and meta["bn_folded"]
    assert "int8 (original at int8)" in meta["baselines"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert meta["hidden_bits"] == 32
    assert all(m.hidden_quant is None for m in net.modules() if isinstance(m, HybridPointwise))
    ver = a8["export"]["verify"]
    _assert_int8_verified(ver)
    plain = onnx.load(str(a8["onnx"]))
    assert {"Round", "Clip"} <= {n.op_type for n in plain.graph.node}
    assert "QuantizeLinear" not in {n.op_type for n in plain.graph.node}
    mp = onnx.load(str(a8["qdq"]))
    onnx.checker.check_model(mp, full_check=True)
    graph_ops = {n.op_type for n in mp.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph_ops
    assert "BatchNormalization" not in graph_ops
    fn = next(f for f in mp.functions if f.name == "StrassenPointwise")
    assert "h_scale" not in list(fn.input)  # int32 hidden units: no quantizer inside
    assert not {"Round", "Clip"} & {n.op_type for n in fn.node}
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(5))
    res = verify_onnx(a8["qdq"], net, x, reference_batch=4)
    assert res.reference is not None and res.reference.top1_mismatches == 0
    assert res.reference.max_abs_diff <= 1e-5 * res.reference.max_abs_logit  # file semantics
    assert res.ort.n_images == 8 and np.isfinite(res.ort.max_abs_diff)  # runs unmodified


def test_cli_uint8_hidden_units_end_to_end(a8):
    """``--hidden-bits 8``: every bank's hidden units quantized (power-of-two scales), the
    function takes their scales and zero points, the export verifies, and each hidden
    unit's alignment shift is counted as an ADD on top of the int32-hidden model."""
    net, _, meta = load_compressed(a8["pt8"])
    assert meta["hidden_bits"] == 8
    banks = [m for m in net.modules() if isinstance(m, HybridPointwise) and m.n_tolerant]
    assert banks and all(m.hidden_quant is not None for m in banks)
    ver = a8["export8"]["verify"]
    _assert_int8_verified(ver, max_rel=0.15)
    mp = onnx.load(str(a8["qdq8"]))
    fn = next(f for f in mp.functions if f.name == "StrassenPointwise")
    assert list(fn.input)[-2:] == ["h_scale", "h_zero_point"]
    assert {"Round", "Clip"} <= {n.op_type for n in fn.node}  # the hidden-unit quantizer
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(5))
    res = verify_onnx(a8["qdq8"], net, x, reference_batch=4)
    assert res.reference is not None and res.reference.top1_mismatches == 0
    # float rounding everywhere but where a value sits on a rounding boundary: at most one
    # of the 4 images (an LSB of one hidden unit, well under 1% of the largest logit)
    ref = res.reference
    off = [w for w in ref.worst if w.max_abs_diff > 1e-5 * ref.max_abs_logit]
    assert len(off) <= 1 and ref.max_abs_diff <= 0.01 * ref.max_abs_logit
    # the shifts are ADDs the planner priced and the ADD cap holds (costs.add_limit), so
    # the plan may differ from the int32-hidden one; the record counts exactly the shifts
    c8 = a8["compress8"]["cost"]
    pixels = {r["name"]: r["pixels"] for r in meta["cost"]["layers"]}
    names = {id(m): n for n, m in net.named_modules()}
    shifted = [m for m in banks if actquant.hidden_groups(m.hidden_quant) > 1]
    assert shifted
    cap = meta["add_cap"]
    assert cap["shift_adds"] == sum(pixels[names[id(m)]] * m.r for m in shifted)
    assert cap["adds"] == c8["adds"] and cap["met"] and cap["adds"] <= cap["limit_adds"]


def test_cli_int8_artifact_is_deterministic(a8, tmp_path):
    again = tmp_path / "again.hfb.pt"
    ok(run("compress", a8["model"], "--calib", a8["calib"], *FASTEST, "--activation-bits", "8",
           "-o", again, "-q"))
    a, _, _ = load_compressed(a8["pt"])
    b, _, _ = load_compressed(again)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("args,needles", [
    (["--activation-bits", "4"], ["--activation-bits", "'4'", "'32', '8'"]),
    (["--activation-bits", "8", "--weight-bits", "16"], ["--weight-bits 8"]),
    (["--activation-bits", "8", "--no-calib"], ["needs calibration images"]),
    (["--activation-bits", "8", "--hidden-bits", "16"], ["--hidden-bits", "'16'", "'32', '8'"]),
])
def test_cli_bad_int8_input(a8, tmp_path: Path, args: list[str], needles: list[str]):
    out = tmp_path / "x.pt"
    calib = [] if "--no-calib" in args else ["--calib", a8["calib"]]
    args = [a for a in args if a != "--no-calib"]
    res = run("compress", a8["model"], *calib, *FASTEST, *args, "-o", out)
    one_error(res, *needles)
    assert not out.exists()


# --------------------------------------------------------------------------- mean shift
def test_mean_shift_restores_every_layer_mean():
    """After int8 rounding of the weights, each layer's per-channel output mean (after its
    BN) equals the original network's on the calibration images, layer by layer."""
    from hfbconvert.meanshift import correction_sites, match_output_means
    from hfbconvert.weightquant import apply_weight_bits

    ref = tiny_v1(3)
    net = _with_hybrid(3)
    with torch.no_grad():  # the reference: same network, float, before rounding
        ref.blocks[1].conv_pw = copy.deepcopy(net.blocks[1].conv_pw)
    apply_weight_bits(net, 8)
    pairs = fold_batchnorms(net)
    layers, owners = correction_sites(net, pairs)
    assert "bn_stem" in layers and owners["bn_stem"] is net.conv_stem
    x = torch.randn(32, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(4))
    rep = match_output_means(net, ref, x, layers, owners)
    assert set(rep) == set(layers) and all(v is not None for v in rep.values())
    got, want = {}, {}
    for store, m in ((got, net), (want, ref)):
        hs = [m.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n, s=store: s.__setitem__(n, o.mean(dim=(0, 2, 3))
                                                          if o.dim() == 4 else o.mean(0)))
              for n in layers]
        with torch.no_grad():
            m(x)
        for h in hs:
            h.remove()
    for n in layers:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- fine-tuning with int8 in the loop
def test_int8_ste_is_identity_on_int8_weights_and_passes_gradients():
    from hfbconvert.weightquant import Int8STE, fake_quant

    g = torch.Generator().manual_seed(0)
    w = fake_quant(torch.randn(6, 5, generator=g), 8, (1.0,))
    assert torch.equal(Int8STE()(w), w)  # already int8: unchanged
    lat = (w + 1e-3 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    out = Int8STE()(lat)
    assert torch.equal(out.detach(), fake_quant(lat.detach(), 8, (1.0,)))
    (out * torch.arange(30.0).view(6, 5)).sum().backward()
    assert torch.equal(lat.grad, torch.arange(30.0).view(6, 5))  # straight through


def test_cli_int8_fine_tunes_with_quantizers_in_the_loop(a8, tmp_path):
    """--activation-bits 8 with fine-tuning: one fine-tune, after quantization; the result
    holds exact int8 weights (no parametrization left) and exports verified."""
    from torch.nn.utils import parametrize

    from hfbconvert.weightquant import int8_codes, weight_params

    pt, onx = tmp_path / "q.hfb.pt", tmp_path / "q.onnx"
    res = json.loads(ok(run("compress", a8["model"], "--calib", a8["calib"], "--steps", "6",
                            "--batch-size", "8", "--activation-bits", "8", "--min-agreement",
                            "0", "-o", pt, "--json", "-q")).stdout)
    stages = [s["stage"] for s in res["stages"]]
    assert stages == ["fit", "weights_8bit", "mean_shift", "activations_8bit",
                      "finetune_int8_6"]
    net, _, meta = load_compressed(pt)
    assert meta["finetune_held_kl"]["before"] > 0
    for name, mod, attr in weight_params(net):
        assert not parametrize.is_parametrized(mod, attr), name
        int8_codes(getattr(mod, attr).detach().numpy())  # raises unless exact int8 values
    exp = json.loads(ok(run("export", "onnx", pt, "-o", onx, "--calib", a8["calib"], "--json",
                            "-q")).stdout)
    assert exp["verify"]["passed"]


def test_cli_int8_no_qat_fine_tunes_in_float_first(a8, tmp_path):
    """--no-qat: the one fine-tune runs in float, before the weights are rounded and the
    activations calibrated; the result is the same int8 artifact kind and exports
    verified; the option is recorded in the configuration."""
    from hfbconvert.weightquant import int8_codes, weight_params

    pt, onx = tmp_path / "f.hfb.pt", tmp_path / "f.onnx"
    res = json.loads(ok(run("compress", a8["model"], "--calib", a8["calib"], "--steps", "6",
                            "--batch-size", "8", "--activation-bits", "8", "--no-qat",
                            "--min-agreement", "0", "-o", pt, "--json", "-q")).stdout)
    stages = [s["stage"] for s in res["stages"]]
    assert stages[0] == "fit" and stages[-3:] == ["weights_8bit", "mean_shift",
                                                  "activations_8bit"]
    assert [s for s in stages if s.startswith("finetune")] == ["finetune_6"]
    net, _, meta = load_compressed(pt)
    assert meta["activation_bits"] == 8 and meta["config"]["qat"] is False
    for _name, mod, attr in weight_params(net):
        int8_codes(getattr(mod, attr).detach().numpy())  # raises unless exact int8 values
    exp = json.loads(ok(run("export", "onnx", pt, "-o", onx, "--calib", a8["calib"], "--json",
                            "-q")).stdout)
    assert exp["verify"]["passed"]


def test_cli_int8_qat_of_the_biases_alone(a8, tmp_path):
    """--activation-bits 8 --trainable bias: the int8 fine-tune (quantizers in the loop)
    moves the biases and nothing else: weights and activation ranges are bit for bit
    those of the same run without a fine-tune."""
    common = ["--calib", a8["calib"], "--batch-size", "8", "--activation-bits", "8",
              "--min-agreement", "0", "--json", "-q"]
    plain, pt = tmp_path / "p.hfb.pt", tmp_path / "b.hfb.pt"
    ok(run("compress", a8["model"], *common, "--steps", "0", "-o", plain))
    res = json.loads(ok(run("compress", a8["model"], *common, "--steps", "6", "--trainable",
                            "bias", "--eval-every", "2", "-o", pt)).stdout)
    assert [s["stage"] for s in res["stages"]][-1] == "finetune_int8_6"
    a, b = load_compressed(pt)[0].state_dict(), load_compressed(plain)[0].state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.endswith(".bias") for k in moved), moved


def test_hidden_quant_contract_matches_function_body(a8):
    """``--hidden-bits 8``: the numpy contract of StrassenPointwise with h_scale and
    h_zero_point computes what the exported function body computes."""
    from onnx.reference import ReferenceEvaluator

    from hfbconvert.export.reference import HFB_OPS
    from hfbconvert.verify import _reference_new_ops, reference_logits

    mp = onnx.load(str(a8["onnx8"]))
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(7))
    bodies = reference_logits(a8["onnx8"], x.numpy())
    ev = ReferenceEvaluator(mp, new_ops=[*HFB_OPS, *_reference_new_ops(mp)])
    contract = ev.run(None, {mp.graph.input[0].name: x.numpy()})[0]
    # float accumulation order may move a hidden unit across a rounding boundary (one LSB,
    # magnified by the tiny net's near-zero logits: measured up to 3.4% of the largest):
    # most images at float precision, none further off than such a flip; a wrong contract
    # puts every image off
    scale = np.abs(bodies).max()
    off = np.abs(contract - bodies).max(axis=1) > 1e-4 * scale
    assert off.sum() < len(off) / 2 and np.abs(contract - bodies).max() <= 0.05 * scale


def _ort_optimized_ops(path: Path, tmp: Path) -> set[str]:
    """Op types of the graph onnxruntime runs (after its rewrites) for the file at ``path``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / f"{path.stem}.ort.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_readme_qdq_claim(a8, tmp_path):
    """README: "`export onnx` writes the quantizers as arithmetic that onnxruntime computes
    as PyTorch does (`--qdq` for QuantizeLinear/DequantizeLinear pairs, which onnxruntime
    fuses into its int8 kernels, QLinearConv; the file itself still means what PyTorch
    computes, as `onnx.reference` shows ...)". Each part, on the tiny int8 model."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    claim = " ".join(readme[readme.index("`export onnx` writes the quantizers"):].split())
    assert claim.startswith("`export onnx` writes the quantizers as arithmetic that "
                            "onnxruntime computes as PyTorch does (`--qdq` for "
                            "QuantizeLinear/DequantizeLinear pairs, which onnxruntime fuses "
                            "into its int8 kernels, QLinearConv; the file itself still means "
                            "what PyTorch computes, as `onnx.reference` shows")
    plain, qdq = onnx.load(str(a8["onnx"])), onnx.load(str(a8["qdq"]))
    # the default: arithmetic, no Q/DQ for activations; onnxruntime keeps float kernels
    assert {"Round", "Clip"} <= {n.op_type for n in plain.graph.node}
    assert "QuantizeLinear" not in {n.op_type for n in plain.graph.node}
    _assert_int8_verified(a8["export"]["verify"])  # computes as PyTorch does
    assert not {"QLinearConv", "ConvInteger"} & _ort_optimized_ops(a8["onnx"], tmp_path)
    # --qdq: Q/DQ pairs in place of the arithmetic, which onnxruntime fuses into QLinearConv
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Round" not in ops
    assert "QLinearConv" in _ort_optimized_ops(a8["qdq"], tmp_path)
    # and the file means what PyTorch computes: onnx.reference runs it as written
    net, _, _ = load_compressed(a8["pt"])
    x = torch.randn(8, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(5))
    res = verify_onnx(a8["qdq"], net, x, reference_batch=4)
    assert res.reference is not None and res.reference.top1_mismatches == 0
    assert res.reference.max_abs_diff <= 1e-5 * res.reference.max_abs_logit
