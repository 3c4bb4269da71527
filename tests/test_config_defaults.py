"""One configuration, one set of defaults: ``hfbconvert compress`` with no options builds
exactly ``CompressConfig()``, and the library alone decides the weight bits that int8
activations need (``CompressConfig(activation_bits=8)`` works from Python)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hfbconvert import cli
from hfbconvert.calib.readers import CalibData
from hfbconvert.distill import FinetuneConfig
from hfbconvert.errors import ConfigError
from hfbconvert.pipeline import CompressConfig, validate_config

from .tiny import tiny_info, tiny_v1


def _cli_defaults(*args: str) -> dict[str, object]:
    """``compress``'s options exactly as click hands them to the command for ``args``."""
    ctx = cli.compress.make_context("compress", ["m.pt", *args])
    return dict(ctx.params)


def _fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def test_cli_defaults_are_the_library_defaults() -> None:
    from_cli, lib = cli.compress_config(_cli_defaults()), CompressConfig()
    cli_f, lib_f = _fields(from_cli), _fields(lib)
    assert cli_f.keys() == lib_f.keys()
    differ = {k: (cli_f[k], lib_f[k]) for k in lib_f if k != "finetune" and cli_f[k] != lib_f[k]}
    assert not differ, f"CLI default != CompressConfig default: {differ}"
    ft_cli, ft_lib = _fields(from_cli.finetune), _fields(lib.finetune)
    differ = {k: (ft_cli[k], ft_lib[k]) for k in ft_lib if ft_cli[k] != ft_lib[k]}
    assert not differ, f"CLI fine-tune default != library default: {differ}"
    assert from_cli.weight_bits == 16 and from_cli.to_dict() == lib.to_dict()


def test_cli_int8_defaults_are_the_library_int8_defaults() -> None:
    from_cli = cli.compress_config(_cli_defaults("--activation-bits", "8"))
    assert from_cli == CompressConfig(activation_bits=8)
    assert from_cli.weight_bits == 8


def test_int8_activations_from_python_need_no_weight_bits() -> None:
    cfg = CompressConfig(activation_bits=8)
    assert cfg.weight_bits == 8 and cfg.to_dict()["weight_bits"] == 8
    validate_config(cfg, has_data=True)
    # an explicit choice is kept, and the library says why it cannot work
    with pytest.raises(ConfigError) as ei:
        validate_config(CompressConfig(activation_bits=8, weight_bits=16), has_data=True)
    assert ei.value.field == "activation_bits" and ei.value.other == "weight_bits"
    assert CompressConfig(weight_bits=32).weight_bits == 32


def test_int8_config_from_python_runs() -> None:
    """The whole int8 pipeline from Python with only ``activation_bits=8`` about bits, as
    ``hfbconvert.compress`` keyword overrides (on top of ``CompressConfig()``)."""
    import hfbconvert as hfb

    n = 40
    imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)
    data = CalibData(imgs, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     [str(i) for i in range(n)], source="random")
    small = {"budget": 0.6, "ratios": (1.0, 2.0), "budgets": (1, 2), "fragility": False,
             "stats_images": 32, "act_calib_images": 32}
    res = hfb.compress(tiny_v1(), data, info=tiny_info(), activation_bits=8, steps=0, **small)
    cfg = res.meta["config"]
    assert cfg["weight_bits"] == 8 and cfg["activation_bits"] == 8
    assert res.meta["weight_bits"] == 8
    want = CompressConfig(activation_bits=8, **small,
                          finetune=FinetuneConfig(steps=0)).to_dict()
    assert {k: v for k, v in cfg.items() if k != "finetune"} == \
        {k: v for k, v in want.items() if k != "finetune"}
