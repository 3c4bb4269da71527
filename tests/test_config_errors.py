"""Typed configuration errors: the library names the field, its value and why, never a CLI
flag; the CLI maps the field to its flag by type, not by reading the message."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from hfbconvert import cli
from hfbconvert.distill import FinetuneConfig
from hfbconvert.errors import ConfigError, InputError
from hfbconvert.pipeline import CompressConfig, validate_config
from hfbconvert.plan import budget_plan

from .tiny import write_reference_checkpoint

BAD = [  # (changes to the default config, has calibration data, field at fault, value)
    ({"method": "magic"}, True, "method", "magic"),
    ({"budget": 1.5}, True, "budget", 1.5),
    ({"budget": float("nan")}, True, "budget", None),
    ({"size_budget": 0.0}, True, "size_budget", 0.0),
    ({"energy_budget": 2.0}, True, "energy_budget", 2.0),
    ({"size_budget": 0.5, "critical_fraction": 0.3}, True, "size_budget", 0.5),
    ({"energy_budget": 0.5, "method": "twn"}, True, "energy_budget", 0.5),
    ({"weight_bits": 4}, True, "weight_bits", 4),
    ({"activation_bits": 16}, True, "activation_bits", 16),
    ({"activation_bits": 8, "weight_bits": 16}, True, "activation_bits", 8),
    ({"activation_bits": 8, "weight_bits": 8}, False, "activation_bits", 8),
    ({"hidden_bits": 8}, True, "hidden_bits", 8),
    ({"hidden_bits": 7, "activation_bits": 8, "weight_bits": 8}, True, "hidden_bits", 7),
    ({"bn_adjust": "maybe"}, True, "bn_adjust", "maybe"),
    ({"qat": False}, True, "qat=False", None),
    ({"finetune": FinetuneConfig(trainable="norm"), "activation_bits": 8, "weight_bits": 8},
     True, "trainable", "norm"),
    ({"qat": "no", "activation_bits": 8, "weight_bits": 8}, True, "qat", "no"),
    ({"bn_scope": "some"}, True, "bn_scope", "some"),
    ({"weight_rounding": "stochastic"}, True, "weight_rounding", "stochastic"),
    ({"mean_shift": False}, True, "mean_shift=False", None),
    ({"mean_shift": "no", "weight_bits": 8}, True, "mean_shift", "no"),
]


@pytest.mark.parametrize("changes,has_data,field,value", BAD)
def test_library_names_field_value_and_reason_not_a_flag(changes, has_data, field, value):
    cfg = dataclasses.replace(CompressConfig(), **changes)
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg, has_data)
    exc = ei.value
    assert isinstance(exc, InputError) and exc.exit_code == 2
    assert exc.field == field and exc.reason
    if value is not None:
        assert exc.value == value
    assert "--" not in str(exc) and str(exc).startswith(field)
    assert "\n" not in str(exc)


def test_good_configs_pass():
    validate_config(CompressConfig(), has_data=False)
    validate_config(CompressConfig(activation_bits=8, weight_bits=8, hidden_bits=8), True)
    validate_config(CompressConfig(budget=None, critical_fraction=0.5), False)


def _all_options(cmd: click.Command) -> set[str]:
    opts = {o for p in cmd.get_params(click.Context(cmd))
            for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    for sub in getattr(cmd, "commands", {}).values():
        opts |= _all_options(sub)
    return opts


# library parameters (not CompressConfig fields) that errors point at; switches as name=True
LIBRARY_PARAMS = {"calib", "plan_override", "opset", "pack", "arch", "source_model",
                  "resolution", "force=True", "resume=True", "trust_pickle=True",
                  "accelerator", "mac_area_fraction"}  # the hw command's parameters


def test_every_mapped_flag_is_a_cli_option():
    assert set(cli.CONFIG_FLAGS.values()) <= _all_options(cli.main)
    compress_opts = _all_options(cli.compress)
    fields = {f.name for f in dataclasses.fields(CompressConfig)
              + dataclasses.fields(FinetuneConfig)}
    for field, flag in cli.CONFIG_FLAGS.items():
        field = field.split("=")[0]  # a switch's value: "qat=False" is set by --no-qat
        assert field in fields | {p.split("=")[0] for p in LIBRARY_PARAMS}, field
        if field in fields:  # a configuration field is set by a compress option
            assert flag in compress_opts, (field, flag)


def test_planner_budget_errors_are_typed():
    with pytest.raises(ConfigError) as ei:
        budget_plan([], {}, {}, {}, (1,), 1.5, 0, 1, 1, 0.48)
    assert (ei.value.field, ei.value.value) == ("budget", 1.5)


@pytest.mark.parametrize("args,needles", [
    (["--activation-bits", "8", "--weight-bits", "16"],
     ["--activation-bits 8: needs --weight-bits 8", "not 16"]),
    (["--activation-bits", "8", "--weight-bits", "8"],
     ["--activation-bits 8: needs calibration images", "(give --calib)"]),
    (["--hidden-bits", "8"], ["--hidden-bits 8: applies only with --activation-bits 8"]),
    (["--no-qat"], ["--no-qat: applies only with --activation-bits 8"]),
    (["--trainable", "norm", "--activation-bits", "8", "--calib", "synthetic:8"],
     ["--trainable norm: with 8-bit activations needs --no-qat"]),
    (["--size-budget", "0.5", "--method", "twn"],
     ["--size-budget 0.5: steers the budget planner", "--method twn"]),
])
def test_cli_renders_fields_as_flags(tmp_path, args, needles):
    model = write_reference_checkpoint(tmp_path / "m.pt")
    res = CliRunner().invoke(cli.main, ["compress", str(model), *args, "-o",
                                        str(tmp_path / "o.pt")])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output
    for n in needles:
        assert n in errors[0], errors[0]
    assert not (tmp_path / "o.pt").exists()
