"""Command-line interface: parse, call the library, print, map errors to exit codes.

Exit codes: 0 success, 1 a failed check (e.g. ONNX/PyTorch mismatch, collapsed model),
2 usage or input error (one line naming the file and the problem, never a traceback).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__, progress
from .errors import ConfigError, HfbError, InputError
from .handlers import parse_kinds

JSON_SCHEMA_VERSION = 1
# library configuration fields (ConfigError.field) -> the flag that sets them; a field not
# listed is shown as the library names it
CONFIG_FLAGS = {
    "method": "--method", "budget": "--budget", "critical_fraction": "--critical-fraction",
    "size_budget": "--size-budget", "energy_budget": "--energy-budget",
    "max_add_increase": "--max-add-increase", "weight_bits": "--weight-bits",
    "weight_rounding": "--weight-rounding",
    "mean_shift": "--mean-shift", "mean_shift=False": "--no-mean-shift",
    "activation_bits": "--activation-bits", "hidden_bits": "--hidden-bits",
    "qat": "--qat", "qat=False": "--no-qat", "trainable": "--trainable",
    "calib": "--calib", "bn_adjust": "--bn-adjust", "plan_override": "--plan",
    # fields that library errors (HfbError placeholders) point at; switches as name=True
    "force=True": "--force", "resume=True": "--resume", "trust_pickle=True": "--trust-pickle",
    "source_model": "--source-model", "opset": "--opset", "pack": "--pack", "arch": "--arch",
    "batch_size": "--batch-size", "include": "--include", "exclude": "--exclude",
    "layer_kinds": "--layers", "energy_model": "--energy-model", "resolution": "--resolution",
    "accelerator": "--accelerator", "mac_area_fraction": "--mac-area-fraction",
}


def _flag(field: str) -> str:
    return CONFIG_FLAGS.get(field, field)


class _Group(click.Group):
    """Turns library errors and click's usage errors into one-line messages with the right
    exit code (click's own form is three lines: usage, a hint, the error)."""

    def main(self, args=None, prog_name=None, complete_var=None,  # type: ignore[override]
             standalone_mode: bool = True, **extra: Any) -> Any:
        quiet_before = progress.is_quiet()  # --quiet is per command, not per process
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            rv = 2
        except click.UsageError as exc:
            click.echo(f"error: {_one_line(exc.format_message())} "
                       "(see --help)", err=True)
            rv = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            rv = exc.exit_code
        except click.Abort:
            click.echo("aborted", err=True)
            rv = 1
        finally:
            progress.set_quiet(quiet_before)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        from .distributed import DistributedFailure, is_main

        # under torchrun every rank sees the same inputs and fails the same way: rank 0
        # says it once; the others speak only of what is theirs (a failed collective)
        loud = is_main()
        try:
            return super().invoke(ctx)
        except ConfigError as exc:  # typed: the field becomes its flag, no message parsing
            if loud:
                click.echo(f"error: {exc.render(_flag)}", err=True)
            ctx.exit(exc.exit_code)
        except HfbError as exc:  # fields the message points at become their flags
            if loud or isinstance(exc, DistributedFailure):
                click.echo(f"error: {exc.render(_flag)}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # e.g. disk full or permission denied while writing
            where = f"{exc.filename}: " if exc.filename else ""
            if loud:
                click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if loud:
                click.echo("interrupted (fine-tuning checkpoints, if any, are kept; use "
                           "--resume)", err=True)
            ctx.exit(130)


def _lr_backoff_opt(f):
    """compress's and finetune's --lr-backoff (distill.FinetuneConfig.lr_backoff)."""
    return click.option(
        "--lr-backoff", type=click.IntRange(min=0), default=2, show_default=True,
        help="Times the fine-tune may cut its lr tenfold, going back to the best state "
             "checked, when its training loss rises 1.5x while it trains (an lr too high "
             "for the model, as 1e-4 is for MobileNetV2); 0: never.")(f)


def _trainable_opt(f):
    """compress's and finetune's --trainable (distill.FinetuneConfig.trainable)."""
    return click.option(
        "--trainable", type=click.Choice(["all", "norm", "bias"]), default="all",
        show_default=True,
        help="Which parameters the fine-tune trains: all continuous ones, norm (the "
             "BatchNorm/GroupNorm/LayerNorm scales and shifts alone) or bias (every "
             "bias: what a BatchNorm-folded int8 network can still move; MobileNetV2 int8 "
             "QAT, tuning split: KL 0.045 -> 0.037, where all parameters at lr 1e-4 raised "
             "it). On MobileNetV2 "
             "every other set raised the held-apart KL at lr 3e-5 and norm lowered it "
             "(BENCHMARKS.md, fine-tune probes). norm needs normalization layers that "
             "are not folded (with --activation-bits 8: --no-qat).")(f)


def _device_opt(f):
    return click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                        show_default=True,
                        help="Where the heavy work runs ('auto': CUDA when available; "
                             "cuda without a CUDA device is refused before any work).")(f)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quiet(f):
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bars or status lines (warnings and errors stay).")(f)


def _common(f):
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for sampling and fitting; same inputs + seed = same bytes.")(f)
    return _quiet(f)


class FiniteFloat(click.ParamType):
    """A finite float in a range. ``click.FloatRange`` lets NaN through (every comparison
    with NaN is false), and a NaN cap silently turned the cap off."""

    name = "float"

    def __init__(self, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, float):
            x = value
        else:
            try:
                x = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        low_bad = self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo)
        if not math.isfinite(x) or low_bad or (self.hi is not None and x > self.hi):
            self.fail(f"{value} is not a finite number in {self._range()}", param, ctx)
        return x

    def _range(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}" \
               f"{']' if self.hi is not None else ')'}"


