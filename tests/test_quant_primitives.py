"""The quantization primitives against the two references they must agree with
(PyTorch's fake_quantize ops and onnxruntime's QuantizeLinear/DequantizeLinear), plus the
algebraic properties every affine quantizer has (torchao's primitives are tested alike)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper

from hfbconvert.quant import primitives as P

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _ort_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized) from a one-node QuantizeLinear + DequantizeLinear model."""
    zp_type = TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.INT8
    kw = {} if axis is None else {"axis": axis}
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("q", zp_type, x.shape),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [onnx.numpy_helper.from_array(scale.astype(np.float32), "s"),
         onnx.numpy_helper.from_array(zp, "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = sess.run(None, {"x": x})
    return q, y


def _tensor(seed: int, *shape: int, spread: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread


# ----------------------------------------------------------------- against onnxruntime
def test_per_tensor_uint8_matches_onnxruntime_bit_for_bit():
    x = _tensor(0, 4, 5, 6, 7)
    scale, zp = P.choose_qparams(x.min(), x.max(), *P.UINT8, clip_ratio=0.7)
    codes = P.quantize(x, scale, zp, *P.UINT8)
    y = P.dequantize(codes, scale, zp)
    q_ort, y_ort = _ort_qdq(x.numpy(), scale.numpy(), zp.numpy().astype(np.uint8), None)
    assert np.array_equal(codes.numpy().astype(np.uint8), q_ort)
    assert np.array_equal(y.numpy(), y_ort)
    assert (codes == 0).any() and (codes == 255).any()  # clipping exercised on both sides


def test_per_axis_int8_symmetric_matches_onnxruntime_bit_for_bit():
    w = _tensor(1, 6, 4, 3, 3) * torch.logspace(-3, 1, 6)[:, None, None, None]
    rows = w.reshape(6, -1)
    scale, zp = P.choose_qparams(rows.amin(1), rows.amax(1), *P.INT8_SYMMETRIC,
                                 symmetric=True)
    assert torch.equal(zp, torch.zeros(6, dtype=torch.int32))
    codes = P.quantize(w, scale, zp, *P.INT8_SYMMETRIC, axis=0)
    y = P.dequantize(codes, scale, zp, axis=0)
    q_ort, y_ort = _ort_qdq(w.numpy(), scale.numpy(), zp.numpy().astype(np.int8), 0)
    assert np.array_equal(codes.numpy().astype(np.int8), q_ort)
    assert np.array_equal(y.numpy(), y_ort)
    # symmetric: every channel's largest magnitude lands on ±127
    assert torch.equal(codes.abs().reshape(6, -1).amax(1), torch.full((6,), 127.0))


# ----------------------------------------------------------------- against PyTorch
@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (3, 17), elements=FLOATS), st.integers(-6, 6),
       st.integers(0, 255))
def test_per_tensor_matches_torch_fake_quantize(x, log2_scale, zp):
    """Power-of-two scales make x·(1/s) (PyTorch) and x/s (ONNX, ours) the same number,
    so the results must be identical."""
    x = torch.from_numpy(x)
    scale = torch.tensor(2.0 ** log2_scale)
    ours = P.fake_quantize(x, scale, torch.tensor(zp, dtype=torch.int32), *P.UINT8)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), zp, *P.UINT8)
    assert torch.equal(ours, ref)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (4, 3, 5), elements=FLOATS),
       st.lists(st.integers(-8, 4), min_size=3, max_size=3), st.integers(0, 2))
def test_per_channel_matches_torch_fake_quantize(x, log2_scales, axis):
    x = torch.from_numpy(x)
    n = x.shape[axis]
    scale = torch.tensor([2.0 ** e for e in (log2_scales * 2)[:n]])
    zp = torch.zeros(n, dtype=torch.int32)
    ours = P.fake_quantize(x, scale, zp, *P.INT8_SYMMETRIC, axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, *P.INT8_SYMMETRIC)
    assert torch.equal(ours, ref)


