"""Command-line interface: parse, call the library, print, map errors to exit codes.

Exit codes: 0 success, 1 a failed check (e.g. ONNX/PyTorch mismatch, collapsed model),
2 usage or input error (one line naming the file and the problem, never a traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__, progress
from .errors import HfbError, InputError

JSON_SCHEMA_VERSION = 1


class _Group(click.Group):
    """Turns library errors into one-line messages with the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HfbError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # e.g. disk full or permission denied while writing
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted (fine-tuning checkpoints, if any, are kept; use --resume)",
                       err=True)
            ctx.exit(130)


def _common(f):
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for sampling and fitting; same inputs + seed = same bytes.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")(f)
    return f


def _model_opts(f):
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a fully pickled nn.Module (runs code from the file).")(f)
    f = click.option("--arch", type=click.Choice(["mobilenet_v1", "mobilenet_v2"]),
                     default=None, help="Override architecture detection.")(f)
    return f


def _calib_opts(f):
    f = click.option("--calib", "calib", default=None, metavar="PATH",
                     help="Calibration images: ImageFolder tree, flat folder, .npz, or "
                          "synthetic[:N[:ITERATIONS]] (from BatchNorm statistics).")(f)
    f = click.option("--calib-size", type=click.IntRange(min=1), default=None,
                     help="Use a seeded random subset of N images.")(f)
    f = click.option("--resolution", type=click.IntRange(8, 4096), default=None,
                     help="Override the input resolution.")(f)
    f = click.option("--preset", default=None,
                     help="Preprocessing preset (torchvision-imagenet, tf-inception, cifar10).")(f)
    return f


def _setup(quiet: bool, seed: int) -> None:
    import torch

    progress.set_quiet(quiet)
    torch.manual_seed(seed)


def _load(model: str, arch: str | None, trust_pickle: bool):
    from .models.loading import load_model

    return load_model(model, arch=arch, trust_pickle=trust_pickle)


def _load_any(model: str, arch: str | None, trust_pickle: bool):
    """``(net, info, meta)`` for a compressed artifact or any model ``_load`` accepts
    (``meta`` None for the latter); the file is read once."""
    if model.startswith("builtin:"):
        return (*_load(model, arch, trust_pickle), None)
    from .artifact import build_compressed, is_compressed
    from .fileio import load_torch
    from .models.loading import model_from_object

    obj = load_torch(model, trust_pickle)
    if is_compressed(obj):
        net, info = build_compressed(obj, model)
        return net, info, obj.get("meta") or {}
    return (*model_from_object(obj, model, arch), None)


def _load_calib(path: str | None, info, size: int | None, seed: int, resolution: int | None,
                preset: str | None, net=None):
    """Calibration data for ``--calib``: real images, or ``synthetic[:N[:ITERATIONS]]``
    distilled from ``net``'s BatchNorm statistics (N defaults to --calib-size, else 256;
    with an explicit N, --calib-size picks a seeded subset as it does for real images)."""
    if path is None:
        return None, info
    from calib.presets import apply_overrides, preset_for
    from calib.readers import load_images
    from calib.synthetic import DEFAULT_N, is_synthetic, parse_spec, synthesize

    prep = apply_overrides(preset_for(info), preset=preset, resolution=resolution)
    if resolution is not None:
        info.resolution = resolution
    if is_synthetic(path):
        n, iterations = parse_spec(path)
        if net is None:
            raise InputError(f"--calib {path}: synthetic images need the model's BatchNorm "
                             "statistics, not available here; pass real images")
        data = synthesize(net, prep, n or size or DEFAULT_N, seed, iterations=iterations,
                          source=getattr(info, "source", ""))
        if n is not None and size is not None and size < len(data):
            import numpy as np

            data = data.subset(np.sort(np.random.default_rng(seed).permutation(n)[:size]))
        return data, info
    with progress.task("reading images", None):
        data = load_images(path, prep, size=size, seed=seed)
    if data.skipped:
        progress.warn(f"{path}: skipped {data.skipped} unreadable image(s)"
                      + (f", e.g. {data.skipped_examples[0]}" if data.skipped_examples else ""))
    progress.info(f"calibration: {len(data)} images from {path}")
    return data, info


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return name


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=1, sort_keys=False))


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
@click.option("--threshold", type=float, default=0.05, show_default=True,
              help="A filter is critical when its loss at --threshold-budget exceeds this.")
