"""Error-feedback (GPTQ) int8 rounding: the vectorised Cholesky form against a plain
Optimal-Brain-Quantizer reference (explicit inverse Hessian, one column removed at a
time), its limits (a diagonal Hessian is round-to-nearest), the exact int8 grid it keeps,
and the rows each layer kind feeds it (``weight_inputs``) against the layer's own output."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hfbconvert.handlers import handler_for
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.quant.rounding import DAMP, gptq_codes, output_error
from hfbconvert.weightquant import (
    INT8_MAX,
    apply_weight_bits,
    input_moments,
    int8_codes,
    quantize_int8,
    quantize_int8_gptq,
    weight_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def obq_reference(w: np.ndarray, s: np.ndarray, h: np.ndarray, damp: float = DAMP,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, column by column: round, push the error onto the remaining columns
    through the inverse Hessian, then remove the column from the inverse (Schur
    complement). Returns (codes, the value each code rounded)."""
    h = h.astype(np.float64).copy()
    d = np.diag(h).copy()
    d[d <= 0] = 1.0
    h[np.diag_indices_from(h)] = d + damp * d.mean()
    codes, pre = np.zeros_like(w), np.zeros_like(w)
    for r in range(w.shape[0]):
        wr, hinv, idx = w[r].astype(np.float64).copy(), np.linalg.inv(h), list(range(w.shape[1]))
        while idx:
            j = idx[0]
            pre[r, j] = wr[j] / s[r]
            q = np.clip(np.round(pre[r, j]), -127, 127)
            codes[r, j] = q
            err = (wr[j] - q * s[r]) / hinv[0, 0]
            wr[idx] -= err * hinv[0]
            hinv = hinv[1:, 1:] - np.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]
            idx = idx[1:]
    return codes, pre


def _problem(seed: int, rows: int, k: int, dead: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k + 8, k, generator=g, dtype=torch.float64)
    x = x @ torch.randn(k, k, generator=g, dtype=torch.float64)  # correlated inputs
    if dead:
        x[:, :dead] = 0  # inputs that are always zero
    h = (x.T @ x / x.shape[0])[None]
    w = torch.randn(rows, k, generator=g, dtype=torch.float64)
    s = w.abs().amax(1) / 127
    return w, s, h


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 12), st.integers(0, 2),
       st.sampled_from([1, 3, 128]))
def test_gptq_matches_obq_reference(seed: int, rows: int, k: int, dead: int,
                                    block: int) -> None:
    """Any block size (lazy batch updates) is the same rounding as the reference."""
    w, s, h = _problem(seed, rows, k, min(dead, k - 1))
    got = gptq_codes(w, s, h, block=block).numpy()
    ref, pre = obq_reference(w.numpy(), s.numpy(), h[0].numpy())
    # the two forms agree up to float rounding: a code may differ only where the value
    # it rounded sat on a rounding boundary
    near_tie = np.abs(np.abs(pre - np.floor(pre)) - 0.5) < 1e-7
    differ = got != ref
    assert not (differ & ~near_tie).any()
    assert np.all(got == np.round(got)) and np.abs(got).max() <= 127


def test_diagonal_hessian_is_round_to_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    s = w.abs().amax(1) / 127
    h = torch.diag(torch.rand(9, generator=g, dtype=torch.float64) + 0.1)[None]
    assert torch.equal(gptq_codes(w, s, h), torch.clamp(torch.round(w / s[:, None]), -127, 127))


def test_error_feedback_lowers_output_error() -> None:
    w, s, h = _problem(3, 64, 32)
    near = torch.clamp(torch.round(w / s[:, None]), -127, 127) * s[:, None]
    fb = gptq_codes(w, s, h) * s[:, None]
    e_near, e_fb = output_error(w, near, h).sum(), output_error(w, fb, h).sum()
    assert e_fb < 0.6 * e_near  # correlated inputs: measured ratio about 0.3 - 0.45


def test_grouped_rows_use_their_own_hessian() -> None:
    (w0, s0, h0), (w1, s1, h1) = _problem(1, 3, 9), _problem(2, 3, 9)
    for block in (2, 128):  # the per-row lazy update too
        both = gptq_codes(torch.cat([w0, w1]), torch.cat([s0, s1]), torch.cat([h0, h1]),
                          torch.tensor([0, 0, 0, 1, 1, 1]), block=block)
        assert torch.equal(both, torch.cat([gptq_codes(w0, s0, h0), gptq_codes(w1, s1, h1)]))
    with pytest.raises(ValueError, match="group index"):
        gptq_codes(w0, s0, torch.cat([h0, h1]))