def _explicit(ctx: click.Context, name: str) -> bool:
    """Whether the user typed option ``name`` (not its default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def _outputs(paths: list[Path], force: bool, inputs: list[str]) -> list[Path]:
    """Check every output before any work: none is an input, a non-regular file, or an
    existing file without --force, and each folder takes a new file."""
    from .fileio import check_output_path

    files = [i for i in inputs if i and not str(i).startswith(("builtin:", "synthetic"))]
    return [check_output_path(p, force, inputs=files) for p in paths]


def _layer_opts(f):
    f = click.option("--layers", "layer_kinds", default=None, metavar="KINDS",
                     help="Comma-separated layer kinds to convert: pointwise (1x1 Conv2d), "
                          "linear, conv (k×k Conv2d, groups 1: hybrid banks over im2col "
                          "rows; opt-in). Default: pointwise,linear. --include/--exclude "
                          "then pick layers among these.")(f)
    f = click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Leave layers whose module name matches GLOB as they are "
                          "(repeatable; e.g. 'head' or 'features.1*').")(f)
    f = click.option("--include", multiple=True, metavar="GLOB",
                     help="Convert only layers whose module name matches GLOB (repeatable; "
                          "default: every 1x1 conv and Linear). A GLOB matching nothing is "
                          "an error.")(f)
    return f


def _source_opt(f):
    return click.option(
        "--source-model", default=None, metavar="PATH",
        help="The model a custom (non-built-in) compressed MODEL was made from: its network "
             "is rebuilt on this module's structure (the artifact holds no code). Named "
             "here, it is covered by --trust-pickle.")(f)


def _model_opts(f):
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a fully pickled nn.Module (runs code from the file).")(f)
    f = click.option("--arch", type=click.Choice([
        # families (shapes decide the variant), then named variants; equals
        # hfbconvert.models.loading.ARCH_CHOICES (kept literal: no torch import here)
        "efficientnet", "efficientnet_lite", "mnasnet", "mobilenet_v1", "mobilenet_v2",
        "mobilenet_v3", "resnet", "shufflenet_v2",
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
        "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
        "efficientnet_lite4", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
        "mobilenet_v3_large", "mobilenet_v3_small", "resnet101", "resnet152", "resnet18",
        "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
        "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
        "wide_resnet101_2", "wide_resnet50_2"]),
                     default=None,
                     help="Architecture of a state_dict MODEL (default: detected from its "
                          "keys).")(f)
    return f


# --calib images used when --calib-size is not given: every stage samples far fewer
# (statistics 256, reconstruction 256, held-apart 200, auto fine-tune <= 300 x 32 draws).
# Memory no longer grows with the number (images are streamed from a decoded file, see
# bench/rss.py), but the first run decodes every image (minutes per 10k on 2 cores, and
# 77 KB of disk each at 160 px), so a 100k-image training set is not decoded by default
DEFAULT_CALIB_CAP = 2048


def _workers_opt(f):
    """``--data-workers`` (``data_workers``): DataLoader processes reading decoded images,
    passed down with the data it reads (``CalibData.workers``), never a module default
    (one command's setting must not leak into the next in the same process)."""
    return click.option("--data-workers", "data_workers", type=click.IntRange(0, 64),
                        default=0, show_default=True,
                        help="DataLoader worker processes reading the decoded images in "
                             "batches. 0 reads in the main process: the images are decoded "
                             "once into a file (cached) and read back cheaply, so on a "
                             "2-core machine workers only compete with the model for the "
                             "cores; raise it where cores are spare.")(f)


def _calib_opts(f):
    f = _workers_opt(f)
    f = click.option("--calib", "calib", default=None, metavar="PATH",
                     help="Calibration images: ImageFolder tree, flat folder, .npz, or "
                          "synthetic[:N[:ITERATIONS]] (from BatchNorm statistics).")(f)
    f = click.option("--calib-size", type=click.IntRange(min=1), default=None,
                     help="Use a seeded random subset of N of the --calib images. [default: "
                          f"all, at most {DEFAULT_CALIB_CAP}: no stage gains from more, and "
                          "each image is decoded once (cached on disk; memory stays flat, "
                          "batches are streamed)]")(f)
    f = click.option("--resolution", type=click.IntRange(8, 4096), default=None,
                     help="Input side in pixels (default: the model's own).")(f)
    f = click.option("--preset", default=None,
                     help="Preprocessing preset (torchvision-imagenet, tf-inception, cifar10).")(f)
    return f


def _setup(quiet: bool, seed: int) -> None:
    import torch

    from .distributed import is_main

    progress.set_quiet(quiet)
    if not is_main():  # under torchrun rank 0 alone prints
        import warnings

        progress.set_silent(True)
        warnings.simplefilter("ignore")
    torch.manual_seed(seed)


def _load(model: str, arch: str | None, trust_pickle: bool, resolution: int | None = None,
          need_resolution: bool = True):
    """``(net, info)`` of a model the user named; ``resolution`` overrides the model's own,
    and a custom module (whose input size nothing records) must be given one when the
    command runs it (``need_resolution``)."""
    from .models.loading import load_model, settle_resolution

    net, info = load_model(model, arch=arch, trust_pickle=trust_pickle)
    return net, settle_resolution(info, resolution, model, required=need_resolution)


def _load_any(model: str, arch: str | None, trust_pickle: bool,
              source_model: str | None = None, resolution: int | None = None):
    """``(net, info, meta)`` for a compressed artifact or any model ``_load`` accepts
    (``meta`` None for the latter); the file is read once. A custom model's artifact is
    rebuilt on ``source_model`` (named on the command line, so --trust-pickle covers it)."""
    if model.startswith("builtin:"):
        return (*_load(model, arch, trust_pickle, resolution), None)
    from .artifact import build_compressed, is_compressed
    from .fileio import load_torch
    from .models.loading import ARCHS, model_from_object, settle_resolution

    obj = load_torch(model, trust_pickle)
    if is_compressed(obj):
        skeleton = None
        arch_of = (obj.get("model_info") or {}).get("arch") if isinstance(
            obj.get("model_info"), dict) else None
        if source_model and arch_of not in ARCHS:
            skeleton, _ = _load(source_model, None, trust_pickle, need_resolution=False)
            _check_source(model, obj.get("meta") or {}, source_model)
        net, info = build_compressed(obj, model, skeleton)
        return net, info, obj.get("meta") or {}
    net, info = model_from_object(obj, model, arch)
    return net, settle_resolution(info, resolution, model), None


def _check_source(artifact: str, meta: dict, source_model: str) -> None:
    """Warn when --source-model is not the file the artifact was made from: its structure
    is what counts (every weight is replaced), but agreement is measured against it."""
    from .fileio import file_sha256

    want = meta.get("source_sha256")
    if want and Path(source_model).is_file() and file_sha256(source_model) != want:
        progress.warn(f"{source_model}: not the file {artifact} was compressed from "
                      f"(sha256 differs from the recorded {want[:12]}...); its structure is "
                      "used, its weights are not")


def _load_calib(path: str | None, info, size: int | None, seed: int, resolution: int | None,
                preset: str | None, net=None, workers: int = 0, device: str = "cpu"):
    """Calibration data for ``--calib``: real images, or ``synthetic[:N[:ITERATIONS]]``
    distilled from ``net``'s BatchNorm statistics (N defaults to --calib-size, else 256;
    with an explicit N, --calib-size picks a seeded subset as it does for real images).
    ``workers``: ``--data-workers`` of the images read from disk; ``device``: where
    synthetic images are optimised."""
    if path is None:
        return None, info
    from hfbconvert.calib.presets import apply_overrides, preset_for
    from hfbconvert.calib.readers import load_images
    from hfbconvert.calib.synthetic import DEFAULT_N, is_synthetic, parse_spec, synthesize

    prep = apply_overrides(preset_for(info), preset=preset, resolution=resolution)
    if resolution is not None:
        info.resolution = resolution
    if is_synthetic(path):
        n, iterations = parse_spec(path)
        if net is None:
            raise InputError(f"--calib {path}: synthetic images need the model's BatchNorm "
                             "statistics, not available here; pass real images")
        from .distributed import device_for

        data = synthesize(net, prep, n or size or DEFAULT_N, seed, iterations=iterations,
                          source=getattr(info, "source", ""), device=device_for(device))
        if n is not None and size is not None and size < len(data):
            import numpy as np

            data = data.subset(np.sort(np.random.default_rng(seed).permutation(n)[:size]))
        return data, info
    with progress.task("reading images", None):
        data = load_images(path, prep, size=size or DEFAULT_CALIB_CAP, seed=seed,
                           loader_workers=workers)
    if data.skipped:
        progress.warn(f"{path}: skipped {data.skipped} unreadable image(s)"
                      + (f", e.g. {data.skipped_examples[0]}" if data.skipped_examples else ""))
    capped = size is None and len(data) + data.skipped >= DEFAULT_CALIB_CAP
    progress.info(f"calibration: {len(data)} images from {path}"
                  + (f" (a seeded random {DEFAULT_CALIB_CAP}, the default cap; --calib-size N "
                     "for another number)" if capped else ""))
    return data, info


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return name


def _json_safe(x: Any) -> Any:
    """NaN/inf as null: ``json.dumps`` would write bare ``NaN``, which is not JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(_json_safe(obj), indent=1, sort_keys=False, allow_nan=False))


class StepsType(click.ParamType):
    """A non-negative step count or 'auto'."""

    name = "N|auto"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a step count or 'auto'", param, ctx)
        if n < 0:
            self.fail(f"{n} is negative", param, ctx)
        return n


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hfbconvert")
def main() -> None:
    """Convert pretrained MobileNets to per-layer hybrid ternary filter banks."""


# ------------------------------------------------------------------------ analyze
@main.command()
@click.argument("model")
@_model_opts
@_calib_opts
@click.option("--budgets", default="1,2,4,8,16", show_default=True,
              help="Hidden-unit budgets r per filter (comma-separated).")
@click.option("--threshold", type=FiniteFloat(0.0), default=0.05, show_default=True,
              help="A filter is critical when its loss at --threshold-budget exceeds this.")
@click.option("--threshold-budget", type=click.IntRange(min=1), default=2, show_default=True,
              help="The hidden-unit budget r (one of --budgets) at which --threshold "
                   "classifies filters as critical.")
@click.option("--stats-images", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images used for the input statistics Σ.")
@click.option("--json", "as_json", is_flag=True, help="Print the sensitivity JSON to stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the sensitivity JSON here (reused by compress).")
@click.option("--force", is_flag=True,
              help="Overwrite --output if it is an existing regular file (never the input).")
@_layer_opts
@_device_opt
@_common
@click.pass_context
def analyze(ctx, model, arch, trust_pickle, calib, calib_size, resolution, preset, budgets,
            threshold, threshold_budget, stats_images, as_json, output, force, include,
            exclude, layer_kinds, device, seed, quiet, data_workers):
    """Rank every pointwise filter's sensitivity to ternary StrassenNets approximation.

    MODEL is a checkpoint path or builtin:mobilenet_v2."""
    from .sensitivity import parse_budgets

    _setup(quiet, seed)
    kinds = parse_kinds(layer_kinds)
    try:
        bud = parse_budgets(budgets)
    except ValueError as exc:
        raise InputError(f"--budgets: {exc}") from None
    if threshold_budget not in bud:
        if _explicit(ctx, "threshold_budget"):
            raise InputError(f"--threshold-budget {threshold_budget} is not among --budgets "
                             f"{budgets}; add it there or choose one of them")
        near = min(bud, key=lambda r: (abs(r - threshold_budget), r))
        progress.warn(f"--threshold-budget {threshold_budget} (default) is not among --budgets "
                      f"{budgets}; critical filters are counted at r={near}")
        threshold_budget = near
    if output:
        _outputs([Path(output)], force, [model, calib])
    from .fileio import output_lock

    with output_lock([output] if output else []):
        _analyze(model, arch, trust_pickle, calib, calib_size, resolution, preset, bud,
                 threshold, threshold_budget, stats_images, as_json, output, force,
                 _device(device), seed, include, exclude, kinds, data_workers)


def _analyze(model, arch, trust_pickle, calib, calib_size, resolution, preset, bud,
             threshold, threshold_budget, stats_images, as_json, output, force, device,
             seed, include, exclude, kinds=None, data_workers: int = 0) -> None:
    from .analysis import analyze as run_analyze
    from .fileio import atomic_write_text
    from .report.terminal import print_analysis

    net, info = _load(model, arch, trust_pickle, resolution)
    data, info = _load_calib(calib, info, calib_size, seed, resolution, preset, net,
                             data_workers, device)
    if data is None:
        progress.warn("no --calib data: weight-space sensitivity (Σ = I), not activation-aware")
    res = run_analyze(net, info, data, bud, stats_images, threshold, threshold_budget, seed,
                      source=model, device=device, include=include, exclude=exclude,
                      kinds=kinds)
    text = json.dumps(res, indent=1, allow_nan=False)
    if output:
        atomic_write_text(output, text + "\n", overwrite=force)
        progress.info(f"wrote {output}")
    if as_json:
        click.echo(text)
    else:
        print_analysis(res)


# ------------------------------------------------------------------------ compress
@main.command()
@click.argument("model")
@_model_opts
@_calib_opts
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Compressed model path. Default: next to MODEL, its stem + .hfb.pt "
                   "(builtin:NAME: NAME.hfb.pt in the working folder).")
@click.option("--force", is_flag=True,
              help="Overwrite the output if it is an existing regular file (never the input).")
@click.option("--method", type=click.Choice(["hybrid", "twn", "strassen"]), default="hybrid",
              show_default=True, help="hybrid filter banks, or a baseline.")
@click.option("--budget", type=FiniteFloat(0.0, 1.0, lo_open=True), default=None,
              help="Fraction of the original model's MULs the result may use, in (0, 1]. "
                   "[default: 0.536; not with --critical-fraction]")
@click.option("--max-add-increase", type=FiniteFloat(0.0), default=0.48, show_default=True,
              help="Allowed ADD increase relative to the original model (>= 0; 0.48 = +48%).")
@click.option("--size-budget", type=FiniteFloat(0.0, 1.0, lo_open=True), default=None,
              help="Cap on stored bytes as a fraction of the original float32 weights, "
                   "in (0, 1]; the planner trades hidden units and critical rows for it.")
@click.option("--energy-budget", type=FiniteFloat(0.0, 1.0, lo_open=True), default=None,
              help="Cap on arithmetic energy (cost model) as a fraction of the original "
                   "model's at the same activation bits, in (0, 1]; with "
                   "--activation-bits 8, 1.0 means no more than int8 PTQ.")
@click.option("--energy-model", default="constants", show_default=True,
              metavar="constants|NAME|FILE.yaml",
              help="What prices --energy-budget: 'constants' (the 45 nm arithmetic table), or "
                   "an accelerator (shipped name such as hybrid_int8, or a YAML; "
                   "docs/hardware.md) priced by ZigZag with memory traffic; the budget is "
                   "then a fraction of the original model on that design's equal-area "
                   "MAC-only baseline.")
@click.option("--critical-fraction", type=FiniteFloat(0.0, 1.0), default=None,
              help="Paper-style uniform mode: this fraction of each layer stays full "
                   "precision (replaces --budget; the two are refused together).")
@click.option("--hidden-units-ratio", type=FiniteFloat(1.0), default=1.0,
              show_default=True, help="Hidden units per tolerant filter (uniform/strassen).")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), default=None,
              help="JSON of per-layer overrides {layer: {critical|critical_idx, r}}.")
@click.option("--dry-run", is_flag=True, help="Print the plan and predicted costs; stop.")
@click.option("--steps", type=StepsType(), default="auto", show_default=True,
              help="Distillation fine-tuning steps (ternary codes kept, every continuous "
                   "parameter trained). 'auto': the compute of 300 batches of 32 on "
                   "MobileNetV1-0.5-160 (fewer steps for bigger models), at most 300 and at "
                   "most 6 passes over the calibration images; 0 turns it off. Measured on "
                   "MobileNetV1-0.5-160: 300 steps +0.9 points top-1 over the fit alone.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per fine-tuning step (the global batch: under torchrun it is "
                   "split evenly across the processes, so it must be a multiple of their "
                   "number).")
@click.option("--eval-every", type=click.IntRange(min=0), default=25, show_default=True,
              help="Check the held-apart KL every N fine-tuning steps and keep the best "
                   "state (0: only before and after).")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="Stop the fine-tune after this many checks in a row without a new best "
                   "held-apart KL, once --stop-from allows; the best state is shipped.")
@click.option("--stop-from", type=FiniteFloat(0.0, 1.0), default=1.0, show_default=True,
              help="Stop early only once this fraction of the fine-tuning steps is done "
                   "(1: never; the best check is shipped either way): the first steps at "
                   "full lr raise the held-apart KL, which falls only as the lr decays.")
@click.option("--lr", type=FiniteFloat(0.0, lo_open=True), default=1e-4, show_default=True,
              help="Fine-tuning learning rate (Adam), > 0.")
@_lr_backoff_opt
@_trainable_opt
@click.option("--reconstruct/--no-reconstruct", default=False, show_default=True,
              help="Sequential reconstruction: refit layers in order against the compressed "
                   "network's own inputs. Off by default: on MobileNetV1-0.5-160 the one-shot "
                   "activation-aware fit scored higher (see BENCHMARKS.md).")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="With --reconstruct: each layer sees the compressed network's inputs "
                   "(sequential) or the original's (one-shot).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Set each hybrid layer's bias so its output mean matches the original's "
                   "after the fit (and after each --reconstruct refit); off: the layer keeps "
                   "the original's bias.")
@click.option("--bn-adjust", type=click.Choice(["off", "match", "reestimate"]), default="off",
              show_default=True,
              help="BatchNorm stage for models with BN after the pointwise layers (not "
                   "folded): 'match' resets each such BN's running mean/variance so that, "
                   "on the calibration images, the compressed network's normalized outputs "
                   "have the original's per-channel mean and variance (BN by BN, in network "
                   "order); 'reestimate' recomputes the BN statistics from the calibration "
                   "images (train-mode BN). Free at inference (BN folds into the conv). "
                   "Skipped, with a note, for BN-folded models. Off by default: on CIFAR-10 "
                   "MobileNetV1-0.5 'match' changed top-1 by +0.05 points, 'reestimate' by "
                   "-0.19 (see BENCHMARKS.md).")
@click.option("--min-agreement", type=FiniteFloat(0.0, 1.0), default=0.75, show_default=True,
              help="Exit 1 when the top-1 agreement with the original on the held-apart "
                   "calibration images is below this with 95% confidence (its Wilson "
                   "interval lies wholly below). At the default the gate needs at least "
                   "200 held-apart images (a fifth of --calib, at most); typed explicitly "
                   "it gates on any number. Good conversions measured 0.82-0.96.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted fine-tune from OUTPUT.ckpt (same options only).")
@_device_opt
@click.option("--weight-bits", "weight_bits", type=click.Choice(["32", "16", "8"]),
              default=None,
              help="Bits of everything that stays full precision (critical filters, stem, "
                   "depthwise, classifier): 32, 16 (float16) or 8 (per-channel symmetric "
                   "int8). Biases stay fp32. [default: 16; 8 with --activation-bits 8]")
@click.option("--weight-rounding", type=click.Choice(["nearest", "gptq"]), default="nearest",
              show_default=True,
              help="With 8-bit weights and --calib: gptq picks each layer's int8 codes by "
                   "error feedback against its inputs (GPTQ; same grid, lower output error: "
                   "on MobileNetV2 KL to the original after the int8 weights 0.042 -> 0.029, "
                   "within noise of nearest once activations are int8 too; about 30 s "
                   "more); nearest rounds each weight on its own.")
@click.option("--mean-shift/--no-mean-shift", default=True, show_default=True,
              help="With 8-bit weights and --calib: after rounding, shift each layer's "
                   "output mean back to the original's on the calibration images (folded "
                   "into the bias; free at inference). --no-mean-shift skips it, for weights "
                   "whose rounding already corrects its error (--weight-rounding gptq).")
@click.option("--activation-bits", type=click.Choice(["32", "8"]), default="32",
              show_default=True,
              help="8: int8 activations. BatchNorms are folded, every conv/linear input is "
                   "quantized to uint8 with ranges calibrated on --calib images (MSE-optimal "
                   "clipping), the ternary banks' hidden units stay int32 (--hidden-bits), "
                   "and fine-tuning runs with the quantizers in the loop. Export writes the "
                   "quantizers as float arithmetic (--qdq for QuantizeLinear/Dequantize"
                   "Linear). Needs --calib and 8-bit weights. Closest to FP32 on "
                   "MobileNetV2 (BatchNorm not folded): --no-qat --trainable norm "
                   "--weight-rounding gptq --no-mean-shift (BENCHMARKS.md, seeds suite).")
@click.option("--hidden-bits", type=click.Choice(["32", "8"]), default="32",
              show_default=True,
              help="With --activation-bits 8: the ternary banks' hidden units a*(W_b x). "
                   "32: int32 at one common fixed-point scale (exact; W_c adds int32 "
                   "values, no extra operation). 8: requantized to uint8 with power-of-two "
                   "scales, for targets that keep every stored activation 8-bit (measured: "
                   "-0.6 points top-1 on MobileNetV1-0.5-160).")
@click.option("--qat/--no-qat", default=True, show_default=True,
              help="With --activation-bits 8 and a fine-tune: --qat fine-tunes after the "
                   "int8 stages with the quantizers in the forward (straight-through); "
                   "--no-qat fine-tunes in float first, then rounds the weights, corrects "
                   "the means and calibrates the activations (no fake quantization in the "
                   "training steps: faster). Measured: BENCHMARKS.md, int8 suite.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary to stdout (with schema_version).")
@_layer_opts
@_common
@click.pass_context
def compress(ctx, model, arch, trust_pickle, calib, calib_size, resolution, preset, output,
             force, method, budget, max_add_increase, size_budget, energy_budget,
             energy_model,
             critical_fraction, hidden_units_ratio, plan_file, dry_run, steps, batch_size,
             eval_every, patience, stop_from, lr, lr_backoff, trainable, reconstruct, sequential,
             bias_correction,
             bn_adjust, min_agreement, resume,
             device, weight_bits, weight_rounding, mean_shift, activation_bits,
             hidden_bits, qat, as_json, include,
             exclude, layer_kinds, seed, quiet, data_workers):
    """Split pointwise layers into full-precision critical filters + ternary banks under a
    MUL budget (activation-aware fit), then fine-tune briefly by distillation.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m hfbconvert.cli compress ...) the
    fine-tune runs on PyTorch DDP (gloo on CPU, nccl on CUDA); rank 0 writes and prints."""
    import time

    from . import distributed
    from .fileio import output_lock
    from .pipeline import validate_config

    t_cmd = time.perf_counter()
    _setup(quiet, seed)
    main_rank = distributed.is_main()
    cfg = compress_config(ctx.params)  # every option check, before any work
    device = cfg.finetune.device
    if distributed.is_distributed() and not dry_run:
        distributed.check_batch(batch_size)
    if energy_model != "constants":
        from .hw.spec import load_design

        if energy_budget is None:
            raise InputError("--energy-model prices --energy-budget; give --energy-budget too")
        load_design(energy_model, "energy_model")  # a bad accelerator file fails before any work
    validate_config(cfg, has_data=calib is not None)  # before loading anything
    override = _read_plan(plan_file) if plan_file else None
    # the model first: a missing MODEL is reported as such, not as its default output
    net, info = _load(model, arch, trust_pickle, resolution)
    out = Path(output) if output else _default_out(model)
    if not dry_run and not (resume and out.exists() and force):
        _outputs([out], force, [model, calib, plan_file])
    # rank 0 alone holds the lock: it alone writes the output and the checkpoint
    with distributed.session(device), \
            output_lock([] if dry_run or not main_rank else [out]):
        data, info = _load_calib(calib, info, calib_size, seed, resolution, preset, net,
                                 data_workers, device)
        if data is None:
            progress.warn("no --calib data: weight-space fit only, no reconstruction or "
                          "fine-tune")
        _compress(net, info, data, cfg, model, out, force, resume, override, plan_file,
                  dry_run, as_json, gate_always=_explicit(ctx, "min_agreement"), t_cmd=t_cmd)


def compress_config(params: dict[str, Any]) -> Any:
    """The :class:`~hfbconvert.pipeline.CompressConfig` that ``compress``'s options (click's
    ``ctx.params``) ask for. An option left at its default leaves the library's default:
    ``--weight-bits`` unset passes None (16, or 8 with int8 activations, decided by the
    library); tests/test_config_defaults.py checks that every default agrees."""
    from .distill import FinetuneConfig
    from .pipeline import CompressConfig

    p = params
    kinds = parse_kinds(p["layer_kinds"])  # before any work, as every option check
    device = _device(p["device"])  # before any work: --device cuda without CUDA is refused
    if p["critical_fraction"] is not None and p["budget"] is not None:
        raise InputError("--critical-fraction replaces --budget (uniform mode); give one")
    budget = CompressConfig.budget if p["budget"] is None else p["budget"]
    wb = p["weight_bits"]
    return CompressConfig(
        method=p["method"], budget=budget, critical_fraction=p["critical_fraction"],
        hidden_units_ratio=p["hidden_units_ratio"], max_add_increase=p["max_add_increase"],
        size_budget=p["size_budget"], energy_budget=p["energy_budget"],
        energy_model=p["energy_model"], reconstruct=p["reconstruct"],
        sequential=p["sequential"], bias_correction=p["bias_correction"],
        bn_adjust=p["bn_adjust"], min_agreement=p["min_agreement"], seed=p["seed"],
        include=tuple(p["include"]), exclude=tuple(p["exclude"]), layer_kinds=kinds,
        finetune=FinetuneConfig(steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                                seed=p["seed"], eval_every=p["eval_every"],
                                patience=p["patience"], stop_from=p["stop_from"],
                                lr_backoff=p["lr_backoff"], trainable=p["trainable"],
                                device=device),
        weight_bits=None if wb is None else int(wb), weight_rounding=p["weight_rounding"],
        mean_shift=p["mean_shift"], activation_bits=int(p["activation_bits"]),
        hidden_bits=int(p["hidden_bits"]), qat=p["qat"])


def _compress(net, info, data, cfg, model: str, out: Path, force: bool, resume: bool,
              override, plan_file, dry_run: bool, as_json: bool, gate_always: bool,
              t_cmd: float | None = None) -> None:
    """Run the conversion, write the artifact, print, and apply the agreement gate (under
    torchrun: every rank converts, rank 0 writes and prints)."""
    import time

    from .artifact import save_compressed
    from .distributed import is_main
    from .pipeline import compress as run_compress
    from .report.terminal import print_compress, print_plan
    from .stages import close_timings

    ckpt = str(out) + ".ckpt"
    t_run = time.perf_counter()
    try:
        hybrid, meta = run_compress(net, info, data, cfg, checkpoint=ckpt, resume=resume,
                                    plan_override=override, dry_run=dry_run)
    except ConfigError as exc:
        if plan_file and exc.field == "plan_override":  # name the file the user gave
            names = {"plan_override": str(plan_file)}
            raise InputError(exc.render(lambda f: names.get(f) or _flag(f))) from None
        raise
    if not is_main():  # it shared the fine-tune; rank 0 finishes, writes and gates
        return
    if dry_run:
        if as_json:
            _emit_json({"schema_version": JSON_SCHEMA_VERSION, "plan": meta["plan"]})
        else:
            print_plan(meta["plan"])
        return
    timings = meta.pop("timings")
    timings.pop("total_s", None)
    timings.pop("other_s", None)
    if t_cmd is not None:  # loading the model and the images, taking the lock
        timings = {"load_s": t_run - t_cmd, **timings}
    saved = _artifact_meta(meta, model)
    t_write = time.perf_counter()
    save_compressed(out, hybrid, info, saved, overwrite=force)
    Path(ckpt).unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t_write
    close_timings(timings, time.perf_counter() - (t_run if t_cmd is None else t_cmd))
    summary = {"schema_version": JSON_SCHEMA_VERSION, "output": str(out),
               "stages": meta["stages"], "timings": timings,
               "cost": meta["cost"]["totals"], "original_cost": meta["original_cost"]["totals"],
               "final_agreement": meta.get("final_agreement"),
               "final_agreement_interval": meta.get("final_agreement_interval"),
               "finetune": _finetune_json(meta)}
    if as_json:
        _emit_json(summary)
    else:
        print_compress(meta, timings, str(out))
    _agreement_gate(meta, cfg.min_agreement, gate_always, out)
    _cap_gate(meta, out)


def _finetune_json(meta: dict) -> dict | None:
    """The fine-tune's held-apart curve for ``compress --json`` (None: no fine-tune ran):
    what a user tuning ``--steps`` or ``--lr`` reads to see whether it helped."""
    log = meta.get("finetune_log")
    if not log:
        return None
    return {"steps_run": log["steps"][-1] + 1 if log["steps"] else 0,
            "best_step": log.get("best_step"), "stopped_early_at": log.get("stopped_early_at"),
            "reverted": meta.get("finetune_reverted"), "lr_cuts": log.get("lr_cuts", []),
            "curve": {k: log.get(k, []) for k in ("eval_steps", "held_kl", "held_agreement",
                                                   "held_top1")}}


def _cap_gate(meta: dict, out: Path) -> None:
    """Exit 1 when the planner's layout missed an enforced cap on the fitted model, as the
    agreement gate does for --min-agreement: the file is written, the run says it failed,
    naming every cap missed. ADDs: counted from the fitted codes after the pipeline's
    re-plans (``meta["add_cap"]``); energy: priced as the report prices it
    (``meta["energy_cap"]``). A plan given with --plan or a uniform method is not held."""
    from .errors import CheckFailed

    missed, advice = [], []
    add = meta.get("add_cap") or {}
    if add.get("enforced") and add.get("met") is False:
        missed.append(
            f"needs {add['ratio']:.3f}x the original's ADDs, over --max-add-increase "
            f"{add['max_add_increase']:g} ({1 + add['max_add_increase']:.3f}x), after "
            f"{add.get('repair_rounds', 0)} re-plan(s) with the measured ternary densities")
        advice.append("--budget or --max-add-increase")
    energy = meta.get("energy_cap") or {}
    if energy.get("enforced") and energy.get("met") is False:
        missed.append(
            f"uses {energy['fraction_used']:.1%} of the original's energy "
            f"({energy.get('energy_model')}), over --energy-budget {energy['energy_budget']:g}")
        advice.append("--energy-budget")
    if missed:
        raise CheckFailed(f"{out}: the compressed model {'; and '.join(missed)}; the file was "
                          f"written, but try a larger {' or '.join(advice)}")


def _artifact_meta(meta: dict, model: str) -> dict:
    """Add the source model and versions to ``meta``; returns what the artifact stores
    (wall-clock seconds stay out of the file: same inputs + seed = same bytes)."""
    meta["source_model"] = model
    if Path(model).is_file():
        from .fileio import file_sha256

        meta["source_sha256"] = file_sha256(model)
    meta["versions"] = _versions()
    return dict(meta, stages=[{k: v for k, v in st.items() if k != "seconds"}
                              for st in meta["stages"]])


GATE_MIN_IMAGES = 200


def _agreement_gate(meta: dict, threshold: float, gate_always: bool, out: Path) -> None:
    """Exit 1 only when the held-apart agreement is below ``threshold`` beyond its 95%
    interval, on enough images to mean something (or on any number when asked)."""
    from .errors import CheckFailed

    ag, iv = meta.get("final_agreement"), meta.get("final_agreement_interval")
    if threshold <= 0:
        return
    if ag is None or not iv:
        progress.warn("agreement not measured (needs --calib with at least 20 images); "
                      "--min-agreement was not checked")
        return
    n, (lo, hi) = iv["n"], iv["ci95"]
    if n < GATE_MIN_IMAGES and not gate_always:
        progress.warn(f"agreement {ag:.3f} on only {n} held-apart images (95% interval "
                      f"{lo:.2f}-{hi:.2f}); too few to gate on, --min-agreement {threshold} "
                      f"not checked (give >= {GATE_MIN_IMAGES * 5} --calib images, or type "
                      "--min-agreement to gate anyway)")
        return
    if hi < threshold:
        raise CheckFailed(
            f"{out}: the compressed model changes the original's top-1 answer on about "
            f"{1 - ag:.0%} of {n} held-apart images (agreement {ag:.3f}, 95% interval "
            f"{lo:.2f}-{hi:.2f}, below --min-agreement {threshold}); the file was written, "
            "but try a larger --budget, more --calib images or more --steps")


def _default_out(model: str) -> Path:
    if model.startswith("builtin:"):
        return Path(model.split(":", 1)[1] + ".hfb.pt")
    p = Path(model)
    return p.with_name(p.stem + ".hfb.pt")


def _read_json(path: str) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None


_PLAN_KEYS = {"critical": "an integer", "critical_idx": "a list of integers",
              "r": "an integer"}


def _read_plan(path: str) -> dict:
    """``--plan`` JSON, checked for shape here so that a bad file is one clear line."""
    obj = _read_json(path)
    entries = obj.get("layers", obj) if isinstance(obj, dict) else obj
    if not isinstance(entries, dict):
        raise InputError(f"{path}: expected a JSON object mapping layer names to settings, "
                         f"got {type(entries).__name__}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name, spec in entries.items():
        if not isinstance(spec, dict):
            raise InputError(f"{path}: {name}: expected an object like "
                             f'{{"critical": 8, "r": 24}}, got {json.dumps(spec)[:40]}')
        unknown = sorted(set(spec) - set(_PLAN_KEYS))
        if unknown:
            raise InputError(f"{path}: {name}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(_PLAN_KEYS)}")
        for key, what in _PLAN_KEYS.items():
            if key not in spec:
                continue
            v = spec[key]
            ok = (isinstance(v, list) and all(is_int(i) for i in v)) if key == "critical_idx" \
                else is_int(v)
            if not ok or (key != "critical_idx" and v < 0):
                raise InputError(f"{path}: {name}: {key} must be {what} >= 0, got "
                                 f"{json.dumps(v)[:40]}")
    return obj


def _versions() -> dict:
    import onnx
    import torch

    # str(): torch.__version__ is a TorchVersion, which weights-only loading refuses
    return {"hfbconvert": __version__, "torch": str(torch.__version__),
            "onnx": str(onnx.__version__)}


# ------------------------------------------------------------------------ finetune
@main.command("finetune")
@_workers_opt
@click.argument("compressed")
@click.option("--data", "data_path", required=True, metavar="TRAIN_DIR",
              help="Labelled training images: an ImageFolder (class folders named as the "
                   "model's classes, or ImageNet wnids; mapped as eval --data maps them) or "
                   "an .npz with integer labels. A seeded --held-fraction is held apart.")
@click.option("--data-size", "size", type=click.IntRange(min=1), default=None,
              help="Use a seeded random subset of N of the --data images.")
@click.option("--epochs", type=click.IntRange(min=1), required=True,
              help="Passes over the training images (steps = epochs x images / batch; each "
                   "step draws a seeded random batch).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="New compressed model (default: COMPRESSED's stem + .ft.hfb.pt); never "
                   "the input.")
@click.option("--force", is_flag=True,
              help="Overwrite the output if it is an existing regular file (never the input).")
@click.option("--teacher", default=None, metavar="MODEL",
              help="The original model to distill from (default: the source model the "
                   "artifact records, loaded without pickle).")
@click.option("--learn-codes/--freeze-codes", default=False, show_default=True,
              help="Also learn the ternary codes (latent codes, straight-through rounding "
                   "at ±0.5, frozen at the end). Changes the ADD count the plan was made for; "
                   "the new cost is recorded.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per step (the global batch: under torchrun split across the "
                   "processes, so a multiple of their number).")
@click.option("--lr", type=FiniteFloat(0.0, lo_open=True), default=1e-4, show_default=True,
              help="Learning rate (Adam) of the continuous parameters, > 0.")
@click.option("--latent-lr", type=FiniteFloat(0.0, lo_open=True), default=2e-3,
              show_default=True, help="Learning rate of the latent codes (--learn-codes).")
@click.option("--label-weight", type=FiniteFloat(0.0), default=1.0, show_default=True,
              help="Weight of the cross-entropy on the labels next to the distillation "
                   "terms (0: distillation only).")
@click.option("--held-fraction", type=FiniteFloat(0.0, 1.0, lo_open=True), default=0.1,
              show_default=True,
              help="Fraction of --data held apart for the curve and early stopping (raised "
                   "towards 200 images while at most a fifth of the data).")
@click.option("--eval-every", type=click.IntRange(min=0), default=25, show_default=True,
              help="Check held KL / agreement / top-1 every N steps and keep the best state "
                   "(0: only before and after).")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="Stop after this many checks in a row without a new best (by "
                   "--stop-on); the best state is shipped.")
@click.option("--stop-from", type=FiniteFloat(0.0, 1.0), default=0.5, show_default=True,
              help="Stop early only once this fraction of the fine-tuning steps is done "
                   "(0: from the first check): the first steps at full lr can raise the "
                   "held-apart KL before lowering it.")
@_lr_backoff_opt
@_trainable_opt
@click.option("--stop-on", type=click.Choice(["auto", "kl", "loss", "top1"]), default="auto",
              show_default=True,
              help="What ranks the held-apart checks: kl (KL to the teacher), loss (KL + "
                   "--label-weight x cross-entropy with the labels, the training "
                   "objective), top1. auto: loss when --label-weight > 0, else kl (labels "
                   "pull the student away from the teacher, so its KL rises as it learns).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Write OUTPUT.ckpt every N steps (for --resume).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUTPUT.ckpt (refused when any option "
                   "or input differs).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary to stdout (schema: hfbconvert/schemas/finetune.json).")
@_source_opt
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a fully pickled --teacher / --source-model (runs code "
                   "from the file).")
@_device_opt
@_common
def finetune_cmd(compressed, data_path, size, epochs, output, force, teacher, learn_codes,
                 batch_size, lr, latent_lr, label_weight, held_fraction, eval_every, patience,
                 stop_from, lr_backoff, trainable, stop_on, checkpoint_every, resume, as_json,
                 source_model, trust_pickle, device, seed, quiet, data_workers):
    """Fine-tune a compressed model further on labelled data: distillation from the
    original plus cross-entropy on the labels, optionally learning the ternary codes, with
    early stopping on a held-apart split; writes a new artifact whose report shows the
    curve. Under torchrun it runs on PyTorch DDP like compress (rank 0 writes and prints)."""
    import time

    from . import distributed
    from .artifact import save_compressed
    from .fileio import output_lock
    from .retrain import RetrainConfig, retrain

    t0 = time.perf_counter()
    _setup(quiet, seed)
    device = _device(device)  # before any work
    if distributed.is_distributed():
        distributed.check_batch(batch_size)
    if compressed.lower().endswith(".onnx"):
        raise InputError(f"{compressed}: an ONNX file cannot be fine-tuned; pass the .hfb.pt")
    out = Path(output) if output else _ft_out(compressed)
    if not (resume and out.exists() and force):
        _outputs([out], force, [compressed, data_path, teacher, source_model])
    net, info, meta = _load_any(compressed, None, trust_pickle, source_model)
    if meta is None:
        raise InputError(f"{compressed}: not an hfbconvert compressed model (.hfb.pt); "
                         "compress it first")
    src, ref = _ft_teacher(compressed, meta, info, teacher, source_model, trust_pickle)
    cfg = RetrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, latent_lr=latent_lr,
                        label_weight=label_weight, learn_codes=learn_codes,
                        held_fraction=held_fraction, eval_every=eval_every,
                        patience=patience, stop_from=stop_from, lr_backoff=lr_backoff,
                        trainable=trainable, stop_on=stop_on, seed=seed)
    main_rank = distributed.is_main()
    ckpt = str(out) + ".ckpt"
    with distributed.session(device), output_lock([out] if main_rank else []):
        data = _eval_data(compressed, info, data_path, size, seed, data_workers)
        t_run = time.perf_counter()
        model, new_meta, log = retrain(net, info, meta, ref, data, cfg, device=device,
                                       checkpoint=ckpt, checkpoint_every=checkpoint_every,
                                       resume=resume, source=compressed)
        if not main_rank:
            return
        _stamp_finetuned(new_meta, compressed)
        t_write = time.perf_counter()
        save_compressed(out, model, info, new_meta, overwrite=force)
        Path(ckpt).unlink(missing_ok=True)
        timings = {"load_s": t_run - t0, "finetune_s": t_write - t_run,
                   "write_s": time.perf_counter() - t_write}
    if as_json:
        _emit_json(_finetune_summary(out, compressed, src, new_meta, timings))
    else:
        _print_finetune(out, new_meta["finetune_curve"])


def _stamp_finetuned(new_meta: dict, compressed: str) -> None:
    """Record where a fine-tuned artifact came from (path, checksum) and the versions."""
    new_meta["finetuned_from"] = compressed
    if Path(compressed).is_file():
        from .fileio import file_sha256

        new_meta["finetuned_from_sha256"] = file_sha256(compressed)
    new_meta["versions"] = _versions()


def _finetune_summary(out: Path, compressed: str, src: str, new_meta: dict,
                      timings: dict) -> dict:
    """``finetune --json`` (schema finetune.json)."""
    curve = new_meta["finetune_curve"]
    return {"schema_version": JSON_SCHEMA_VERSION, "output": str(out), "input": compressed,
            "teacher": src, **{k: curve[k] for k in (
                "epochs", "steps_planned", "steps_run", "best_step", "stopped_early_at",
                "stop_on", "lr_cuts",
                "learn_codes", "train_images", "held_images", "world_size")},
            "curve": {k: curve[k] for k in ("steps", "held_kl", "held_agreement",
                                            "held_top1", "held_ce")},
            "final": curve["final"], "cost": new_meta["cost"]["totals"], "timings": timings}


def _ft_teacher(compressed: str, meta: dict, info, teacher: str | None,
                source_model: str | None, trust_pickle: bool) -> tuple[str, Any]:
    """(where the teacher comes from, the teacher): ``--teacher``, else ``--source-model``,
    else the source model the artifact records; refused when missing or of another
    number of classes."""
    src = teacher or source_model or meta.get("source_model")
    if not src:
        raise InputError(f"{compressed}: records no source model; pass --teacher")
    if not teacher and not source_model and not src.startswith("builtin:") \
            and not Path(src).exists():
        raise InputError(f"{compressed}: its source model {src} is not found from here; "
                         "pass --teacher")
    ref, ref_info, _ = _eval_load(src, None, trust_pickle and bool(teacher or source_model),
                                  compressed_ok=False, need_resolution=False)
    if ref_info.num_classes != info.num_classes:
        raise InputError(f"teacher {src} has {ref_info.num_classes} classes but {compressed} "
                         f"has {info.num_classes}")
    return src, ref


def _print_finetune(out: Path, curve: dict) -> None:
    """The fine-tune's curve on stdout: steps run, each check, the state shipped."""
    click.echo(f"{out}: {curve['steps_run']} of {curve['steps_planned']} steps "
               f"({curve['train_images']} training images, {curve['held_images']} held apart)"
               + (f", stopped early at {curve['stopped_early_at']}"
                  if curve["stopped_early_at"] else "")
               + f", best state at step {curve['best_step']}")
    cuts = {c["step"]: c for c in curve.get("lr_cuts") or []}
    for st, kl, ag, t1 in zip(*(curve[k] for k in ("steps", "held_kl", "held_agreement",
                                                   "held_top1")), strict=True):
        c = cuts.get(st)
        click.echo(f"  step {st:>6}  held KL {kl:.4f}  agreement {ag:.4f}"
                   + (f"  top-1 {t1:.4f}" if t1 is not None else "")
                   + (f"  (training loss x{c['rise']:.2f}: lr cut to x{c['lr_scale']:g}"
                      + (f", back to step {c['restored_step']})"
                         if c["restored_step"] is not None else ")") if c else ""))
    f = curve["final"]
    click.echo(f"  shipped: held KL {f['held_kl']:.4f}  agreement {f['held_agreement']:.4f}"
               + (f"  top-1 {f['held_top1']:.4f}" if f["held_top1"] is not None else ""))


