"""Data-free (ZeroQ-style) calibration: the BN-statistics objective actually drops, the
result is ordinary uint8 CalibData, it is deterministic and cached, and every unusable
input (no BatchNorm, a foreign cache file, a malformed N) is a one-line InputError."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hfbconvert.calib import preset_for
from hfbconvert.calib import synthetic as syn
from hfbconvert.calib.readers import CalibData, load_images
from hfbconvert.cli import main
from hfbconvert.errors import InputError
from hfbconvert.models.mobilenet_v1 import MobileNetV1

from .tiny import TINY_CONFIG, TINY_RES, tiny_info, tiny_v1, write_npz, write_reference_checkpoint

N, ITERS = 8, 12  # small on purpose: the whole file runs in a few seconds on 2 cores
PREP = preset_for(tiny_info())


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These nets are tiny: intra-op threads only add synchronisation (and on a shared
    2-core machine, 10x slowdowns from oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """tiny_v1 whose BN running statistics come from "training images" (smooth random
    images), as in a trained net: then the targets are reachable from the input side,
    while tiny_v1's random running statistics are not."""
    m = tiny_v1()
    npz = write_npz(tmp_path_factory.mktemp("bn") / "train.npz", n=64)
    data = load_images(npz, PREP, cache=False)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the one pass below
    m.train()
    with torch.no_grad():
        m(data.normalized())
    return m.eval()


def _gen(model: torch.nn.Module, seed: int = 0, **kw) -> CalibData:
    kw.setdefault("cache", False)
    return syn.synthesize(model, PREP, N, seed, iterations=ITERS, batch_size=N, lr=0.1, **kw)


@pytest.fixture(scope="module")
def generated(model: torch.nn.Module) -> CalibData:
    return _gen(model)


def test_generation_reduces_bn_loss(model: torch.nn.Module, generated: CalibData) -> None:
    mean = torch.tensor(PREP.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREP.std).view(1, 3, 1, 1)
    noise = torch.randn(N, 3, TINY_RES, TINY_RES, generator=torch.Generator().manual_seed(0))
    noise = noise.clamp((0 - mean) / std, (1 - mean) / std)  # the generator's start
    data = generated
    with torch.no_grad():
        before = float(syn.bn_statistics_loss(model, noise))
        after = float(syn.bn_statistics_loss(model, data.normalized()))
    assert after < 0.6 * before, (before, after)


def test_result_is_uint8_calibdata(generated: CalibData) -> None:
    data = generated
    assert isinstance(data, CalibData)
    assert data.images.dtype == torch.uint8
    assert tuple(data.images.shape) == (N, 3, TINY_RES, TINY_RES)
    assert data.labels is None and len(data.files) == N and data.source == f"synthetic:{N}"
    assert data.mean == PREP.mean and data.std == PREP.std
    assert int(data.images.max()) > int(data.images.min())  # not a constant image


def test_model_left_untouched(model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    syn.synthesize(model, PREP, 4, iterations=2, cache=False)
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_deterministic(model: torch.nn.Module, generated: CalibData) -> None:
    again = _gen(model)
    assert again.images.numpy().tobytes() == generated.images.numpy().tobytes()
    a, b = (syn.synthesize(model, PREP, 4, seed, iterations=2, cache=False) for seed in (0, 1))
    assert not torch.equal(a.images, b.images)


def test_cache_reused(model: torch.nn.Module, generated: CalibData,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = syn.cache_path(syn.fingerprint(model, N, 0, PREP, ITERS, N, 0.1))
    path.unlink(missing_ok=True)
    first = _gen(model, cache=True)
    assert path.is_file()
    assert torch.equal(first.images, generated.images)  # caching changes nothing

    def no_optimising(*_a, **_k):
        raise AssertionError("second run optimised instead of reading the cache")

    monkeypatch.setattr(syn, "_generate", no_optimising)
    read = []
    real_read = syn._cache_read
    monkeypatch.setattr(syn, "_cache_read", lambda p, fp: read.append(p) or real_read(p, fp))
    second = _gen(model, cache=True)
    assert read == [path]
    assert torch.equal(first.images, second.images)


def test_cache_of_other_model_refused(model: torch.nn.Module) -> None:
    src = syn.cache_path(syn.fingerprint(model, N, 0, PREP, ITERS, N, 0.1))
    if not src.is_file():
        _gen(model, cache=True)
    other = tiny_v1(seed=3)
    dest = syn.cache_path(syn.fingerprint(other, N, 0, PREP, ITERS, N, 0.1))
    shutil.copyfile(src, dest)  # e.g. a cache folder copied around by hand
    try:
        with pytest.raises(InputError, match="fingerprint mismatch") as exc:
            _gen(other, cache=True)
        assert "\n" not in str(exc.value)
    finally:
        dest.unlink()


def test_damaged_cache_is_a_miss(model: torch.nn.Module) -> None:
    fp = syn.fingerprint(model, 4, 7, PREP, 2)
    syn.cache_path(fp).parent.mkdir(parents=True, exist_ok=True)
    syn.cache_path(fp).write_bytes(b"not an npz")
    data = syn.synthesize(model, PREP, 4, 7, iterations=2)
    assert len(data) == 4 and syn._cache_read(syn.cache_path(fp), fp) is not None  # rewritten


def test_folded_bn_model_refused() -> None:
    folded = MobileNetV1(**{**TINY_CONFIG, "batchnorm": "folded"}).eval()
    with pytest.raises(InputError, match="needs BatchNorm statistics.*calib") as exc:
        syn.synthesize(folded, PREP, 4, iterations=1, cache=False, source="m.pt")
    assert str(exc.value).startswith("m.pt: ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("spec,expected", [
    ("synthetic", (None, syn.DEFAULT_ITERATIONS)),
    ("synthetic:64", (64, syn.DEFAULT_ITERATIONS)),
    ("synthetic:64:50", (64, 50)),
])
def test_parse_spec(spec: str, expected: tuple[int | None, int]) -> None:
    assert syn.is_synthetic(spec)
    assert syn.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", [
    "synthetic:0", "synthetic:-5", "synthetic:1.5", "synthetic:abc", "synthetic:",
    "synthetic:100001", "synthetic:1e3", "synthetic:64:0", "synthetic:64:x", "synthetic:1:2:3",
])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(InputError) as exc:
        syn.parse_spec(spec)
    assert "\n" not in str(exc.value)


