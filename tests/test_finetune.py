"""Fine-tuning: resumable bit-identically, divergence handled, improves agreement."""

from __future__ import annotations

import copy

import pytest
import torch

from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.errors import CheckFailed
from hfbconvert.layers import find_pointwise
from hfbconvert.pipeline import CompressConfig, build_hybrid, compress
from hfbconvert.plan import uniform_plan

from .tiny import TINY_RES, tiny_v1


def _student(teacher):
    layers = find_pointwise(teacher, TINY_RES)
    curves = {ly.name: torch.rand(ly.c_out, 3) for ly in layers}
    energies = {ly.name: torch.ones(ly.c_out) for ly in layers}
    plans = uniform_plan(layers, curves, energies, (1, 2, 4), 0.5, 1.0)
    h = build_hybrid(teacher, plans, {ly.name: ly.kind for ly in layers})
    g = torch.Generator().manual_seed(0)
    for m in h.modules():
        if hasattr(m, "wb_latent") and m.wb_latent is not None:
            with torch.no_grad():
                m.wb_latent.uniform_(-1, 1, generator=g)
                m.wc_latent.copy_(torch.eye(m.n_tolerant, m.r))
                m.a.fill_(0.1)
    return h


def _images(n=40):
    return torch.randint(0, 256, (n, 3, TINY_RES, TINY_RES), generator=torch.Generator()
                         .manual_seed(1), dtype=torch.uint8)


def _norm(u8):
    return (u8.float() - 127.5) / 64


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    teacher = tiny_v1()
    cfg = FinetuneConfig(steps=16, batch_size=8, checkpoint_every=4, freeze_at=0.5, warmup=2)
    imgs = _images()
    ref = _student(teacher)
    s1, s2 = copy.deepcopy(ref), copy.deepcopy(ref)
    finetune(s1, teacher, imgs, None, _norm, cfg)
    ckpt = tmp_path / "ft.ckpt"

    def boom(step, loss, agree):
        if step == 9:  # after the checkpoint at 8, past the freeze at 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(s2, teacher, imgs, None, _norm, cfg, checkpoint=ckpt, on_step=boom)
    s3 = copy.deepcopy(ref)  # a fresh process: starts from the same initial student
    finetune(s3, teacher, imgs, None, _norm, cfg, checkpoint=ckpt, resume=True)
    sd1, sd3 = s1.state_dict(), s3.state_dict()
    assert sd1.keys() == sd3.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd3[k]), k


def test_non_finite_loss_stops_with_step(tmp_path):
    teacher = tiny_v1()
    student = _student(teacher)
    cfg = FinetuneConfig(steps=6, batch_size=4, checkpoint_every=2, lr=1e30, latent_lr=1e30,
                         warmup=1)
    with pytest.raises(CheckFailed, match="non-finite loss at step"):
        finetune(student, teacher, _images(), None, _norm, cfg, checkpoint=tmp_path / "c.ckpt")


def test_default_finetune_keeps_codes_and_lowers_the_loss():
    """The default schedule trains only continuous parameters: the ternary codes the fit
    chose (and so the ADD count the plan was made for) come out unchanged, while the
    distillation loss falls and every layer outside the banks learns too."""
    from hfbconvert.hybrid import HybridPointwise

    teacher = tiny_v1()
    student = _student(teacher)  # training form, as compress hands it over
    fitted = copy.deepcopy(student)
    for m in fitted.modules():
        if isinstance(m, HybridPointwise):
            m.freeze()
    codes = {n: (m.wb_codes.clone(), m.wc_codes.clone()) for n, m in fitted.named_modules()
             if isinstance(m, HybridPointwise)}
    dw_before = student.blocks[0].conv_dw.weight.detach().clone()
    log = finetune(student, teacher, _images(), None, _norm,
                   FinetuneConfig(steps=30, batch_size=8, lr=1e-3))
    for n, m in student.named_modules():
        if isinstance(m, HybridPointwise):
            assert torch.equal(m.wb_codes, codes[n][0]) and torch.equal(m.wc_codes, codes[n][1])
    assert not torch.equal(student.blocks[0].conv_dw.weight, dw_before)
    first, last = sum(log.loss[:5]) / 5, sum(log.loss[-5:]) / 5
    assert last < 0.9 * first