@click.option("--threshold-budget", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--stats-images", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images used for the input statistics Σ.")
@click.option("--json", "as_json", is_flag=True, help="Print the sensitivity JSON to stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the sensitivity JSON here (reused by compress).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@_common
def analyze(model, arch, trust_pickle, calib, calib_size, resolution, preset, budgets,
            threshold, threshold_budget, stats_images, as_json, output, force, seed, quiet):
    """Rank every pointwise filter's sensitivity to ternary StrassenNets approximation.

    MODEL is a checkpoint path or builtin:mobilenet_v2."""
    from .analysis import analyze as run_analyze
    from .fileio import atomic_write_text, check_output_path
    from .report.terminal import print_analysis
    from .sensitivity import parse_budgets

    _setup(quiet, seed)
    try:
        bud = parse_budgets(budgets)
    except ValueError as exc:
        raise InputError(f"--budgets: {exc}") from None
    if output:
        check_output_path(output, force)
    net, info = _load(model, arch, trust_pickle)
    data, info = _load_calib(calib, info, calib_size, seed, resolution, preset, net)
    if data is None:
        progress.warn("no --calib data: weight-space sensitivity (Σ = I), not activation-aware")
    res = run_analyze(net, info, data, bud, stats_images, threshold, threshold_budget, seed,
                      source=model)
    text = json.dumps(res, indent=1)
    if output:
        atomic_write_text(output, text + "\n")
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
              help="Compressed model path (default: MODEL stem + .hfb.pt next to it).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--method", type=click.Choice(["hybrid", "twn", "strassen"]), default="hybrid",
              show_default=True, help="hybrid filter banks, or a baseline.")
@click.option("--budget", type=float, default=0.536, show_default=True,
              help="Fraction of the original model's MULs the result may use, in (0, 1].")
@click.option("--max-add-increase", type=float, default=0.48, show_default=True,
              help="Allowed ADD increase relative to the original model.")
@click.option("--size-budget", type=float, default=None,
              help="Cap on stored bytes as a fraction of the original float32 weights, "
                   "in (0, 1]; the planner trades hidden units and critical rows for it.")
@click.option("--energy-budget", type=float, default=None,
              help="Cap on arithmetic energy (cost model) as a fraction of the original "
                   "model's at the same activation bits, in (0, 1]; with "
                   "--activation-bits 8, 1.0 means no more than int8 PTQ.")
@click.option("--critical-fraction", type=click.FloatRange(0, 1), default=None,
              help="Paper-style uniform mode: this fraction of each layer stays FP.")
@click.option("--hidden-units-ratio", type=click.FloatRange(min=1.0), default=1.0,
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
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--reconstruct/--no-reconstruct", default=False, show_default=True,
              help="Sequential reconstruction: refit layers in order against the compressed "
                   "network's own inputs. Off by default: on MobileNetV1-0.5-160 the one-shot "
                   "activation-aware fit scored higher (see BENCHMARKS.md).")
@click.option("--no-sequential", is_flag=True,
              help="Reconstruct against original inputs (one-shot) instead.")
@click.option("--no-bias-correction", is_flag=True)
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
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Exit 1 if held-apart agreement with the original ends below this.")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tune.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
              show_default=True)
@click.option("--critical-bits", "--weight-bits", "weight_bits", type=int, default=None,
              help="Bits of everything that stays full precision (critical filters, stem, "
                   "depthwise, classifier): 32, 16 (float16) or 8 (per-channel symmetric "
                   "int8). Biases stay fp32. [default: 16; 8 with --activation-bits 8]")
@click.option("--activation-bits", type=int, default=32, show_default=True,
              help="8: int8 activations. BatchNorms are folded, every conv/linear input and "
                   "every ternary bank's hidden units are quantized to uint8 with ranges "
                   "calibrated on --calib images (MSE-optimal clipping); export writes "
                   "QuantizeLinear/DequantizeLinear. Needs --calib and 8-bit weights.")