@pytest.mark.parametrize("shape", [(16, 8), (12, 1, 3, 3), (6, 4, 3, 3)])
def test_int8_gptq_keeps_the_exact_int8_grid(shape) -> None:
    """Same scales as nearest rounding, codes in range, and the export's re-derivation
    (largest code ±127) reproduces the weights exactly."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g)
    w[1] = 0  # an all-zero channel stays all-zero codes
    k = int(np.prod(shape[1:]))
    _, _, h = _problem(7, 1, k)
    codes, scale, stats = quantize_int8_gptq(w, h.float())
    assert torch.equal(scale, quantize_int8(w)[1])
    assert codes.dtype == torch.int8 and codes.shape == w.shape and not codes[1].any()
    q = codes.float() * scale.reshape(-1, *[1] * (w.dim() - 1))
    c2, s2 = int8_codes(q.numpy())
    assert np.array_equal(c2, codes.numpy()) and np.array_equal(s2, scale.numpy())
    assert stats["rounding"] == "gptq" and 0 <= stats["nearest_channels"] <= shape[0]
    assert 0 <= stats["output_err_vs_nearest"] <= 1.0 + 1e-9


# ------------------------------------------------------------------ rows per layer kind
def _rows_reproduce_output(m: nn.Module, x: torch.Tensor, w: torch.Tensor,
                           groups_out: int) -> None:
    """rows(g) @ W_g.T is the module's output (bias removed), channel by channel."""
    r = handler_for(m).weight_inputs(m, x)  # (G, N, K)
    with torch.no_grad():
        y = m(x)
    bias = getattr(m, "bias", None)
    if bias is not None:
        y = y - (bias[:, None, None] if y.dim() == 4 else bias)
    y = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() == 4 else y.reshape(-1, y.shape[-1])
    wm = w.reshape(w.shape[0], -1)
    per = wm.shape[0] // groups_out
    assert r.shape[0] == groups_out and r.shape[2] == wm.shape[1]
    for gi in range(groups_out):
        got = r[gi] @ wm[gi * per:(gi + 1) * per].T
        torch.testing.assert_close(got, y[:, gi * per:(gi + 1) * per], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 1), padding=(1, 0)),  # non-square
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=4),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=5, out_channels=7, kernel_size=1, stride=2),
])
def test_conv_weight_inputs_reproduce_the_output(conv: dict) -> None:
    torch.manual_seed(0)
    m = nn.Conv2d(**conv).eval()
    _rows_reproduce_output(m, torch.randn(2, m.in_channels, 9, 9), m.weight.detach(),
                           m.groups)


def test_linear_and_hybrid_weight_inputs() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    _rows_reproduce_output(lin, torch.randn(5, 6), lin.weight.detach(), 1)
    h = HybridPointwise(8, 6, torch.tensor([0, 2, 5]), 4, "conv", stride=2).eval()
    with torch.no_grad():
        for p in (h.w_crit, h.bias, h.a):
            p.normal_()
        h.set_factors(torch.randint(-1, 2, (4, 8)), torch.rand(4) + 0.5,
                      torch.randint(-1, 2, (3, 4)))
    _rows_reproduce_output(h, torch.randn(2, 8, 7, 7), h.effective_weight().detach(), 1)


def test_input_moments_and_model_rounding() -> None:
    """E[x xᵀ] per weight (here every position is kept), and a model rounded with them:
    lower output error than nearest on every layer, exact int8 values throughout."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 25, 4)).eval()
    xs = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    mom = input_moments(net, xs, rows_per_image=10_000)
    assert set(mom) == {n for n, _, _ in weight_params(net)}
    x = torch.cat(xs)
    r = handler_for(net[2]).weight_inputs(net[2], net[1](net[0](x))).double()
    torch.testing.assert_close(mom["2.weight"], r.transpose(1, 2) @ r / r.shape[1])
    assert mom["2.weight"].shape == (8, 9, 9) and mom["6.weight"].shape == (1, 150, 150)
    fb, near = copy.deepcopy(net), copy.deepcopy(net)
    stats = apply_weight_bits(fb, 8, moments=mom)
    apply_weight_bits(near, 8)
    for name, mod, attr in weight_params(fb):
        assert stats[name]["rounding"] == "gptq"
        assert stats[name]["output_err_vs_nearest"] <= 1.0 + 1e-9
        codes, _ = int8_codes(getattr(mod, attr).detach().numpy())
        assert np.abs(codes).max() == INT8_MAX
    with torch.no_grad():
        y, yf, yn = net(x), fb(x), near(x)
    assert (yf - y).pow(2).mean() < (yn - y).pow(2).mean()