def test_compress_end_to_end_improves_over_stages():
    """fit -> sequential reconstruction -> fine-tune on a tiny random net: agreement with
    the original is recorded per stage and the final model is frozen (deploy form)."""
    teacher = tiny_v1()
    from hfbconvert.calib.readers import CalibData

    data = CalibData(_images(120), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(120)], source="random")
    from .tiny import tiny_info

    cfg = CompressConfig(budget=0.6, reconstruct=True, recon_images=64, stats_images=64,
                         finetune=FinetuneConfig(steps=20, batch_size=16))
    hybrid, meta = compress(teacher, tiny_info(), data, cfg)
    names = [s["stage"] for s in meta["stages"]]
    # the ADD cap may re-plan and refit after the reconstruction (logged as add_repair)
    repair = ["add_repair"] if "add_repair" in names else []
    assert names == ["fit", "sequential", *repair, "finetune_20", "weights_16bit"]
    assert bool(repair) == any(r.get("layers_replanned") for r in meta.get("add_repair", []))
    assert all(m.frozen for m in hybrid.modules() if hasattr(m, "frozen"))
    assert meta["cost"]["totals"]["muls"] <= 0.6 * meta["original_cost"]["totals"]["muls"] * 1.001
    ag = {s["stage"]: s["agreement"] for s in meta["stages"]}
    assert ag["sequential"] >= ag["fit"] - 0.05  # reconstruction: not a guarantee, a bound
    # the fine-tune ships its best held-apart state, the start included: it never loses in
    # the metric it is guarded on, and a reverted one ships exactly the model before it.
    # (This tiny random net is fitted almost exactly -- held KL ~1e-13 after the fit, at
    # budgets down to 0.25 -- so a strict gain cannot be asserted on it.)
    kl = meta["finetune_held_kl"]
    assert kl["best"] <= kl["before"] and kl["best"] == min(meta["finetune_log"]["held_kl"])
    if "finetune_reverted" in meta:
        before = names[names.index("finetune_20") - 1]
        assert kl["best_step"] == 0 and ag["finetune_20"] == ag[before]
    assert meta["final_agreement"] == ag["weights_16bit"]



def test_fit_keeps_original_weights_in_unexcited_directions():
    """Calibration inputs that span only a subspace say nothing about the other directions:
    the ridge must shrink toward the original weights there, not toward zero (zeroing them
    cost the all-critical MobileNetV1-0.5-160 'conversion' 0.21 of agreement)."""
    from hfbconvert.fitting import PairStats, fit_layer
    from hfbconvert.hybrid import HybridPointwise

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    basis = torch.randn(8, 3, generator=g, dtype=torch.float64)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) @ basis.T  # rank 3 of 8
    y = x @ w.T + b
    stats = PairStats(x.T @ x / 500, x.T @ y / 500, x.mean(0), y.mean(0), 500)
    layer = HybridPointwise(8, 6, torch.arange(6), 0, "linear")
    fit_layer(layer, stats, prior=w.float())
    assert torch.allclose(layer.w_crit.double(), w, atol=1e-4)
    assert torch.allclose(layer.bias.double(), b, atol=1e-4)