def _ft_out(compressed: str) -> Path:
    p = Path(compressed)
    stem = p.name[:-len(".hfb.pt")] if p.name.endswith(".hfb.pt") else p.stem
    return p.with_name(stem + ".ft.hfb.pt")


# ------------------------------------------------------------------------ eval
@main.command("eval")
@click.argument("model", required=False)
@_model_opts
@click.option("--data", "data_path", required=True,
              help="Labelled ImageFolder (class folders named as the model's classes, or "
                   "ImageNet wnids) or .npz with integer labels.")
@click.option("--data-size", "size", type=click.IntRange(min=1), default=None,
              help="Use a seeded random subset of N of the --data images.")
@click.option("--original", default=None,
              help="Original model for agreement (default: the compressed model's recorded "
                   "source, loaded without pickle: --trust-pickle covers only files named "
                   "on the command line).")
@click.option("--compare", nargs=2, default=None, metavar="A B",
              help="Instead of MODEL: compare two models on the same images, paired (top-1 "
                   "difference with a bootstrap interval, McNemar's exact test, agreement, "
                   "KL(A||B)). Both need the same classes and preprocessing.")
@click.option("--per-image", is_flag=True,
              help="With --json: add per-image results (correctness bits as hex, predicted "
                   "classes as base64 uint16) so later runs can be compared paired.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the metrics as JSON to stdout (with schema_version; schema in "
                   "hfbconvert/schemas/eval.json, eval-compare.json with --compare).")