@click.option("--hidden-bits", type=int, default=32, show_default=True,
              help="With --activation-bits 8: the ternary banks' hidden units a*(W_b x). "
                   "32: int32 at one common fixed-point scale (exact; W_c adds int32 "
                   "values, no extra operation). 8: requantized to uint8 with power-of-two "
                   "scales, for targets that keep every stored activation 8-bit (measured: "
                   "-0.6 points top-1 on MobileNetV1-0.5-160).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary to stdout.")
@_common
def compress(model, arch, trust_pickle, calib, calib_size, resolution, preset, output, force,
             method, budget, max_add_increase, size_budget, energy_budget, critical_fraction,
             hidden_units_ratio, plan_file, dry_run, steps, batch_size, lr, reconstruct,
             no_sequential, no_bias_correction, bn_adjust, min_agreement, resume, device,
             weight_bits, activation_bits, hidden_bits, as_json, seed, quiet):
    """Split pointwise layers into FP critical + ternary banks under a MUL budget,
    reconstruct layer by layer, and fine-tune briefly by distillation."""
    import math

    from .actquant import check_act_bits, check_config
    from .artifact import save_compressed
    from .compress import CompressConfig, check_caps
    from .compress import compress as run_compress
    from .errors import CheckFailed
    from .fileio import check_output_path
    from .finetune import FinetuneConfig
    from .report.terminal import print_compress, print_plan
    from .weightquant import check_bits

    _setup(quiet, seed)
    if not (math.isfinite(budget) and 0 < budget <= 1):
        raise InputError(f"--budget must be a number in (0, 1], got {budget}")
    check_caps(method, critical_fraction, size_budget, energy_budget)
    check_act_bits(activation_bits)
    if weight_bits is None:
        weight_bits = 8 if activation_bits == 8 else 16
    check_bits(weight_bits, "--critical-bits/--weight-bits")
    check_config(activation_bits, weight_bits, calib is not None, hidden_bits)
    override = _read_plan(plan_file) if plan_file else None
    # the model first: a missing MODEL is reported as such, not as its default output
    net, info = _load(model, arch, trust_pickle)
    out = Path(output) if output else _default_out(model)
    if not dry_run and not (resume and out.exists() and force):
        check_output_path(out, force)
    data, info = _load_calib(calib, info, calib_size, seed, resolution, preset, net)
    if data is None:
        progress.warn("no --calib data: weight-space fit only, no reconstruction or fine-tune")
    dev = _device(device)
    cfg = CompressConfig(
        method=method, budget=budget, critical_fraction=critical_fraction,
        hidden_units_ratio=hidden_units_ratio, max_add_increase=max_add_increase,
        size_budget=size_budget, energy_budget=energy_budget, reconstruct=reconstruct,
        sequential=not no_sequential,
        bias_correction=not no_bias_correction, bn_adjust=bn_adjust,
        min_agreement=min_agreement, seed=seed,
        finetune=FinetuneConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                device=dev), weight_bits=weight_bits,
        activation_bits=activation_bits, hidden_bits=hidden_bits)
    ckpt = str(out) + ".ckpt"
    try:
        hybrid, meta = run_compress(net, info, data, cfg, checkpoint=ckpt, resume=resume,
                                    plan_override=override, dry_run=dry_run)
    except InputError as exc:
        # the library names the plan "plan file"; the user wants to know which file
        msg = str(exc)
        if plan_file and msg.startswith("plan file:"):
            raise InputError(f"{plan_file}:{msg[len('plan file:'):]}") from None
        raise
    if dry_run:
        if as_json:
            _emit_json({"schema_version": JSON_SCHEMA_VERSION, "plan": meta["plan"]})
        else:
            print_plan(meta["plan"])
        return
    timings = meta.pop("timings")
    meta["source_model"] = model
    meta["versions"] = _versions()
    # wall-clock seconds stay out of the file: same inputs + seed = same bytes
    saved = dict(meta, stages=[{k: v for k, v in st.items() if k != "seconds"}
                               for st in meta["stages"]])
    save_compressed(out, hybrid, info, saved)
    Path(ckpt).unlink(missing_ok=True)
    summary = {"schema_version": JSON_SCHEMA_VERSION, "output": str(out),
               "stages": meta["stages"], "timings": timings,
               "cost": meta["cost"]["totals"], "original_cost": meta["original_cost"]["totals"]}
    if as_json:
        _emit_json(summary)
    else:
        print_compress(meta, timings, str(out))
    ag = meta.get("final_agreement")
    if ag is None and min_agreement > 0:
        progress.warn("agreement not measured (needs --calib with at least 20 images); "
                      "--min-agreement was not checked")
    if ag is not None and ag < min_agreement:
        raise CheckFailed(f"{out}: agreement with the original on held-apart images is "
                          f"{ag:.3f} < --min-agreement {min_agreement} (model written, "
                          "but it does not behave like the original)")


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


