"""The documented Python API, as the README shows it, on a module of the user's own."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import hfbconvert as hfb
from hfbconvert.errors import InputError

from .custom_nets import token_mix_net
from .tiny import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_is_lazy_and_fast() -> None:
    """``import hfbconvert`` must not import torch (the CLI's --help imports it)."""
    code = "import sys, hfbconvert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
    assert set(hfb.__all__) >= {"compress", "analyze", "export_onnx", "load_compressed"}


def test_api_round_trip_on_an_in_memory_module(tmp_path) -> None:
    net = token_mix_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    info = hfb.describe(net, 32, mean=(0.5,) * 3, std=(0.25,) * 3, crop=1.0)
    calib = hfb.load_images(write_npz(tmp_path / "c.npz", n=48), info)
    sens = hfb.analyze(net, calib, info=info, budgets=(1, 2))
    assert {ly["name"] for ly in sens["layers"]} == {"downsample.0", "expand", "token_mlp",
                                                     "head"}
    res = hfb.compress(net, calib, info=info, budget=0.9, steps=2, batch_size=8)
    assert isinstance(res, hfb.Compressed) and res.meta["plan"]["layers"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    hfb.save_compressed(res, tmp_path / "m.hfb.pt")
    with pytest.raises(InputError, match="already exists"):
        hfb.save_compressed(res, tmp_path / "m.hfb.pt")
    with pytest.raises(InputError, match="pass source_model "):
        hfb.load_compressed(tmp_path / "m.hfb.pt")
    again = hfb.load_compressed(tmp_path / "m.hfb.pt", source_model=net)
    x = calib.normalized()[:8]
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), res.model.eval()(x))
    stats = hfb.export_onnx(again, tmp_path / "m.onnx", verify_images=x)
    assert stats["verify"]["passed"] and (tmp_path / "m.onnx").is_file()
    ev = hfb.evaluate(again.model, calib, reference=net)
    assert ev["n"] == 48 and 0 <= ev["agreement"] <= 1
    json.dumps(sens)  # plain data all the way


def test_api_refuses_unknown_options() -> None:
    net = token_mix_net()
    info = hfb.describe(net, 32)
    with pytest.raises(InputError, match="unknown option"):
        hfb.compress(net, None, info=info, budgt=0.5)
    with pytest.raises(InputError, match="resolution"):
        hfb.describe(net, 0)
    assert np.isfinite(info.mean).all()
