"""Bugs of the compress stages found by reading (issue #16), each pinned by a test:

* without bias correction the hybrid keeps the original (BN-folded) bias;
* the one-shot fit's bias correction uses the real input mean, so it moves the bias by
  (W_orig - W_hybrid) @ E[x];
* compress and finetune never change the caller's model (weights, device, training flags,
  attributes, hooks); ``--device cuda`` without CUDA is refused before any work.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hfbconvert import pipeline as compress_mod
from hfbconvert.bnfold import fold_batchnorms
from hfbconvert.calib.readers import CalibData
from hfbconvert.distill import FinetuneConfig, finetune
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import find_pointwise, layer_bias, layer_weight
from hfbconvert.pipeline import CompressConfig, compress
from hfbconvert.stages import stage_seed
from hfbconvert.stats import collect_input_stats

from .test_cli import FASTEST, one_error, run
from .tiny import tiny_info, tiny_v1, write_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FIT_ONLY = {"weight_bits": 32, "budget": 0.5, "ratios": (1.0, 2.0), "budgets": (1, 2),
            "fragility": False, "stats_images": 48, "finetune": FinetuneConfig(steps=0)}


def _folded() -> nn.Module:
    """tiny_v1 with its BatchNorms folded: every pointwise conv carries a non-zero bias."""
    m = tiny_v1()
    fold_batchnorms(m)
    with torch.no_grad():  # the classifier too (initialized at zero)
        m.classifier.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return m.eval()


def _data(n: int = 60, seed: int = 1) -> CalibData:
    imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)
    return CalibData(imgs, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [f"{i}" for i in range(n)], source="random")


def _hybrids(net: nn.Module) -> dict[str, HybridPointwise]:
    return {n: m for n, m in net.named_modules() if isinstance(m, HybridPointwise)}


# ---------------------------------------------------------------- 1. no bias correction
@pytest.mark.parametrize("with_data", [False, True], ids=["weights", "calib"])
def test_no_bias_correction_keeps_original_bias(with_data: bool) -> None:
    model = _folded()
    hybrid, _ = compress(model, tiny_info(), _data() if with_data else None,
                         CompressConfig(**FIT_ONLY, bias_correction=False))
    hs = _hybrids(hybrid)
    assert hs
    for name, h in hs.items():
        b = layer_bias(model, name)
        assert b.abs().sum() > 0, name  # the test means something
        assert torch.equal(h.bias.detach(), b), name


def test_no_bias_correction_keeps_original_bias_through_reconstruction() -> None:
    model = _folded()
    cfg = CompressConfig(**{**FIT_ONLY, "reconstruct": True, "recon_images": 48,
                            "per_image": 64}, bias_correction=False)
    hybrid, meta = compress(model, tiny_info(), _data(), cfg)
    assert "reconstruction" in meta
    for name, h in _hybrids(hybrid).items():
        assert torch.equal(h.bias.detach(), layer_bias(model, name)), name


# ---------------------------------------------------------------- 2. mean-shift correction
def test_bias_correction_uses_the_input_mean() -> None:
    """The one-shot fit matches each layer's output mean on the calibration inputs: the
    bias moves by (W_orig - W_hybrid) @ E[x], E[x] the mean of the layer's real input
    (on ReLU6 activations far from zero)."""
    model = _folded()
    data = _data()
    cfg = CompressConfig(**FIT_ONLY)
    hybrid, _ = compress(model, tiny_info(), data, cfg)
    # the statistics compress gathers: same split, same sample, same pixel positions
    train, _ = data.split(cfg.held_fraction, seed=cfg.seed,
                          count=compress_mod.held_count(len(data), cfg))
    names = [ly.name for ly in find_pointwise(model, tiny_info().resolution)]
    seed = stage_seed(cfg.seed, "sensitivity")
    st = collect_input_stats(model, names, compress_mod._batches(train, cfg.stats_images,
                                                                 seed=seed), seed=seed)
    hs = _hybrids(hybrid)
    nontrivial = 0
    for name, h in hs.items():
        w = layer_weight(model, name).double()
        wh = h.effective_weight().detach().double()
        mean = st[name].mean.double()
        assert mean.norm() > 0.1, name
        expected = (w - wh) @ mean
        nontrivial += h.n_tolerant > 0 and bool(expected.norm() > 1e-3)
        shift = h.bias.detach().double() - layer_bias(model, name).double()
        assert torch.allclose(shift, expected, rtol=1e-4, atol=1e-5), (
            name, float((shift - expected).norm()), float(expected.norm()))
    assert nontrivial >= 3  # banks whose rounding error the correction must absorb


def test_make_psd_survives_eigh_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The centered covariance of a (nearly) constant input is rounding noise, ~1e-17 and
    indefinite; LAPACK's eigh failed to converge on one (one thread) and took compress
    down. make_psd then shifts the spectrum instead."""
    from hfbconvert import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64) * 1e-17
    noise = 0.5 * (a + a.T)  # indefinite, no Cholesky factor with the usual jitter

    def fails(_m):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    out = linalg.make_psd(noise)
    assert int(torch.linalg.cholesky_ex(out)[1]) == 0
    assert torch.allclose(out - torch.diagonal(out - noise).mean() * torch.eye(64), noise)