# ------------------------------------------------------------------------ eval
@main.command("eval")
@click.argument("model")
@_model_opts
@click.option("--data", "data_path", required=True,
              help="Labelled ImageFolder (class folders named as the model's classes, or "
                   "ImageNet wnids) or .npz with integer labels.")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Seeded subset.")
@click.option("--original", default=None,
              help="Original model for agreement (default: the compressed model's source).")
@click.option("--json", "as_json", is_flag=True)
@_common
def eval_cmd(model, arch, trust_pickle, data_path, size, original, as_json, seed, quiet):
    """Top-1/top-5, and top-1 agreement with the original model.

    MODEL is a checkpoint, a compressed .hfb.pt, or an exported .onnx (run with
    onnxruntime, preprocessing from its metadata)."""
    from .evaluate import evaluate

    _setup(quiet, seed)
    ref = None
    net, info, meta = _eval_load(model, arch, trust_pickle, compressed_ok=True)
    src = original or (meta or {}).get("source_model")
    if src and not original and not src.startswith("builtin:") and not Path(src).exists():
        progress.warn(f"{model}: its source model {src} is not found from here; no agreement "
                      "(pass --original)")
        src = None
    if src:
        ref, ref_info, _ = _eval_load(src, None, trust_pickle, compressed_ok=False)
        if ref_info.num_classes != info.num_classes:
            which = "--original" if original else "source model"
            raise InputError(f"{which} {src} has {ref_info.num_classes} classes but "
                             f"{model} has {info.num_classes}: top-1 agreement between them "
                             "means nothing")
    data = _eval_data(model, info, data_path, size, seed)
    res = evaluate(net, data, info.label_offset, reference=ref)
    res["schema_version"] = JSON_SCHEMA_VERSION
    if as_json:
        _emit_json(res)
    else:
        parts = [f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)]
        click.echo(f"{model}: n {res['n']}  " + "  ".join(parts))


def _eval_load(path: str, arch: str | None, trust_pickle: bool, compressed_ok: bool):
    """``(net, info, meta)`` for eval: an ``.onnx`` file (onnxruntime; ModelInfo from its
    metadata), a compressed artifact (when ``compressed_ok``) or any model ``_load``
    takes; ``meta`` is the artifact's metadata, else None."""
    if path.lower().endswith(".onnx"):
        import torch

        from .evaluate import load_onnx_for_eval

        return (*load_onnx_for_eval(path, threads=torch.get_num_threads()), None)
    if compressed_ok:
        return _load_any(path, arch, trust_pickle)
    return (*_load(path, arch, trust_pickle), None)


def _eval_data(model: str, info, data_path: str, size: int | None, seed: int):
    """``--data`` with labels in the model's class order: class folders are matched to the
    model's class names, or to ImageNet wnids for an unnamed 1000-class model (an
    unmatched folder is an error); only a model with neither gets sorted folder order,
    with a warning. An ``.npz``'s integer labels are used as they are."""
    from calib.imagenet import imagenet_wnids
    from calib.presets import preset_for
    from calib.readers import load_images

    kw: dict[str, Any] = {}
    n_labels = int(info.num_classes) - int(info.label_offset)
    if info.classes:
        kw = {"classes": list(info.classes),
              "classes_origin": f"{model}'s {len(info.classes)} class names"}
    elif n_labels == len(imagenet_wnids()):
        kw = {"classes": list(imagenet_wnids()),
              "classes_origin": f"the ImageNet class ids (wnids) of {model}'s 1000 classes"}
    with progress.task("reading images", None):
        data = load_images(data_path, preset_for(info), size=size, seed=seed, **kw)
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