@click.option("--resolution", type=click.IntRange(8, 4096), default=None,
              help="Input side in pixels (default: the model's own; needed for a custom "
                   "pickled module).")
@_source_opt
@_device_opt
@_common
def eval_cmd(model, arch, trust_pickle, data_path, size, original, compare, per_image, as_json,
             resolution, source_model, device, seed, quiet):
    """Top-1/top-5, and top-1 agreement and KL with the original model, each with a 95%
    bootstrap interval over images.

    MODEL is a checkpoint, a compressed .hfb.pt, or an exported .onnx (run with
    onnxruntime, preprocessing from its metadata)."""
    from .evaluation import evaluate_per_image, per_image_record, summarize

    _setup(quiet, seed)
    device = _device(device)  # before any work: cuda without CUDA is refused here
    if compare:
        if model or original:
            raise click.UsageError("--compare A B takes the place of MODEL and --original")
        return _eval_compare(compare, arch, trust_pickle, data_path, size, as_json, device,
                             seed)
    if not model:
        raise click.UsageError("missing MODEL (or --compare A B)")
    ref = None
    net, info, meta = _eval_load(model, arch, trust_pickle, compressed_ok=True,
                                 resolution=resolution, source_model=source_model)
    # the original: named with --original, else the --source-model the artifact was
    # rebuilt on, else the path recorded in the artifact (never unpickled)
    original = original or source_model
    src = original or (meta or {}).get("source_model")
    if src and not original and not src.startswith("builtin:") and not Path(src).exists():
        progress.warn(f"{model}: its source model {src} is not found from here; no agreement "
                      "(pass --original)")
        src = None
    if src:
        # trust covers what the user typed, never a path recorded inside a file
        ref, ref_info, _ = _eval_load(src, None, trust_pickle and bool(original),
                                      compressed_ok=False, need_resolution=False)
        if ref_info.num_classes != info.num_classes:
            which = "--original" if original else "source model"
            raise InputError(f"{which} {src} has {ref_info.num_classes} classes but "
                             f"{model} has {info.num_classes}: top-1 agreement between them "
                             "means nothing")
    data = _eval_data(model, info, data_path, size, seed)
    per = evaluate_per_image(net, data, info.label_offset, reference=ref,
                             device=_device(device))
    res: dict[str, Any] = {"schema_version": JSON_SCHEMA_VERSION, **summarize(per, seed=seed)}
    if per_image:
        res["per_image"] = per_image_record(per, data)
    if as_json:
        _emit_json(res)
        return
    parts = []
    for k, ci_key in (("top1", "top1_ci95"), ("top5", None), ("agreement", "agreement_ci95")):
        if res[k] is not None:
            ci = f" [{res[ci_key][0]:.4f}, {res[ci_key][1]:.4f}]" if ci_key else ""
            parts.append(f"{k} {res[k]:.4f}{ci}")
    if res["kl"] is not None:
        parts.append(f"kl {res['kl']:.4f} "
                     f"[{res['kl_ci95'][0]:.4f}, {res['kl_ci95'][1]:.4f}]")
    click.echo(f"{model}: n {res['n']}  " + "  ".join(parts))
    if parts:
        click.echo("  [95% intervals: bootstrap over images; kl: mean KL(original||model), "
                   "nats]")