def test_harmful_finetune_is_reverted_to_the_fit():
    """A fine-tune that raises the held-apart KL (here: a learning rate far too high) is
    undone: the shipped model is bit-identical to the one without fine-tuning, and the
    metadata says why."""
    from hfbconvert.calib.readers import CalibData

    from .tiny import tiny_info

    teacher = tiny_v1()
    original = copy.deepcopy(teacher.state_dict())
    data = CalibData(_images(120), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(120)], source="random")
    fit_only, _ = compress(teacher, tiny_info(), data,
                           CompressConfig(budget=0.6, finetune=FinetuneConfig(steps=0)))
    # compress never touches the user's model (the fragility probe once left 1-ulp changes)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in original.items())
    bad = CompressConfig(budget=0.6, finetune=FinetuneConfig(steps=10, batch_size=16, lr=0.3))
    hybrid, meta = compress(teacher, tiny_info(), data, bad)
    kl = meta["finetune_held_kl"]
    assert kl["after"] > kl["before"] and "kept the fit" in meta["finetune_reverted"]
    a, b = fit_only.state_dict(), hybrid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_norm_only_finetune_trains_only_normalization_layers():
    """``trainable="norm"``: the BatchNorm scales and shifts move, every other parameter
    and every running statistic stays bit for bit, and each parameter's requires_grad
    comes back as it went in (a frozen one stays frozen)."""
    from torch import nn

    from hfbconvert.hybrid import HybridPointwise

    teacher = tiny_v1()
    student = _student(teacher)
    for m in student.modules():
        if isinstance(m, HybridPointwise):
            m.freeze()  # the deploy form: the state to compare has no latents
    student.blocks[0].conv_dw.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = copy.deepcopy(student.state_dict())
    norm = {f"{mn}.{pn}" for mn, m in student.named_modules()
            if isinstance(m, nn.BatchNorm2d) for pn, _ in m.named_parameters(recurse=False)}
    finetune(student, teacher, _images(), None, _norm,
             FinetuneConfig(steps=8, batch_size=8, lr=1e-2, warmup=1, trainable="norm"))
    after = student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= norm, moved - norm
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags


def test_bias_only_finetune_moves_only_biases_of_a_folded_int8_network():
    """``trainable="bias"`` on a BatchNorm-folded network (what int8 QAT fine-tunes):
    the folded biases move, every weight and quantizer range stays bit for bit."""
    from hfbconvert import actquant
    from hfbconvert.bnfold import fold_batchnorms

    teacher = tiny_v1()
    student = _student(teacher)
    for m in student.modules():
        if hasattr(m, "freeze"):
            m.freeze()
    fold_batchnorms(student)
    actquant.attach(student)
    actquant.calibrate(student, _norm(_images()[:8]))
    before = copy.deepcopy(student.state_dict())
    finetune(student, teacher, _images(), None, _norm,
             FinetuneConfig(steps=8, batch_size=8, lr=1e-2, warmup=1, trainable="bias"))
    after = student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    biases = {n for n, _ in student.named_parameters() if n.endswith(".bias")}
    assert moved and moved <= biases, moved - biases
    assert any(".input_quant." in k for k in before)  # the ranges were there and kept


def test_norm_only_needs_normalization_layers():
    """A model whose BatchNorm is folded has nothing for ``trainable="norm"`` to train:
    refused by the fine-tune, and by compress before any work."""
    from hfbconvert.bnfold import fold_batchnorms
    from hfbconvert.calib.readers import CalibData
    from hfbconvert.errors import ConfigError

    from .tiny import tiny_info

    teacher = tiny_v1()
    fold_batchnorms(teacher)
    cfg = FinetuneConfig(steps=2, batch_size=8, trainable="norm")
    with pytest.raises(ConfigError) as ei:
        finetune(_student(teacher), teacher, _images(), None, _norm, cfg)
    assert (ei.value.field, ei.value.value) == ("trainable", "norm")
    data = CalibData(_images(), None, (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(40)],
                     source="random")
    with pytest.raises(ConfigError, match="no normalization layer parameters"):
        compress(teacher, tiny_info(), data, CompressConfig(finetune=cfg))
    with pytest.raises(ConfigError) as ei:  # int8 QAT folds BatchNorm before its fine-tune
        compress(tiny_v1(), tiny_info(), data, CompressConfig(
            activation_bits=8, finetune=cfg))
    assert ei.value.field == "trainable" and ei.value.other == "qat=False"