@export.command("onnx")
@click.argument("model")
@_model_opts
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--force", is_flag=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--pack", type=click.Choice(["2bit", "base3"]), default="2bit", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare onnxruntime with PyTorch on calibration images.")
@click.option("--qdq/--no-qdq", default=False, show_default=True,
              help="int8-activation models: write the activation quantizers as standard "
                   "QuantizeLinear/DequantizeLinear (onnxruntime runs its int8 kernels, but "
                   "its rewrites move rounding boundaries: measured 3.6-5.3% logit "
                   "differences, so verification may fail) instead of the same arithmetic "
                   "as plain float ops (matches PyTorch).")
@click.option("--calib", default=None, help="Images for verification (default: random).")
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--report/--no-report", "write_report", default=True, show_default=True,
              help="Write report.json/.md/.html next to the ONNX file.")
@click.option("--json", "as_json", is_flag=True)
@_common
def export_onnx_cmd(model, arch, trust_pickle, output, force, opset, pack, verify, qdq, calib,
                    calib_size, write_report, as_json, seed, quiet):
    """Export a compressed (or plain) model to ONNX with hfb custom ops."""
    import torch

    from .errors import CheckFailed
    from .fileio import check_output_path

    _setup(quiet, seed)
    check_output_path(output, force)
    net, info, meta = _load_any(model, arch, trust_pickle)
    meta = meta or {}
    from .export.onnx import export_onnx, onnx_metadata

    stats = export_onnx(net, output, info.resolution, opset=opset, pack=pack, force=force,
                        qdq=qdq, metadata=onnx_metadata(info, model))
    result: dict[str, Any] = {"schema_version": JSON_SCHEMA_VERSION, "output": output,
                              "export": stats}
    if verify:
        from .verify import verify_onnx

        if calib:
            data, _ = _load_calib(calib, info, calib_size, seed, None, None, net)
            images = data.normalized()
        else:
            g = torch.Generator().manual_seed(seed)
            images = torch.randn(calib_size, 3, info.resolution, info.resolution, generator=g)
        vr = verify_onnx(output, net, images)
        result["verify"] = vr.to_dict()
    if write_report and meta:
        from .report import write_reports

        paths = write_reports(meta, info, Path(output).parent, export=result)
        result["report"] = [str(p) for p in paths]
    if as_json:
        _emit_json(result)
    else:
        click.echo(f"wrote {output} ({stats.get('bytes', 0):,} bytes)")
        if verify:
            v = result["verify"]
            click.echo(f"verify: {'PASS' if v['passed'] else 'FAIL'}  "
                       f"max|Δ|/max|logit| {v.get('max_rel_diff', float('nan')):.2e}  "
                       f"top-1 agreement {v.get('agreement', float('nan')):.4f}")
    if verify and not result["verify"]["passed"]:
        raise CheckFailed(f"{output}: onnxruntime output does not match PyTorch")


# ------------------------------------------------------------------------ report
@main.command()
@click.argument("compressed")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json/.md/.html into this folder.")
@click.option("--json", "as_json", is_flag=True)
@_common
def report(compressed, output_dir, as_json, seed, quiet):
    """Per-layer report of a compressed model (terminal table, or files)."""
    from .artifact import load_compressed
    from .report import build_report, write_reports
    from .report.terminal import print_report

    _setup(quiet, seed)
    _, info, meta = load_compressed(compressed)
    rep = build_report(meta, info)
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for p in write_reports(meta, info, Path(output_dir)):
            progress.info(f"wrote {p}")
    if as_json:
        _emit_json(rep)
    else:
        print_report(rep)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
