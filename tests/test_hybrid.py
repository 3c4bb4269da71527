"""The hybrid layer: channel order, training == deploy form, effective weight, init quality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfbconvert.fitting import PairStats, fit_layer, init_bank
from hfbconvert.hybrid import HybridPointwise


def _random_codes(r, c, g):
    return torch.randint(-1, 2, (r, c), generator=g).float()


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("crit", [[], [0, 5, 2], list(range(7))])
def test_forward_equals_effective_weight_and_channel_order(kind, crit):
    g = torch.Generator().manual_seed(0)
    c_in, c_out = 6, 7
    n_t = c_out - len(crit)
    r = max(n_t, 1) + 2 if n_t else 0
    h = HybridPointwise(c_in, c_out, torch.tensor(crit, dtype=torch.long), r, kind)
    with torch.no_grad():
        h.w_crit.normal_(generator=g)
        h.bias.normal_(generator=g)
    if n_t:
        h.set_factors(_random_codes(r, c_in, g), torch.randn(r, generator=g),
                      _random_codes(n_t, r, g))
    x = torch.randn(3, c_in, 4, 5, generator=g) if kind == "conv" else torch.randn(3, c_in,
                                                                                   generator=g)
    w = h.effective_weight()
    ref = (torch.nn.functional.conv2d(x, w[:, :, None, None], h.bias) if kind == "conv"
           else torch.nn.functional.linear(x, w, h.bias))
    torch.testing.assert_close(h(x), ref, rtol=1e-5, atol=1e-5)
    # critical rows appear at their original channel positions
    for j, idx in enumerate(h.critical_idx.tolist()):
        torch.testing.assert_close(w[idx], h.w_crit[j])


def test_freeze_keeps_output_bit_identical():
    g = torch.Generator().manual_seed(1)
    h = HybridPointwise(16, 12, torch.tensor([1, 4, 9]), r=14)
    with torch.no_grad():
        h.wb_latent.uniform_(-1.2, 1.2, generator=g)
        h.wc_latent.uniform_(-1.2, 1.2, generator=g)
        h.a.normal_(generator=g)
        h.w_crit.normal_(generator=g)
    x = torch.randn(2, 16, 3, 3, generator=g)
    before = h(x)
    h.freeze()
    assert h.frozen and h.wb_latent is None
    assert h.wb_codes.dtype == torch.int8 and set(h.wb_codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(h(x), before)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_inplace_eval_under_no_grad_equals_recorded_forward(kind):
    """Under no_grad the hidden units are scaled in place (memory); the result must be
    bit-identical to the recorded forward, leave the input alone, and a recorded
    forward must still give gradients to ``a``."""
    g = torch.Generator().manual_seed(3)
    h = HybridPointwise(8, 6, torch.tensor([2]), r=9, kind=kind, channel_scale=True)
    with torch.no_grad():
        h.w_crit.normal_(generator=g)
        h.bias.normal_(generator=g)
    h.set_factors(_random_codes(9, 8, g), torch.randn(9, generator=g), _random_codes(5, 9, g))
    h.freeze()
    with torch.no_grad():
        h.channel_scale.uniform_(0.5, 1.5, generator=g)
    h.eval()
    x = torch.randn(2, 8, 3, 3, generator=g) if kind == "conv" else torch.randn(2, 8, generator=g)
    x0 = x.clone()
    with torch.no_grad():
        fast = h(x)
    assert torch.equal(x, x0)
    h.a.requires_grad_(True)
    slow = h(x)
    assert torch.equal(fast, slow.detach())
    slow.sum().backward()
    assert h.a.grad is not None and h.a.grad.abs().sum() > 0


def test_ste_passes_gradients_to_latents():
    h = HybridPointwise(4, 3, torch.tensor([], dtype=torch.long), r=3)
    with torch.no_grad():
        h.wb_latent.fill_(0.9)
        h.wc_latent.copy_(torch.eye(3))
    h(torch.randn(2, 4, 2, 2)).pow(2).sum().backward()
    assert h.wb_latent.grad is not None and h.wb_latent.grad.abs().sum() > 0
    assert h.wc_latent.grad is not None


def test_requires_hidden_units_for_tolerant_filters():
    with pytest.raises(ValueError):
        HybridPointwise(4, 3, torch.tensor([0]), r=0)


def test_fitted_bank_beats_random_bank_by_far():
    """Initialization from pretrained weights: the fitted layer reproduces the original
    layer's outputs far better than a bank with random codes and scales."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(32, 48, 1, bias=True)
    x = torch.relu(torch.randn(64, 32, 6, 6, generator=g))
    rows = x.permute(0, 2, 3, 1).reshape(-1, 32).double()
    y = (rows @ conv.weight.detach().reshape(48, 32).double().T) + conv.bias.detach().double()
    n = rows.shape[0]
    stats = PairStats(rows.T @ rows / n, rows.T @ y / n, rows.mean(0), y.mean(0), n)
    fitted = HybridPointwise(32, 48, torch.arange(12), r=36)
    fit_layer(fitted, stats)
    rand = HybridPointwise(32, 48, torch.arange(12), r=36)
    with torch.no_grad():
        rand.w_crit.copy_(conv.weight.detach().reshape(48, 32)[:12])
        rand.bias.copy_(conv.bias.detach())
    rand.set_factors(_random_codes(36, 32, g), torch.randn(36, generator=g) * 0.1,
                     _random_codes(36, 36, g))
    ref = conv(x)

    def err(m):
        return float((m(x) - ref).detach().pow(2).sum() / ref.detach().pow(2).sum())

    assert err(fitted) < 0.1
    assert err(fitted) < err(rand) / 20


def test_init_bank_uses_exactly_r_hidden_units():
    w = torch.randn(10, 20, generator=torch.Generator().manual_seed(0))
    tb, a, tc = init_bank(w, None, 17)
    assert tb.shape == (17, 20) and a.shape == (17,) and tc.shape == (10, 17)
    assert (tc.abs().sum(0) == 1).all()  # each hidden unit serves one filter
    assert sorted(tc.sum(1).tolist()) == [1] * 3 + [2] * 7
    with pytest.raises(ValueError):
        init_bank(w, None, 9)


def test_training_form_matches_deploy_form_numerically():
    """Train mode runs one dense conv (fast fine-tuning); eval runs the factorized deploy
    form. Both must compute the same function."""
    torch.manual_seed(0)
    layer = HybridPointwise(24, 40, torch.arange(0, 40, 3), 60, "conv")
    with torch.no_grad():
        layer.wb_latent.uniform_(-1.2, 1.2)
        layer.wc_latent.uniform_(-1.2, 1.2)
        layer.a.uniform_(0.1, 1.0)
        layer.w_crit.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 24, 5, 5)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)
    y_train.sum().backward()
    assert layer.wb_latent.grad is not None and layer.wb_latent.grad.abs().sum() > 0
