"""ONNX export of hybrid models: agreement with PyTorch, file format, safe writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hfbconvert import models
from hfbconvert.errors import CheckFailed, InputError
from hfbconvert.export import SUPPORTED_OPSETS, build_onnx, export_onnx
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import set_submodule
from hfbconvert.verify import compare_logits, ort_session, verify_onnx

RES = 16


def rand_hybrid(c_in: int, c_out: int, n_c: int, r: int, kind: str = "conv",
                scale: bool = False, seed: int = 0) -> HybridPointwise:
    """A frozen hybrid layer with random codes, ``a``, critical weights and bias."""
    g = torch.Generator().manual_seed(seed)
    crit = torch.randperm(c_out, generator=g)[:n_c]
    h = HybridPointwise(c_in, c_out, crit, r, kind, scale)
    h.freeze()
    with torch.no_grad():
        h.wb_codes.copy_(torch.randint(-1, 2, h.wb_codes.shape, generator=g))
        h.wc_codes.copy_(torch.randint(-1, 2, h.wc_codes.shape, generator=g))
        h.a.copy_((torch.rand(h.r, generator=g) + 0.5) / math.sqrt(max(c_in * h.r, 1)))
        h.w_crit.copy_(torch.randn(h.w_crit.shape, generator=g) / math.sqrt(c_in))
        h.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
        if h.channel_scale is not None:
            h.channel_scale.copy_(torch.rand(h.n_tolerant, generator=g) + 0.5)
    return h


class SmallNet(nn.Module):
    """Conv3x3+BN+ReLU6 -> depthwise -> 1x1 -> pool -> Linear, the MobileNet pattern."""

    def __init__(self, pw: nn.Module | None = None, fc: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = pw if pw is not None else nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc if fc is not None else nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.pw(self.dw(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_net(case: str) -> SmallNet:
    torch.manual_seed(1)
    if case == "mixed":
        net = SmallNet(rand_hybrid(8, 16, 6, 5))
    elif case == "all_tolerant":
        net = SmallNet(rand_hybrid(8, 16, 0, 7))
    elif case == "all_critical":
        net = SmallNet(rand_hybrid(8, 16, 16, 5))
    elif case == "linear":
        net = SmallNet(fc=rand_hybrid(16, 10, 3, 4, "linear"))
    elif case == "channel_scale":
        net = SmallNet(rand_hybrid(8, 16, 6, 5, scale=True), rand_hybrid(16, 10, 0, 6, "linear"))
    elif case == "plain":
        net = SmallNet()
    else:
        raise ValueError(case)
    return net.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def packed_sizes(mp: onnx.ModelProto) -> dict[str, int]:
    return {t.name: len(t.raw_data) for t in mp.graph.initializer
            if t.data_type == onnx.TensorProto.UINT8}


CASES = ["mixed", "all_tolerant", "all_critical", "linear", "channel_scale", "plain"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pack", ["2bit", "base3"])
def test_round_trip_agrees(tmp_path: Path, case: str, pack: str) -> None:
    net = make_net(case)
    path = tmp_path / "m.onnx"
    stats = export_onnx(net, path, RES, pack=pack)
    mp = onnx.load(str(path))
    onnx.checker.check_model(mp, full_check=True)
    onnx.shape_inference.infer_shapes(mp, strict_mode=True)
    n_custom = {"all_critical": 0, "plain": 0, "channel_scale": 2}.get(case, 1)
    assert stats["custom_ops"] == n_custom
    assert stats["bytes"] == path.stat().st_size
    assert any(o.domain == "hfb" for o in mp.opset_import) == (n_custom > 0)
    res = verify_onnx(path, net, images(5), batch_size=5, reference_batch=2)
    assert res.passed, res.summary()
    assert res.ort.max_abs_diff <= 1e-4 * res.ort.max_abs_logit
    assert res.reference is not None and res.reference.passed
    # channel-order indices are stored as int32 (half the bytes of int64)
    inits = {t.name: t for t in mp.graph.initializer}
    gathers = [n.input[1] for n in mp.graph.node if n.op_type == "Gather"]
    assert all(inits[g].data_type == onnx.TensorProto.INT32 for g in gathers if g in inits)
    assert case not in ("mixed", "linear") or any(g in inits for g in gathers)


def test_dynamic_batch(tmp_path: Path) -> None:
    net = make_net("mixed")
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES)
    sess = ort_session(path)
    for n in (1, 5):
        x = images(n, seed=n)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_static_batch(tmp_path: Path) -> None:
    net = make_net("mixed")
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES, dynamic_batch=False)
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.HasField("dim_value")
    assert verify_onnx(path, net, images(3), reference_batch=1).passed  # padded chunks


@pytest.mark.parametrize("pack,per_byte", [("2bit", 4), ("base3", 5)])
def test_packed_initializer_sizes(pack: str, per_byte: int) -> None:
    h = rand_hybrid(8, 16, 6, 5)  # W_b 5x8 = 40 codes, W_c 10x5 = 50 codes
    sizes = packed_sizes(build_onnx(SmallNet(h).eval(), RES, pack=pack))
    assert sizes == {"pw.wb_packed": math.ceil(40 / per_byte),
                     "pw.wc_packed": math.ceil(50 / per_byte)}
    # no float copy of the ternary weights anywhere in the file
    mp = build_onnx(SmallNet(h).eval(), RES, pack=pack)
    floats = {t.name for t in mp.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not any("wb" in n or "wc" in n for n in floats)


def test_functions_carried() -> None:
    mp = build_onnx(make_net("mixed"), RES, pack="base3")
    names = {(f.domain, f.name) for f in mp.functions}
    assert names == {("hfb", "StrassenPointwise"), ("hfb", "UnpackTernaryBase3")}
    node = next(n for n in mp.graph.node if n.domain == "hfb")
    assert node.op_type == "StrassenPointwise" and len(node.input) == 4
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"c_in": 8, "r": 5, "c_out": 10, "packing": b"base3"}
    ops = [n.op_type for n in mp.graph.node]
    assert "Gather" in ops and "Concat" in ops


@pytest.mark.parametrize("opset", SUPPORTED_OPSETS)
def test_opsets(tmp_path: Path, opset: int) -> None:
    net = make_net("channel_scale")
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES, opset=opset)
    mp = onnx.load(str(path))
    assert {o.domain: o.version for o in mp.opset_import}[""] == opset
    onnx.checker.check_model(mp, full_check=True)
    assert verify_onnx(path, net, images(2), reference_batch=1).passed


@pytest.mark.parametrize("opset", [13, 16, 99])
def test_unsupported_opset(tmp_path: Path, opset: int) -> None:
    with pytest.raises(InputError, match="opset"):
        export_onnx(make_net("mixed"), tmp_path / "m.onnx", RES, opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_unknown_packing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="pack"):
        export_onnx(make_net("mixed"), tmp_path / "m.onnx", RES, pack="1bit")


def test_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(InputError, match="exists"):
        export_onnx(make_net("mixed"), path, RES)
    assert path.read_bytes() == b"old"
    export_onnx(make_net("mixed"), path, RES, force=True)
    onnx.checker.check_model(onnx.load(str(path)))


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(make_net("mixed"), tmp_path / "m.onnx", RES)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("broken")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(CheckFailed):
        export_onnx(make_net("mixed"), tmp_path / "m.onnx", RES)
    assert list(tmp_path.iterdir()) == []


def test_deterministic(tmp_path: Path) -> None:
    net = make_net("channel_scale")
    export_onnx(net, tmp_path / "a.onnx", RES)
    export_onnx(net, tmp_path / "b.onnx", RES)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_export_leaves_model_untouched() -> None:
    net = make_net("mixed")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    build_onnx(net, RES)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(net.pw, HybridPointwise)


def test_training_form_exported_as_deploy_form(tmp_path: Path) -> None:
    """An unfrozen hybrid layer is frozen (on a copy) before export."""
    torch.manual_seed(3)
    h = HybridPointwise(8, 16, torch.tensor([0, 3, 5]), 6)
    with torch.no_grad():
        h.wb_latent.normal_()
        h.wc_latent.normal_()
        h.w_crit.normal_(0, 0.3)
    net = SmallNet(h).eval()
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES)
    assert not h.frozen
    assert verify_onnx(path, net, images(3)).passed


def test_verify_detects_mismatch(tmp_path: Path) -> None:
    net = make_net("mixed")
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES)
    with torch.no_grad():
        net.fc.bias[3] += 100.0  # the file no longer matches the model
    res = verify_onnx(path, net, images(4), reference_batch=1)
    assert not res.passed
    assert res.ort.top1_mismatches > 0
    row = res.worst[0]
    assert row.torch_top1 == 3 and row.onnx_top1 != 3 and row.max_abs_diff > 10
    json.dumps(res.to_dict())
    with pytest.raises(CheckFailed):
        res.ensure_passed()


def _logits_with_outliers(n: int, n_bad: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, 10)).astype(np.float32)
    ref[:, 0] += 10.0  # class 0 wins clearly: max|logit| about 12
    got = ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)
    got[:n_bad, 1] += 1.0  # over 5% of max|logit| ...
    if flip:
        got[:n_bad, 2] += 30.0  # ... or a different top-1
    return ref, got


@pytest.mark.parametrize("flip", [False, True])
def test_quantized_check_bounds_how_often_not_the_worst(flip: bool) -> None:
    """int8 models: up to 5% of the images (at least one) may be over the tolerance or flip;
    float models: none."""
    for n, n_bad, ok in [(16, 0, True), (16, 1, True), (16, 2, False), (64, 3, True),
                         (64, 4, False), (64, 40, False)]:
        ref, got = _logits_with_outliers(n, n_bad, flip)
        c = compare_logits("ort", ref, got, 0.05, 0.05)
        assert c.passed == ok, (n, n_bad, c)
        assert c.n_over_tolerance == n_bad
        assert c.top1_mismatches == (n_bad if flip else 0)
        assert compare_logits("ort", ref, got, 0.05, 0.0).passed == (n_bad == 0)


def test_verify_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        verify_onnx(tmp_path / "missing.onnx", make_net("plain"), images(1))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(InputError):
        verify_onnx(bad, make_net("plain"), images(1))


# ------------------------------------------------------------------ real architectures


def _hybridize(model: nn.Module, names: list[str], seed: int) -> nn.Module:
    for i, name in enumerate(names):
        m = model.get_submodule(name)
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        c_out, c_in = m.weight.shape[:2]
        n_t = c_out // 2
        h = rand_hybrid(c_in, c_out, c_out - n_t, max(n_t // 2, 1), kind, scale=False,
                        seed=seed + i)
        with torch.no_grad():
            h.w_crit.copy_(m.weight.reshape(c_out, -1)[h.critical_idx])
        set_submodule(model, name, h)
    return model.eval()


@pytest.mark.parametrize("config", [{}, {"padding": "tf_same", "batchnorm": "folded"}])
def test_mobilenet_v1(tmp_path: Path, config: dict) -> None:
    torch.manual_seed(0)
    net = _hybridize(models.MobileNetV1(width_mult=0.25, **config),
                     ["blocks.0.conv_pw", "blocks.5.conv_pw", "blocks.12.conv_pw", "classifier"],
                     seed=10)
    path = tmp_path / "v1.onnx"
    stats = export_onnx(net, path, 64)
    assert stats["custom_ops"] == 4
    res = verify_onnx(path, net, torch.randn(3, 3, 64, 64), reference_batch=1)
    assert res.passed, res.summary()


def test_mobilenet_v2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = models.MobileNetV2(width_mult=0.25)
    names = ["features.1.conv.1", "features.4.conv.0.0", "features.4.conv.2",
             "features.18.0"]
    # the layout the names address: a changed layout must fail here, not skip
    assert all(isinstance(net.get_submodule(n), nn.Conv2d) for n in names)
    net = _hybridize(net, names, seed=20)
    path = tmp_path / "v2.onnx"
    stats = export_onnx(net, path, 64, pack="base3")
    assert stats["custom_ops"] == len(names)
    res = verify_onnx(path, net, torch.randn(3, 3, 64, 64), reference_batch=1)
    assert res.passed, res.summary()


def test_onnxruntime_folds_unpack(tmp_path: Path) -> None:
    """The unpack subgraph depends on initializers only: onnxruntime folds it at load time,
    so no integer unpack op runs per inference."""
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    export_onnx(make_net("channel_scale"), path, RES, pack="base3")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"Cast", "Div", "Mod", "Slice", "StrassenPointwise",
                      "UnpackTernaryBase3"}
    assert "Conv" in ops


def test_verify_result_dict(tmp_path: Path) -> None:
    net = make_net("mixed")
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES)
    d = verify_onnx(path, net, images(3), reference_batch=1).to_dict()
    assert d["passed"] is True and d["agreement"] == 1.0 and d["n_images"] == 3
    assert 0 <= d["max_rel_diff"] <= 1e-4
    assert d["reference"]["n_images"] == 1 and d["reference"]["passed"] is True
    assert {"index", "max_abs_diff", "torch_top1", "onnx_top1"} <= set(d["worst"][0])
    json.dumps(d)


@pytest.mark.parametrize("n_c", [0, 2, 6])
def test_model_is_one_hybrid_layer(tmp_path: Path, n_c: int) -> None:
    net = rand_hybrid(3, 6, n_c, 4, seed=5).eval()
    path = tmp_path / "m.onnx"
    stats = export_onnx(net, path, RES)
    assert stats["custom_ops"] == int(n_c < 6)
    assert bool(onnx.load(str(path)).functions) == (n_c < 6)
    assert verify_onnx(path, net, images(2), reference_batch=1).passed


def _cancelling_net() -> tuple[SmallNet, torch.Tensor]:
    """Logits of about 0.02 out of pre-bias outputs of about 2,000 cancelled by the bias
    (what a bias-corrected classifier of a collapsed random-weight MobileNetV1 computes)."""
    torch.manual_seed(1)
    net = SmallNet(fc=rand_hybrid(16, 10, 3, 4, "linear")).eval()
    x = images(6)
    with torch.no_grad():
        net.bn.weight.fill_(1e-4)  # features nearly constant across images
        net.bn.bias.fill_(3.0)
        net.fc.w_crit.mul_(300.0)
        net.fc.a.mul_(300.0)
        pre = net(x) - net.fc.bias
        net.fc.bias.copy_(-pre.mean(0) + 0.01 * torch.randn(10))
    return net, x


def test_verify_tolerance_is_not_below_float32_rounding(tmp_path: Path) -> None:
    """The V1 generality row's false FAIL: max|Δ| = one float32 ulp of the cancelled
    operands, 2.4e-4 of the tiny logits. The floor (PyTorch's own float32 − float64 gap)
    lets it pass, and an error well above that floor still fails."""
    from hfbconvert import verify as V

    net, x = _cancelling_net()
    path = tmp_path / "m.onnx"
    export_onnx(net, path, RES)
    with torch.no_grad():
        max_logit = float(net(x).abs().max())
    noise = V.float_noise(net, x)
    assert noise > V.FLOAT_RTOL * max_logit  # the old tolerance was below the model's rounding
    res = verify_onnx(path, net, x, reference_batch=2)
    assert res.passed, res.summary()
    assert res.ort.noise_floor == pytest.approx(V.FLOAT_NOISE_FACTOR * noise)
    assert res.ort.tolerance == res.ort.noise_floor
    assert "noise_floor" in res.to_dict()["ort"]
    with torch.no_grad():
        net.fc.bias[3] += 20 * res.ort.noise_floor  # a real mismatch, above the floor
    assert not verify_onnx(path, net, x, reference_batch=1).passed


def test_float_noise_runs_a_frozen_hybrid_in_float64() -> None:
    """The float64 copy must compute (ternary codes cast to ``a``'s dtype): a small gap,
    not the 0.0 that means "could not run"."""
    from hfbconvert.verify import float_noise

    net = make_net("mixed")
    assert net.pw.frozen
    noise = float_noise(net, images(3))
    assert 0.0 < noise < 1e-5
    assert net.pw.w_crit.dtype == torch.float32  # the caller's model is untouched
