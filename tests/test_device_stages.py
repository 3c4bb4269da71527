"""``--device`` in compress (issue #18): the held-apart checks and gptq's input moments
run on the device, on copies; everything that decides the plan or the ternary codes (the
statistics behind Σ, the sensitivity and fragility probes, the greedy fits) stays on the
CPU, so the plan is the same with any ``--device``. On an H200, running those on the GPU
changed the plan (bench/results/gpu-check-planning-on-gpu.json); this file pins the split.

Without CUDA, a stand-in "device" that still copies checks which stages read the copies
and that the result is bit for bit the plain CPU run's. With CUDA (the GPU machine,
bench/gpu_check.py) the same runs compare the real device against the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hfbconvert import pipeline, stages
from hfbconvert.distill import FinetuneConfig
from hfbconvert.pipeline import CompressConfig, compress
from hfbconvert.sensitivity import loss_curves

from .test_stage_bugs import _data
from .tiny import tiny_info, tiny_v1

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs CUDA (run on a GPU machine: bench/gpu_check.py)")


def _cfg(device: str = "cpu", **kw) -> CompressConfig:
    return CompressConfig(budget=0.6, stats_images=32, act_calib_images=32,
                          finetune=FinetuneConfig(steps=2, batch_size=8, device=device), **kw)


def _plan(meta: dict) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(lp["name"], lp["r"], tuple(lp["critical_idx"])) for lp in meta["plan"]["layers"]]


@pytest.mark.parametrize("bits", [{}, {"weight_bits": 8, "activation_bits": 8,
                                       "weight_rounding": "gptq", "qat": False}],
                         ids=["float", "int8-gptq"])
def test_stages_read_device_copies_and_give_the_cpu_result(monkeypatch, bits) -> None:
    ref, ref_meta = compress(tiny_v1(), tiny_info(), _data(), _cfg(**bits))
    copies: list[nn.Module] = []  # kept alive: their ids stay unique
    read: dict[str, list[int]] = {"sensitivity": [], "fragility": [], "moments": [],
                                  "checks": []}

    def on_device(net: nn.Module, device) -> nn.Module:
        assert device is not None
        copies.append(copy.deepcopy(net))
        return copies[-1]

    def spy(key, fn, n_models=1):
        def wrapped(*a, **kw):
            read[key] += [id(m) for m in a[:n_models]]
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(pipeline, "on_device", on_device)
    monkeypatch.setattr(pipeline, "sensitivity_inputs",
                        spy("sensitivity", pipeline.sensitivity_inputs))
    monkeypatch.setattr(pipeline, "layer_fragility", spy("fragility", pipeline.layer_fragility))
    monkeypatch.setattr(pipeline, "agreement", spy("checks", pipeline.agreement, 2))
    monkeypatch.setattr(stages.weightquant, "input_moments",
                        spy("moments", stages.weightquant.input_moments))
    out, meta = compress(tiny_v1(), tiny_info(), _data(), _cfg(**bits))
    ids = {id(c) for c in copies}
    # planning reads the CPU original (no copy); every held-apart check reads copies
    assert read["sensitivity"] and read["fragility"] and read["checks"]
    assert not set(read["sensitivity"] + read["fragility"]) & ids
    assert set(read["checks"]) <= ids
    if bits:
        assert read["moments"] and set(read["moments"]) <= ids
    assert _plan(meta) == _plan(ref_meta)
    assert [s["agreement"] for s in meta["stages"]] == \
        [s["agreement"] for s in ref_meta["stages"]]
    assert all(p.device.type == "cpu" for p in out.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]), k


@CUDA
def test_compress_on_cuda_plans_as_on_cpu() -> None:
    ref, ref_meta = compress(tiny_v1(), tiny_info(), _data(), _cfg())
    out, meta = compress(tiny_v1(), tiny_info(), _data(), _cfg("cuda"))
    assert _plan(meta) == _plan(ref_meta)
    assert all(p.device.type == "cpu" for p in out.parameters())
    for k, v in ref.state_dict().items():
        w = out.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, w, rtol=1e-3, atol=1e-4), k
        else:
            assert torch.equal(v, w), k


@CUDA
def test_loss_curves_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    x = torch.randn(500, 24, generator=g) @ torch.randn(24, 24, generator=g)
    sig = (x.T @ x / 500).double()
    c0, d0 = loss_curves(w, sig, (1, 2, 4), with_density=True)
    c1, d1 = loss_curves(w.cuda(), sig.cuda(), (1, 2, 4), with_density=True)
    assert c1.device.type == "cuda"
    assert torch.allclose(c0, c1.cpu(), atol=1e-4)
    assert torch.allclose(d0, d1.cpu(), atol=0.05)


@CUDA
def test_analyze_on_cuda_matches_cpu() -> None:
    from hfbconvert.analysis import analyze

    model = tiny_v1()
    a = analyze(model, tiny_info(), _data(), budgets=(1, 2, 4), stats_images=32)
    b = analyze(model, tiny_info(), _data(), budgets=(1, 2, 4), stats_images=32,
                device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["name"] == lb["name"]
        assert la["median_loss"] == pytest.approx(lb["median_loss"], abs=1e-3)