def _eval_compare(paths: tuple[str, str], arch, trust_pickle: bool, data_path: str,
                  size: int | None, as_json: bool, device: str, seed: int) -> None:
    """``eval --compare A B``: both models on the same images in one pass. Different
    preprocessing is refused rather than run twice: a paired difference should come from
    identical inputs, and a model exported with other preprocessing is usually a mistake."""
    from hfbconvert.calib.presets import preset_for

    from .evaluation import compare_summary, evaluate_per_image

    a_path, b_path = paths
    net_a, info_a, _ = _eval_load(a_path, arch, trust_pickle, compressed_ok=True)
    net_b, info_b, _ = _eval_load(b_path, arch, trust_pickle, compressed_ok=True)
    if info_a.num_classes != info_b.num_classes:
        raise InputError(f"--compare: {a_path} has {info_a.num_classes} classes but {b_path} "
                         f"has {info_b.num_classes}: they cannot be compared image by image")
    if info_a.label_offset != info_b.label_offset:
        raise InputError(f"--compare: {a_path} has label offset {info_a.label_offset} but "
                         f"{b_path} has {info_b.label_offset}")
    if info_a.classes and info_b.classes and \
            [c.lower() for c in info_a.classes] != [c.lower() for c in info_b.classes]:
        raise InputError(f"--compare: {a_path} and {b_path} name their classes differently")
    pa, pb = preset_for(info_a), preset_for(info_b)
    if pa != pb:
        diff = ", ".join(f"{f} {getattr(pa, f)} vs {getattr(pb, f)}"
                         for f in ("resolution", "mean", "std", "crop", "resize_mode")
                         if getattr(pa, f) != getattr(pb, f))
        raise InputError(f"--compare: {a_path} and {b_path} expect different preprocessing "
                         f"({diff}); compare models that read the same inputs")
    info = info_a if info_a.classes or not info_b.classes else info_b
    data = _eval_data(a_path if info is info_a else b_path, info, data_path, size, seed)
    # B is "the model", A the reference: KL(A || B), agreement of B with A
    per = evaluate_per_image(net_b, data, info.label_offset, reference=net_a,
                             device=_device(device))
    res: dict[str, Any] = {"schema_version": JSON_SCHEMA_VERSION,
                           **compare_summary(per, a_path, b_path, seed=seed)}
    res["preprocessing"] = {f: getattr(pa, f) for f in ("resolution", "mean", "std", "crop",
                                                        "resize_mode")}
    if as_json:
        _emit_json(res)
        return
    for tag in ("a", "b"):
        m = res[tag]
        top = "top-1 —(no labels)" if m["top1"] is None else \
            f"top-1 {100 * m['top1']:.2f}% [{100 * m['top1_ci95'][0]:.2f}, " \
            f"{100 * m['top1_ci95'][1]:.2f}]"
        click.echo(f"{tag.upper()}: {m['model']}  {top}")
    click.echo(f"n {res['n']} images, same preprocessing for both; 95% intervals: bootstrap "
               f"over images ({res['resamples']} resamples, seed {res['seed']})")
    d = res["difference"]
    if d is not None:
        click.echo(f"A - B top-1: {100 * d['top1']:+.2f} points [{100 * d['ci95'][0]:+.2f}, "
                   f"{100 * d['ci95'][1]:+.2f}] paired: {d['verdict']}")
        click.echo(f"McNemar exact: p = {d['mcnemar_p']:.3g} (only A right on "
                   f"{d['a_only_correct']} images, only B on {d['b_only_correct']})")
    click.echo(f"agreement A/B: {100 * res['agreement']:.2f}% "
               f"[{100 * res['agreement_ci95'][0]:.2f}, {100 * res['agreement_ci95'][1]:.2f}]")
    click.echo(f"KL(A||B): {res['kl']:.4f} nats [{res['kl_ci95'][0]:.4f}, "
               f"{res['kl_ci95'][1]:.4f}]")


