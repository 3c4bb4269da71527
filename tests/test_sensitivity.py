"""The per-filter fitter against brute force, the poster's examples, and its invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfbconvert.sensitivity import fit_terms, loss_curves, parse_budgets


def _brute_r1(w: torch.Tensor, sigma: torch.Tensor) -> float:
    """min over all ternary t and real α of ‖w − αt‖²_Σ / ‖w‖²_Σ (exhaustive)."""
    w = w.double()
    sigma = sigma.double()
    best = 1.0
    wsw = float(w @ sigma @ w)
    for t in itertools.product((-1.0, 0.0, 1.0), repeat=w.numel()):
        t = torch.tensor(t, dtype=torch.float64)
        den = float(t @ sigma @ t)
        if den <= 0:
            continue
        num = float(t @ sigma @ w)
        best = min(best, (wsw - num * num / den) / wsw)
    return best


def test_vertical_line_detector_exact_at_two_hidden_units():
    """The poster's vertical-line filter [-1 2 -1] x3 is exact with 2 hidden units."""
    w = torch.tensor([[-1.0, 2.0, -1.0] * 3])
    losses = fit_terms(w, None, 2).losses[0]
    assert losses[0] > 0.05
    assert losses[1] < 1e-10


@pytest.mark.parametrize("seed", range(8))
def test_single_term_matches_brute_force_in_weight_space(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 6, generator=g)
    ours = float(fit_terms(w, None, 1).losses[0, 0])
    assert ours == pytest.approx(_brute_r1(w[0], torch.eye(6)), abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_single_term_near_brute_force_activation_aware(seed):
    """With a correlated Σ the greedy direction is never better than the optimum (sanity)
    and stays close to it."""
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(1, 5, generator=g)
    a = torch.randn(5, 5, generator=g)
    sigma = a @ a.T + 0.1 * torch.eye(5)
    ours = float(fit_terms(w, sigma, 1).losses[0, 0])
    brute = _brute_r1(w[0], sigma)
    assert ours >= brute - 1e-6
    assert ours <= brute + 0.3


def test_exactly_representable_two_term_filters_found():
    """w = α1·t1 + α2·t2 with disjoint supports and |α1| ≥ 3|α2| is exact at r = 2."""
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (64, 12), generator=g).float() * 2 - 1
    support = torch.rand(64, 12, generator=g) < 0.5
    a1 = 1 + torch.rand(64, 1, generator=g)
    a2 = a1 / (3 + 2 * torch.rand(64, 1, generator=g))
    w = torch.where(support, a1 * sign, a2 * sign)
    losses = fit_terms(w, None, 2).losses
    assert float(losses[:, 1].max()) < 1e-5  # exact up to float32 rounding


def test_refinement_never_hurts():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 24, generator=g)
    plain = fit_terms(w, None, 3).losses
    refined = fit_terms(w, None, 3, refine_upto=3).losses
    assert (refined[:, :2] <= plain[:, :2] + 1e-9).all()  # same start, only improvements
    assert float(refined[:, 1].mean()) < float(plain[:, 1].mean())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(2, 24), seed=st.integers(0, 10_000),
       aware=st.booleans())
def test_loss_curve_is_monotone_and_bounded(n, c, seed, aware):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, c, generator=g)
    sigma = None
    if aware:
        a = torch.randn(c, c, generator=g)
        sigma = a @ a.T / c + 0.01 * torch.eye(c)
    curves = loss_curves(w, sigma, (1, 2, 3, 4, 8))
    assert curves.shape == (n, 5)
    assert (curves >= 0).all() and (curves <= 1 + 1e-6).all()
    assert (curves[:, 1:] <= curves[:, :-1] + 1e-6).all()


def test_reconstruction_from_terms_matches_reported_loss():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 16, generator=g)
    a = torch.randn(16, 16, generator=g)
    sigma = a @ a.T / 16
    fit = fit_terms(w, sigma, 3)
    w_hat = (fit.alphas[:, :, None] * fit.terms.double()).sum(1)
    d = w.double() - w_hat
    s = sigma.double() / torch.diagonal(sigma.double()).mean()
    rel = ((d @ s) * d).sum(1) / ((w.double() @ s) * w.double()).sum(1)
    assert torch.allclose(rel, fit.losses[:, 2], atol=1e-5)
    assert set(fit.terms.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_deterministic():
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss_curves(w, None), loss_curves(w, None))


@pytest.mark.parametrize("bad", ["", "a,b", "0,1", "-2", "1,,x", "1000"])
def test_parse_budgets_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parse_budgets(bad)


def test_parse_budgets_sorts_and_dedups():
    assert parse_budgets("8, 1,2,2") == (1, 2, 8)


def test_loss_curves_density_matches_terms():
    """The planner's ADD prediction uses the measured non-zero fraction of the terms."""
    torch.manual_seed(0)
    w = torch.zeros(16, 64)
    w[:, :8] = torch.randn(16, 8)  # only 8 of 64 inputs used: terms must be sparse
    curves, dens = loss_curves(w, None, (1, 2, 4), with_density=True)
    assert curves.shape == dens.shape == (16, 3)
    assert float(dens.max()) <= 8 / 64 + 1e-6 and float(dens.min()) > 0
    wd = torch.randn(16, 64)
    _, dd = loss_curves(wd, None, (1, 2, 4), with_density=True)
    assert float(dd.mean()) > 3 * float(dens.mean())
