"""A model hfbconvert has never seen goes through every command (issue #15): strided 1x1
convs and N-D Linear layers are converted exactly, and the compressed file of a custom
module is reported without its code and rebuilt on its named source model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfbconvert import cli
from hfbconvert.errors import InputError
from hfbconvert.hybrid import HybridPointwise
from hfbconvert.layers import find_pointwise

from .custom_nets import token_mix_net
from .test_cli import ok, one_error, run
from .tiny import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_hybrid(c_in: int, c_out: int, kind: str, stride: int = 1) -> HybridPointwise:
    g = torch.Generator().manual_seed(1)
    h = HybridPointwise(c_in, c_out, torch.tensor([0, 3]), 5, kind, stride=stride)
    with torch.no_grad():
        h.w_crit.normal_(generator=g)
        h.bias.normal_(generator=g)
        h.set_factors(torch.randint(-1, 2, (5, c_in), generator=g).float(),
                      torch.rand(5, generator=g) + 0.5,
                      torch.randint(-1, 2, (c_out - 2, 5), generator=g).float())
    return h.eval()


@pytest.mark.parametrize("frozen", [False, True])
def test_strided_hybrid_is_a_strided_1x1_conv(frozen: bool) -> None:
    h = _random_hybrid(6, 9, "conv", stride=2)
    if frozen:
        h.freeze()
    x = torch.randn(2, 6, 7, 9)
    ref = F.conv2d(x, h.effective_weight()[:, :, None, None], h.bias, stride=2)
    assert h(x).shape == ref.shape == (2, 9, 4, 5)
    torch.testing.assert_close(h(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_linear_hybrid_on_nd_inputs(shape: tuple[int, ...]) -> None:
    h = _random_hybrid(6, 9, "linear")
    x = torch.randn(*shape)
    ref = F.linear(x, h.effective_weight(), h.bias)
    torch.testing.assert_close(h(x), ref, rtol=1e-5, atol=1e-5)


def test_discovery_counts_strided_downsample_and_output_size() -> None:
    layers = {ly.name: ly for ly in find_pointwise(token_mix_net(), 32)}
    ds = layers["downsample.0"]
    assert (ds.stride, ds.height, ds.width, ds.c_in, ds.c_out) == (2, 16, 16, 8, 16)
    assert layers["token_mlp"].kind == "linear" and layers["token_mlp"].pixels == 16 * 16
    assert set(layers) == {"downsample.0", "expand", "token_mlp", "head"}


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("custom")
    net = token_mix_net()
    path = d / "mine.pt"
    torch.save(net, path)  # a whole nn.Module: its code is the user's
    npz = write_npz(d / "calib.npz", n=48)
    out = d / "mine.hfb.pt"
    res = ok(run("compress", path, "--trust-pickle", "--resolution", "32", "--calib", npz,
                 "--steps", "2", "--batch-size", "8", "--budget", "0.9", "-o", out, "--json",
                 "-q"))
    return {"dir": d, "model": path, "calib": npz, "out": out,
            "compress": json.loads(res.stdout), "net": net}


def test_custom_module_needs_its_resolution(custom, tmp_path) -> None:
    one_error(run("compress", custom["model"], "--trust-pickle", "-o", tmp_path / "x.pt"),
              str(custom["model"]), "--resolution")
    assert not (tmp_path / "x.pt").exists()


def test_custom_module_is_compressed(custom) -> None:
    from hfbconvert.artifact import load_compressed_meta

    info, meta = load_compressed_meta(custom["out"])
    assert info.arch == "custom" and info.resolution == 32
    names = {lp["name"] for lp in meta["plan"]["layers"]}
    assert {"downsample.0", "token_mlp"} <= names
    assert meta["source_sha256"] and meta["source_model"] == str(custom["model"])


def test_custom_artifact_reports_without_its_code(custom) -> None:
    rep = json.loads(ok(run("report", custom["out"], "--json", "-q")).stdout)
    assert {ly["name"] for ly in rep["layers"]} >= {"downsample.0", "token_mlp"}


def test_custom_artifact_asks_for_its_source_model(custom) -> None:
    one_error(run("eval", custom["out"], "--data", custom["calib"]), str(custom["out"]),
              "--source-model")


def test_custom_artifact_eval_and_export_on_its_source(custom, tmp_path) -> None:
    ev = json.loads(ok(run("eval", custom["out"], "--data", custom["calib"], "--source-model",
                           custom["model"], "--trust-pickle", "--json", "-q")).stdout)
    assert ev["n"] == 48 and ev["agreement"] is not None and ev["agreement"] > 0.5
    onnx = tmp_path / "mine.onnx"
    exp = json.loads(ok(run("export", "onnx", custom["out"], "-o", onnx, "--source-model",
                            custom["model"], "--trust-pickle", "--calib", custom["calib"],
                            "--calib-size", "16", "--json", "-q", "--no-report")).stdout)
    assert exp["verify"]["passed"] and exp["export"]["custom_ops"] >= 3
    assert exp["verify"]["max_rel_diff"] < 1e-4  # float arithmetic: rounding only
    # the same network in onnxruntime and in PyTorch, strided and N-D layers included
    import onnxruntime as ort

    from hfbconvert.artifact import load_compressed

    net, _, _ = load_compressed(custom["out"], skeleton=custom["net"])
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_trust_never_reaches_a_path_recorded_in_the_artifact(custom) -> None:
    """eval --trust-pickle of the artifact must not unpickle meta["source_model"]."""
    res = run("eval", custom["out"], "--data", custom["calib"], "--trust-pickle")
    one_error(res, "--source-model")


def test_include_and_exclude_pick_layers(custom, tmp_path) -> None:
    plan = json.loads(ok(run("compress", custom["model"], "--trust-pickle", "--resolution",
                             "32", "--calib", custom["calib"], "--budget", "0.95",
                             "--exclude", "head", "--exclude", "token_*", "--dry-run",
                             "--json", "-q")).stdout)["plan"]
    assert {lp["name"] for lp in plan["layers"]} == {"downsample.0", "expand"}
    plan = json.loads(ok(run("analyze", custom["model"], "--trust-pickle", "--resolution",
                             "32", "--include", "down*", "--budgets", "1,2", "--json",
                             "-q")).stdout)
    assert [ly["name"] for ly in plan["layers"]] == ["downsample.0"]
    one_error(run("compress", custom["model"], "--trust-pickle", "--resolution", "32",
                  "--include", "nothing*", "-o", tmp_path / "x.pt"), "--include 'nothing*'")
    assert not (tmp_path / "x.pt").exists()


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h), h  # a tuple, not one logits tensor


class _Shared(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.alias = self.fc  # the same weights under two names
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.alias(self.fc(x.mean((2, 3)))))


@pytest.mark.parametrize("net,needles", [(_TwoHeads(), ["forward returns a tuple"]),
                                         (_Shared(), ["shared", "{exclude} 'fc'"])])
def test_unconvertible_modules_are_refused_before_work(net, needles) -> None:
    with pytest.raises(InputError) as exc:
        find_pointwise(net, 16, "m.pt")
    msg = str(exc.value)
    assert msg.startswith("m.pt: ") and "\n" not in msg
    for n in needles:  # the library names the field, the CLI shows its flag
        assert n.format(exclude="exclude") in msg
        assert n.format(exclude="--exclude") in exc.value.render(cli._flag)