def _eval_load(path: str, arch: str | None, trust_pickle: bool, compressed_ok: bool,
               resolution: int | None = None, source_model: str | None = None,
               need_resolution: bool = True):
    """``(net, info, meta)`` for eval: an ``.onnx`` file (onnxruntime; ModelInfo from its
    metadata), a compressed artifact (when ``compressed_ok``) or any model ``_load``
    takes; ``meta`` is the artifact's metadata, else None."""
    if path.lower().endswith(".onnx"):
        import torch

        from .evaluation import load_onnx_for_eval

        return (*load_onnx_for_eval(path, threads=torch.get_num_threads()), None)
    if compressed_ok:
        net, info, meta = _load_any(path, arch, trust_pickle, source_model,
                                    resolution=resolution)
        return net, info, meta
    return (*_load(path, arch, trust_pickle, resolution, need_resolution), None)


def _eval_data(model: str, info, data_path: str, size: int | None, seed: int,
               workers: int = 0):
    """``--data`` with labels in the model's class order: class folders are matched to the
    model's class names, or to ImageNet wnids for an unnamed 1000-class model (an
    unmatched folder is an error); only a model with neither gets sorted folder order,
    with a warning. An ``.npz``'s integer labels are used as they are. ``workers``:
    ``--data-workers``, carried by the data (``CalibData.workers``)."""
    from hfbconvert.calib.imagenet import imagenet_wnids
    from hfbconvert.calib.presets import preset_for
    from hfbconvert.calib.readers import load_images

    kw: dict[str, Any] = {}
    n_labels = int(info.num_classes) - int(info.label_offset)
    if info.classes:
        kw = {"classes": list(info.classes),
              "classes_origin": f"{model}'s {len(info.classes)} class names"}
    elif n_labels == len(imagenet_wnids()):
        kw = {"classes": list(imagenet_wnids()),
              "classes_origin": f"the ImageNet class ids (wnids) of {model}'s 1000 classes"}
    with progress.task("reading images", None):
        data = load_images(data_path, preset_for(info), size=size, seed=seed,
                           loader_workers=workers, **kw)
    if data.skipped:
        progress.warn(f"{data_path}: skipped {data.skipped} unreadable image(s)"
                      + (f", e.g. {data.skipped_examples[0]}" if data.skipped_examples else ""))
    if not kw and data.labels is not None and Path(data_path).is_dir():
        progress.warn(f"{model} has no class names: label i is the i-th class folder of "
                      f"{data_path} in sorted order, which may not be the model's class i")
    return data