def test_general_scales_differ_from_torch_only_at_rounding_ties():
    """With arbitrary scales PyTorch multiplies by 1/s; that may move a value sitting on a
    rounding tie by one step, never more, and only rarely."""
    x = _tensor(2, 10_000)
    scale, zp = P.choose_qparams(x.min(), x.max(), *P.UINT8)
    ours = P.fake_quantize(x, scale, zp, *P.UINT8)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), *P.UINT8)
    diff = (ours - ref).abs()
    assert float(diff.max()) <= float(scale) * 1.0001
    assert int((diff > 0).sum()) <= 10


# ----------------------------------------------------------------- properties
@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, (64,), elements=FLOATS), st.booleans(),
       st.sampled_from([1.0, 0.9, 0.5]))
def test_round_trip_within_half_a_step_and_idempotent(x, symmetric, ratio):
    x = torch.from_numpy(x)
    qmin, qmax = P.INT8_SYMMETRIC if symmetric else P.UINT8
    scale, zp = P.choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric,
                                 clip_ratio=ratio)
    y = P.fake_quantize(x, scale, zp, qmin, qmax)
    lo = float(P.dequantize(torch.tensor(float(qmin)), scale, zp))
    hi = float(P.dequantize(torch.tensor(float(qmax)), scale, zp))
    half = float(scale) / 2  # the zero point's rounding may leave the range by that much
    inside = (x >= lo - half) & (x <= hi + half)
    err = (y - x).abs()[inside]
    # half a step, plus float rounding of x/s and (q − z)·s
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()[inside]).all())
    assert bool((y >= lo).all() and (y <= hi).all())  # outside: clamped to the range
    assert torch.equal(P.fake_quantize(y, scale, zp, qmin, qmax), y)  # idempotent
    if ratio == 1.0:  # no clipping: every value within half a step
        assert bool(inside.all())


@settings(max_examples=100, deadline=None)
@given(st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32), st.booleans(),
       st.sampled_from([1.0, 0.8, 0.3]))
def test_zero_is_exactly_representable(a, b, symmetric, ratio):
    qmin, qmax = P.INT8_SYMMETRIC if symmetric else P.UINT8
    lo, hi = min(a, b), max(a, b)
    scale, zp = P.choose_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax,
                                 symmetric=symmetric, clip_ratio=ratio)
    assert qmin <= int(zp) <= qmax and float(scale) > 0
    z = torch.zeros(3)
    assert torch.equal(P.fake_quantize(z, scale, zp, qmin, qmax), z)


def test_choose_qparams_is_vectorized_over_clip_ratios():
    r = torch.tensor([1.0, 0.5, 0.25])
    s, z = P.choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), *P.UINT8, clip_ratio=r)
    assert s.shape == z.shape == (3,)
    for k in range(3):
        s1, z1 = P.choose_qparams(-1.0 * float(r[k]), 3.0 * float(r[k]), *P.UINT8)
        assert float(s[k]) == float(s1) and int(z[k]) == int(z1)


def test_straight_through_gradient_is_identity():
    x = _tensor(3, 50, spread=5.0).requires_grad_()
    scale, zp = P.choose_qparams(-1.0, 1.0, *P.UINT8)
    y = P.fake_quantize(x, scale, zp, *P.UINT8)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # also where clamped (|x| > 1)
    no_ste = P.fake_quantize(x.detach(), scale, zp, *P.UINT8)
    assert torch.allclose(y.detach(), no_ste, atol=1e-6, rtol=0)


def test_without_eps_a_zero_range_gives_a_zero_scale():
    """Weights rely on this to send all-zero channels to code 0 (see weightquant)."""
    s, _ = P.choose_qparams(torch.zeros(2), torch.zeros(2), *P.INT8_SYMMETRIC,
                            symmetric=True, eps=None)
    assert torch.equal(s, torch.zeros(2))
    s, _ = P.choose_qparams(torch.zeros(2), torch.zeros(2), *P.UINT8)
    assert float(s[0]) == pytest.approx(1e-8)  # activations: floored, still usable