# ---------------------------------------------------------------- 3. the caller's model
def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "devices": {k: v.device for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": {n: type(m) for n, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["attrs"] == before["attrs"]
    assert after["hooks"] == before["hooks"]
    assert after["devices"] == before["devices"]
    assert after["training"] == before["training"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        a = after["state"][k]
        assert a.dtype == v.dtype and torch.equal(a, v), k


@pytest.mark.parametrize("bits", [{}, {"weight_bits": 8, "activation_bits": 8},
                                  {"weight_bits": 8, "activation_bits": 8, "qat": False}],
                         ids=["default", "int8", "int8-no-qat"])
def test_compress_leaves_the_callers_model_alone(bits: dict) -> None:
    """The user's model goes in in training mode with one frozen parameter and comes out
    exactly as it went in: weights, device, per-module training flags, attributes (no
    hfb_weight_bits / hfb_activation_bits), hooks, requires_grad."""
    model = tiny_v1().train()
    model.blocks[0].conv_dw.eval()  # a mixed state, as a user may leave it
    model.classifier.weight.requires_grad_(False)
    before = _snapshot(model)
    cfg = CompressConfig(budget=0.6, stats_images=32, act_calib_images=32,
                         finetune=FinetuneConfig(steps=2, batch_size=8, device="cpu"), **bits)
    seen: list[tuple[str, int]] = []
    hybrid, _ = compress(model, tiny_info(), _data(), cfg, after_stage=lambda name, st: (
        seen.append((name, id(st.hybrid)))))
    assert hybrid is not None and hybrid is not model
    _assert_unchanged(model, before)
    # the after_stage hook (bench/int8_stages.py) sees every building stage once, in
    # order, each time on the network compress goes on to return
    from hfbconvert import stages as S

    want = [s.name for s in S.stages_for(cfg, True, 2)]
    qat = bits.get("activation_bits") == 8 and bits.get("qat", True)
    assert [n for n, _ in seen] == want and ("int8_finetune" in want) == qat
    # exactly one fine-tune: with the quantizers (QAT) or in float before the int8 stages
    assert ("finetune" in want) != qat
    if "finetune" in want and bits:
        assert want.index("finetune") < want.index("weight_quant") < \
            want.index("activation_calibration")
    assert {i for _, i in seen[want.index("freeze"):]} == {id(hybrid)}


def test_finetune_does_not_move_or_switch_the_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune runs the teacher in eval mode on its device without calling ``.to`` on the
    caller's model (a copy goes to another device), and gives it back as it came; the
    student comes back on the device it was given."""
    teacher = tiny_v1().train()
    student = copy.deepcopy(teacher).eval()
    before = _snapshot(teacher)
    moved: list = []
    real_to = nn.Module.to

    def spy(self, *a, **kw):
        if self is teacher:
            moved.append((a, kw))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(nn.Module, "to", spy)
    imgs = _data(16).images
    finetune(student, teacher, imgs, None, compress_mod.normalizer(_data(16)),
             FinetuneConfig(steps=2, batch_size=4, device="cpu"))
    assert moved == []
    _assert_unchanged(teacher, before)
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_finetune_device_copy_of_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the teacher is not on the fine-tune's device, a copy of it goes there (here the
    device check is made to say so; the run itself stays on the CPU)."""
    from hfbconvert import distill as finetune_mod

    teacher = tiny_v1().eval()
    student = copy.deepcopy(teacher)
    before = _snapshot(teacher)
    seen: list[nn.Module] = []
    real = finetune_mod._on_device

    def elsewhere(module: nn.Module, dev: torch.device) -> bool:
        seen.append(module)
        return False if module is teacher else real(module, dev)

    monkeypatch.setattr(finetune_mod, "_on_device", elsewhere)
    used: list[nn.Module] = []
    real_loop = finetune_mod._loop

    def loop(student_, teacher_, *a, **kw):
        used.append(teacher_)
        return real_loop(student_, teacher_, *a, **kw)

    monkeypatch.setattr(finetune_mod, "_loop", loop)
    finetune(student, teacher, _data(16).images, None, compress_mod.normalizer(_data(16)),
             FinetuneConfig(steps=2, batch_size=4, device="cpu"))
    assert teacher in seen
    assert used and used[0] is not teacher  # the copy ran
    _assert_unchanged(teacher, before)


def test_evaluation_puts_batches_on_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """agreement/held_kl feed each network its batches on that network's device."""
    teacher = tiny_v1().eval()
    student = copy.deepcopy(teacher)
    asked: list[nn.Module] = []
    real = compress_mod._device_of

    def dev(module: nn.Module) -> torch.device:
        asked.append(module)
        return real(module)

    monkeypatch.setattr(compress_mod, "_device_of", dev)
    x = [_data(8).normalized()]
    assert compress_mod.agreement(student, teacher, x) == 1.0
    assert compress_mod.held_kl(student, teacher, x) == pytest.approx(0.0, abs=1e-9)
    assert student in asked and teacher in asked


def test_cli_device_cuda_without_cuda_exits_2_before_work(tmp_path, monkeypatch) -> None:
    from hfbconvert import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_work(*_a, **_kw):
        raise AssertionError("model loaded before --device was checked")

    monkeypatch.setattr(cli, "_load", no_work)
    ckpt = write_reference_checkpoint(tmp_path / "m.pt")
    res = run("compress", ckpt, "-o", tmp_path / "out.hfb.pt", *FASTEST, "--device", "cuda")
    one_error(res, "--device cuda", "CUDA")
    assert not (tmp_path / "out.hfb.pt").exists()