# ------------------------------------------------------------------------ export
@main.group()
def export() -> None:
    """Export a model to a deployment format."""


def _verify_images(calib: str | None, info, calib_size: int, seed: int, net,
                   device: str = "cpu") -> Any:
    """Normalized images to verify an export on: a seeded subset of ``calib`` (synthetic
    ones optimised on ``device``), else seeded random inputs."""
    import torch

    if calib:
        data, _ = _load_calib(calib, info, calib_size, seed, None, None, net, device=device)
        return data.normalized()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(calib_size, 3, info.resolution, info.resolution, generator=g)


@export.command("onnx")
@click.argument("model")
@_model_opts
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The .onnx file to write (written only once it verifies).")
@click.option("--force", is_flag=True,
              help="Overwrite the output and its report files if they are existing regular "
                   "files (never the input).")
@click.option("--opset", type=click.IntRange(17, 22), default=17, show_default=True,
              help="ONNX opset of the default domain, 17-22.")
@click.option("--pack", type=click.Choice(["2bit", "base3"]), default="2bit", show_default=True,
              help="Storage of the ternary codes: 2bit = four codes per byte (2.0 bits each, "
                   "simplest to unpack); base3 = five codes per byte (1.6 bits each, ~20% "
                   "smaller ternary weights, a few more ops to unpack).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare onnxruntime with PyTorch on calibration images before the file "
                   "takes its name; a failing file is kept as NAME.unverified.onnx.")