def test_paths_are_not_specs() -> None:
    assert not syn.is_synthetic("./synthetic") and not syn.is_synthetic("synthetic_imgs")
    assert not syn.is_synthetic(None)


# ------------------------------------------------------------------------------ CLI


def test_cli_analyze_synthetic(tmp_path: Path) -> None:
    ckpt = write_reference_checkpoint(tmp_path / "tiny.pt")
    res = CliRunner().invoke(main, ["analyze", str(ckpt), "--calib", "synthetic:8:3",
                                    "--budgets", "1,2", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert '"source": "synthetic:8"' in res.output


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:-1", "synthetic:2.5"])
def test_cli_bad_n_exit_2(tmp_path: Path, spec: str) -> None:
    ckpt = write_reference_checkpoint(tmp_path / "tiny.pt")
    res = CliRunner().invoke(main, ["analyze", str(ckpt), "--calib", spec, "-q"])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and res.output.count("\n") == 1


def test_cli_folded_model_exit_2(tmp_path: Path) -> None:
    folded = MobileNetV1(**{**TINY_CONFIG, "batchnorm": "folded"})
    ckpt = tmp_path / "folded.pt"
    torch.save({"format": "mobilenet-reference-checkpoint/1", "arch": "mobilenet_v1",
                "width_mult": 0.25, "resolution": TINY_RES, "num_classes": 10,
                "padding": "pytorch", "stem_stride": 1, "batchnorm": "folded",
                "state_dict": folded.state_dict()}, ckpt)
    res = CliRunner().invoke(main, ["analyze", str(ckpt), "--calib", "synthetic:4:1", "-q"])
    assert res.exit_code == 2, res.output
    assert "needs BatchNorm statistics" in res.output and res.output.count("\n") == 1


def test_cpu_cache_key_is_unchanged_and_a_gpu_has_its_own(model: torch.nn.Module) -> None:
    """``--device``: images optimised on a GPU round differently, so they are cached under
    their own key; the CPU's key stays what it was (existing caches still hit)."""
    plain = syn.fingerprint(model, N, 0, PREP, ITERS, N, 0.1)
    assert syn.fingerprint(model, N, 0, PREP, ITERS, N, 0.1, "cpu") == plain
    assert syn.fingerprint(model, N, 0, PREP, ITERS, N, 0.1, "cuda") != plain


@pytest.mark.parametrize("command", ["analyze", "compress", "export"])
def test_cli_optimises_synthetic_images_on_the_device(tmp_path: Path, monkeypatch,
                                                      command: str) -> None:
    """Every command that takes ``--calib synthetic`` hands its ``--device`` to the
    optimisation (here the CPU, asked for by name; bench/gpu_check.py runs it on CUDA)."""
    seen: list = []
    real = syn.synthesize

    def spy(*a, **kw):
        seen.append(kw.get("device"))
        return real(*a, **kw)

    monkeypatch.setattr(syn, "synthesize", spy)
    ckpt = str(write_reference_checkpoint(tmp_path / "tiny.pt"))
    common = ["--calib", "synthetic:8:2", "--device", "cpu", "-q"]
    args = {"analyze": ["analyze", ckpt, "--budgets", "1,2", *common],
            "compress": ["compress", ckpt, "--steps", "0", "--dry-run", *common],
            "export": ["export", "onnx", ckpt, "-o", str(tmp_path / "m.onnx"), "--no-report",
                       *common]}[command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert seen == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (run on a GPU machine: bench/gpu_check.py)")
def test_generation_on_cuda(model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _gen(model, device="cuda")
    assert data.images.dtype == torch.uint8 and data.images.shape[0] == N
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