@click.option("--qdq/--no-qdq", default=False, show_default=True,
              help="int8-activation models: write the activation quantizers as standard "
                   "QuantizeLinear/DequantizeLinear (onnxruntime fuses them into its int8 "
                   "kernels, which requantize in integer arithmetic: logits may differ "
                   "beyond float rounding and verification may fail) instead of the same "
                   "arithmetic as plain float ops (matches PyTorch).")
@click.option("--calib", default=None, metavar="PATH",
              help="Images for verification (default: seeded random inputs).")
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Verification images (a seeded subset of --calib).")
@click.option("--report/--no-report", "write_report", default=True, show_default=True,
              help="Write OUTPUT_STEM.report.json/.md/.html next to the ONNX file "
                   "(compressed models), e.g. m.report.json for -o m.onnx.")
@click.option("--json", "as_json", is_flag=True,
              help="Print export statistics and verification as JSON to stdout.")
@click.option("--resolution", type=click.IntRange(8, 4096), default=None,
              help="Input side in pixels of a plain MODEL (default: the model's own; needed "
                   "for a custom pickled module).")
@_source_opt
@_device_opt
@_common
def export_onnx_cmd(model, arch, trust_pickle, output, force, opset, pack, verify, qdq, calib,
                    calib_size, write_report, as_json, resolution, source_model, device, seed,
                    quiet):
    """Export a compressed (or plain) model to ONNX with hfb custom ops (ONNX functions,
    so stock onnxruntime runs the file unmodified)."""
    from .errors import CheckFailed
    from .fileio import output_lock

    _setup(quiet, seed)
    dev = _device(device)  # before any work: cuda without CUDA is refused here
    out = Path(output)
    _outputs([out], force, [model, calib, source_model])
    net, info, meta = _load_any(model, arch, trust_pickle, source_model, resolution)
    meta = meta or {}
    from .report import export_report_stem, report_paths

    # named after the ONNX file: two models exported into one folder keep one report each
    stem = export_report_stem(out)
    reports = report_paths(out.parent, stem) if write_report and meta else []
    _outputs(reports, force, [model, calib])
    with output_lock([out, *reports]):
        # every input is read and checked before anything is written
        images = _verify_images(calib, info, calib_size, seed, net, dev) if verify else None
        from .export.onnx import export_onnx, onnx_metadata

        stats = export_onnx(net, out, info.resolution, opset=opset, pack=pack, force=force,
                            qdq=qdq, verify_images=images, metadata=onnx_metadata(info, model),
                            device=dev)
        result: dict[str, Any] = {"schema_version": JSON_SCHEMA_VERSION,
                                  "output": stats["path"], "export": stats}
        if "verify" in stats:
            result["verify"] = stats.pop("verify")
        if reports:
            from .report import write_reports

            paths = write_reports(meta, info, out.parent, export=result, overwrite=force,
                                  stem=stem)
            result["report"] = [str(p) for p in paths]
    passed = result.get("verify", {}).get("passed", True)
    if as_json:
        _emit_json(result)
    else:
        where = stats["path"] or f"nothing ({out.name.removesuffix('.onnx')}.unverified.onnx " \
                                  "exists; --force replaces it)"
        click.echo(f"wrote {where} ({stats.get('bytes', 0):,} bytes)")
        if "verify" in result:
            v = result["verify"]
            click.echo(f"verify: {'PASS' if v['passed'] else 'FAIL'}  "
                       f"max|Δ|/max|logit| {v.get('max_rel_diff', float('nan')):.2e}  "
                       f"top-1 agreement {v.get('agreement', float('nan')):.4f}")
    if not passed:
        raise CheckFailed(f"{output}: onnxruntime output does not match PyTorch; not written "
                          f"there (kept as {stats['path'] or 'nothing'})")


# ------------------------------------------------------------------------ report
@main.command()
@click.argument("compressed")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json/.md/.html into this folder (created if missing).")
@click.option("--force", is_flag=True,
              help="Overwrite existing report files in --output-dir.")
@click.option("--trust-pickle", is_flag=True,
              help="Accepted for a uniform command line; a compressed artifact never holds "
                   "pickled code, so report never unpickles anything.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON to stdout (schema_version inside).")
@click.option("--hw", "hw_json", type=click.Path(dir_okay=False), default=None,
              help="Add a hardware section (table, energy-split plots) from this "
                   "'hfbconvert hw -o FILE.json' report.")
@_quiet
def report(compressed, output_dir, force, trust_pickle, as_json, hw_json, quiet):
    """Per-layer report of a compressed model (terminal table, or files)."""
    from .artifact import load_compressed_meta
    from .fileio import output_lock
    from .report import build_report, write_reports
    from .report.terminal import print_report

    progress.set_quiet(quiet)
    paths = []
    if output_dir:
        d = Path(output_dir)
        if d.exists() and not d.is_dir():
            raise InputError(f"{d}: is not a folder (--output-dir)")
        d.mkdir(parents=True, exist_ok=True)
        paths = _outputs([d / f"report.{ext}" for ext in ("json", "md", "html")], force,
                         [compressed])
    hardware = _read_hw_json(hw_json) if hw_json else None
    info, meta = load_compressed_meta(compressed)  # no network needed: any model reports
    rep = build_report(meta, info, hardware=hardware)
    with output_lock(paths):
        if output_dir:
            for p in write_reports(meta, info, Path(output_dir), overwrite=force,
                                   hardware=hardware):
                progress.info(f"wrote {p}")
    if as_json:
        _emit_json(rep)
    else:
        print_report(rep)


def _read_hw_json(path: str) -> dict:
    """An ``hfbconvert hw`` JSON report (report --hw), or one InputError line."""
    from .hw.report import check_hw_report

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (--hw)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file (--hw: {exc})") from None
    return check_hw_report(data, path)


@main.command("hw")
@click.argument("model")
@click.option("--accelerator", "accelerator", default="hybrid_fp32", show_default=True,
              metavar="NAME|FILE.yaml",
              help="A shipped accelerator (mac_int8, mac_fp16, mac_fp32, hybrid_int8, "
                   "hybrid_fp16, hybrid_fp32) or an accelerator YAML (docs/hardware.md).")
@click.option("--mac-area-fraction", type=float, default=None,
              help="Share of the compute area given to the MAC array (the rest: adders); "
                   "overrides the accelerator's.")
@click.option("--original", default=None,
              help="The original model (default: the hybrid's layers back to dense shapes).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON report here.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a fully pickled nn.Module (runs code from the file).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@_quiet
def hw_cmd(model, accelerator, mac_area_fraction, original, output, force, trust_pickle,
           as_json, quiet):
    """Cycles, utilization and energy (compute / on-chip / DRAM) on a modelled accelerator:
    the original on the MAC-only baseline, the hybrid on the area-equivalent MAC + adder
    design (ZigZag; docs/hardware.md)."""
    from .hw.engine import require_zigzag
    from .hw.report import markdown, run_hw
    from .hw.spec import load_design

    progress.set_quiet(quiet)
    load_design(accelerator)  # a bad accelerator file fails before any other work
    require_zigzag()
    paths = _outputs([Path(output)], force, [model]) if output else []
    rep = run_hw(model, accelerator, mac_area_fraction, original, trust_pickle)
    rep["schema_version"] = JSON_SCHEMA_VERSION
    if paths:
        paths[0].write_text(json.dumps(rep, indent=1))
        progress.info(f"wrote {paths[0]}")
    if as_json:
        _emit_json(rep)
    else:
        click.echo(markdown(rep))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
