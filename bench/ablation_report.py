"""The ablation section of BENCHMARKS.md, generated from the ablation scripts' results
files (bench/results/ablation-*.json, finetune-*.json, int8-order-*.json, int8-stages-*.json,
int8-rounding-*.json, synthetic-calibration.json, *-planner-exact.json, milp-scale-*.json) so
that no number in it is typed.

These files store top-1 and image counts but not per-image results, so each difference
against the original carries an unpaired 95% interval (ᵘ; wider than a paired one) and
is worded by the rule: "better"/"worse" only where that interval excludes zero. They
were measured on the evaluation images (``data/imagenet/val``, CIFAR-10 test) before the
tuning split existed, and chose settings on them: the section says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hfbconvert.metrics import decode_bits, discordant, mcnemar_exact, paired_difference_interval

from .report import _num, fmt_diff, unpaired, words

CAVEAT = ("Measured with the evaluation images before the tuning split existed (they "
          "chose settings and report them); differences carry unpaired 95% intervals (ᵘ: "
          "the files store no per-image results), so read them as upper bounds on the noise.")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model(args: dict) -> str:
    return os.path.basename(str(args.get("model", "?")))


def _vs(top1: float | None, n: int | None, ref: float | None) -> tuple[str, str]:
    """(difference with its unpaired interval, verdict) against the original."""
    if top1 is None or ref is None or not n:
        return "—", ""
    d = unpaired(top1, n, ref, n)
    return fmt_diff(d), words(d)


def _pc(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _rel(path: Path, md_dir: Path) -> str:
    return f"`{os.path.relpath(path, md_dir)}`"


def configs_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/ablation.py: one compress configuration per file."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "args" not in d:
            continue
        a = d["args"]
        n = d.get("n_eval") or a.get("val")
        ref = d.get("top1_orig")
        vs, verdict = _vs(d.get("top1"), n, ref)
        cfg = (f"n {a.get('n')}, steps {a.get('steps')}, "
               f"{'fit only' if a.get('no_reconstruct') else 'reconstruct'}, "
               f"BN {a.get('bn_adjust', 'off')}/{a.get('bn_scope', '-')}, "
               f"ratios {a.get('ratios')}, budgets {a.get('budgets')}")
        rows.append(f"| {_rel(f, md_dir)} | {_model(a)} | {cfg} | {n} | {_pc(ref)} | "
                    f"{_pc(d.get('top1'))} | {vs} | {verdict} | {_pc(d.get('agree_val'))} | "
                    f"{_num(d.get('mul_ratio'), 1, 3)}x | {_num(d.get('add_ratio'), 1, 3)}x |")
    if not rows:
        return []
    return ["### Compress configurations (`python -m bench.ablation`)", "",
            "One `compress` configuration through the library API per file, budget 0.536. "
            + CAVEAT, "",
            "| results file | model | configuration | eval images | original top-1 % | "
            "top-1 % | Δ (pp) [95%] | vs original | agreement % | MULs | ADDs |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def finetune_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/finetune_curve.py: the whole compress at each fine-tune length."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "rows" not in d:
            continue
        a, n, ref = d.get("args", {}), d.get("n_eval"), d.get("top1_original")
        extra = ", ".join(f"{k} {a[k]}" for k in ("n", "seed", "lr", "budget") if k in a)
        for r in d["rows"]:
            vs, verdict = _vs(r.get("top1"), n, ref)
            ft = r.get("finetune_s")
            rows.append(f"| {_rel(f, md_dir)} | {_model(a)} | {extra} | {r.get('steps')} | "
                        f"{_shipped(r)} | "
                        f"{_pc(r.get('top1'))} | {vs} | {verdict} | {_pc(r.get('agreement'))} | "
                        f"{_num(r.get('held_agreement'), 0.01)} | "
                        f"{_num(r.get('compress_s'), 1, 0)} ({_num(ft, 1, 0)}) |")
    if not rows:
        return []
    return ["### Fine-tune length (`python -m bench.finetune_curve`)", "",
            "The whole `compress` through the library at each fine-tune length; original "
            "top-1 and the eval images as in each file. " + CAVEAT, "",
            "\"Shipped\": the state `compress` kept. Files from before the held-apart checks "
            "ship the last step, or the fit where the run was reverted; since then the best "
            "held-apart check "
            "is shipped, and the fit itself when no check beat it (\"the fit: reverted at "
            "N\", the step the run stopped at).", "",
            "| results file | model | settings | steps | shipped | top-1 % | "
            "Δ vs original (pp) [95%] | "
            "vs original | agreement % | held agreement % | compress s (fine-tune s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _shipped(row: dict) -> str:
    """Which state a finetune_curve row's compress shipped (blank: not recorded)."""
    kl = row.get("held_kl")
    if not isinstance(kl, dict):
        if row.get("reverted"):  # from before the checks: reverted after the last step
            return f"the fit: reverted at {row.get('steps')}"
        return "last step" if row.get("steps") and "held_kl" not in row else ""
    stopped = kl.get("stopped_early_at")
    if row.get("reverted") or kl.get("best_step") == 0:
        return f"the fit: reverted at {stopped or row.get('steps')}"
    if kl.get("best_step") is None:  # held KL before/after only: the last step shipped
        return "last step"
    return f"step {kl.get('best_step')}" + (f" (stopped at {stopped})" if stopped else "")


CURVE_MIN_CHECKS = 8  # a row with at least this many held-apart checks gets its curve


def _curve_rows(c: dict) -> list[str]:
    """One table row per held-apart check of a finetune_curve row's ``held_curve``."""
    def at(key: str, i: int) -> float | None:
        v = c.get(key) or []
        return v[i] if i < len(v) else None

    return [f"| {s} | {_num(at('held_kl', i), 1, 4)} | {_pc(at('held_agreement', i))} "
            f"| {_pc(at('held_top1', i))} |" for i, s in enumerate(c.get("eval_steps") or [])]


def curve_table(files: list[Path], md_dir: Path) -> list[str]:
    """The held-apart curve (held KL, agreement, top-1 at every check) of each long
    bench/finetune_curve.py row: how the fine-tune moves with steps, not just where it
    ends."""
    out: list[str] = []
    for f in files:
        d = _load(f) or {}
        for r in d.get("rows", []):
            c = r.get("held_curve") or {}
            if len(c.get("eval_steps") or []) < CURVE_MIN_CHECKS:
                continue
            a = d.get("args", {})
            out += [f"{_rel(f, md_dir)}, {_model(a)}, {r.get('steps')} steps (lr {a.get('lr')}, "
                    f"a check every {a.get('eval_every')} steps; shipped: {_shipped(r)}; final "
                    f"top-1 {_pc(r.get('top1'))} on {d.get('n_eval')} eval images, original "
                    f"{_pc(d.get('top1_original'))}):", "",
                    "| step | held KL (nats) | held agreement % | held top-1 % |",
                    "|---|---|---|---|", *_curve_rows(c), ""]
    if not out:
        return []
    return ["### Fine-tune curves (`python -m bench.finetune_curve`, long runs)", "",
            "Each held-apart check of the long runs in the table above, on the calibration "
            "images held apart from the fine-tune (not the evaluation images).", "", *out]


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _milp_cells(r: dict, gaps: list[str]) -> list[str]:
    cells = []
    for k in gaps:
        v = r.get(k) or {}
        vs = v.get("vs_raw")
        cells.append(f"{v.get('nodes')} nodes, " + (
            "=" if v.get("same_plan_as_raw") else "—" if vs is None else f"{100 * vs:+.4f}%"))
    return cells


def milp_scale_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/milp_scale.py: the planner's MILP on raw vs scaled costs, budget by budget."""
    out: list[str] = []
    for f in files:
        d = _load(f) or {}
        models = d.get("models") or {}
        gaps = sorted({k for rs in models.values() for r in rs for k in r
                       if k.startswith("scaled@")}, key=lambda k: -float(k[7:]))
        if not gaps:
            continue
        out += [f"{_rel(f, md_dir)} ({d.get('images')} calibration images per dry run, node "
                f"limit {d.get('node_limit')}); per gap: nodes, then the scaled plan's "
                "predicted error against the raw plan's (negative: lower; \"=\": the same "
                "plan):", "",
                "| model | MUL budget | raw objective | raw nodes | "
                + " | ".join(f"scaled, gap {k[7:]}" for k in gaps) + " |",
                "|---|---|---|---|" + "---|" * len(gaps)]
        out += [f"| {model} | {r.get('budget')} | {_g((r.get('raw') or {}).get('objective'))} | "
                f"{(r.get('raw') or {}).get('nodes')} | " + " | ".join(_milp_cells(r, gaps)) + " |"
                for model, rs in models.items() for r in rs]
        out.append("")
    if not out:
        return []
    return ["### Budget planner: raw vs scaled MILP costs (`python -m bench.milp_scale`)", "",
            "The planner's objective (predicted error, not a top-1) and branch-and-bound "
            "nodes with the raw costs at gap 1e-6 (the planner before 2026-12-03) and with "
            "the costs scaled to an optimum of about 1 (today's planner: gap 1e-4).", "", *out]


def probe_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/finetune_probe.py: short fine-tunes from one fit, held-apart KL per check."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "variants" not in d:
            continue
        a = d.get("args", {})
        for spec, v in d["variants"].items():
            kl, loss = v.get("held_kl") or [], v.get("loss") or []
            q = max(1, len(loss) // 4)
            curve = " → ".join(f"{x:.4f}" for x in kl)
            rows.append(f"| {_rel(f, md_dir)} | {os.path.basename(str(a.get('model')))} | {spec} | "
                        f"{', '.join(str(s) for s in v.get('eval_steps') or [])} | {curve} | "
                        f"{np.mean(loss[:q]):.4f} → {np.mean(loss[-q:]):.4f} |"
                        if loss else "")
    rows = [r for r in rows if r]
    if not rows:
        return []
    return ["### Fine-tune probes (`python -m bench.finetune_probe`)", "",
            "Short fine-tunes from one fitted hybrid (same batches for every variant), "
            "`WHAT@LR`: `all` every continuous parameter (the default), `no-bn` all but the "
            "BatchNorm affine parameters, `fold` BatchNorm folded into the layers first, "
            "`rel` a per-tensor lr scaled by the tensor's RMS. Held-apart KL to the original "
            "at each check (calibration images held apart, not the evaluation split), and "
            "the mean training loss over the first and the last quarter of the steps.", "",
            "| results file | model | variant | checks at steps | held-apart KL | "
            "training loss, first → last quarter |",
            "|---|---|---|---|---|---|", *rows, ""]


DEFAULT_ORDER = "wsa"  # what `compress --activation-bits 8` does


def _vs_default(row: dict, default: dict | None) -> tuple[str, str]:
    """(paired difference against the default order's row, verdict): both rows' per-image
    results on the same images; blank where either is missing or it is the default."""
    pr, pd = row.get("per_image") or {}, (default or {}).get("per_image") or {}
    if default is None or row is default or not pr.get("correct_hex") \
            or not pd.get("correct_hex") or pr.get("images_sha256") != pd.get("images_sha256"):
        return "", ""
    x, y = decode_bits(pr["correct_hex"], int(pr["n"])), decode_bits(pd["correct_hex"],
                                                                      int(pd["n"]))
    d, (lo, hi) = paired_difference_interval(x, y)
    di = {"d": d, "lo": lo, "hi": hi, "paired": True, "n": int(x.size),
          "p": mcnemar_exact(*discordant(x, y))}
    return fmt_diff(di, True), words(di)


def order_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/int8_order.py: int8 post-training stages on the original model; where the
    file stored per-image results, each variant also against the default order."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "rows" not in d:
            continue
        a, n, ref = d.get("args", {}), d.get("n_eval"), d.get("top1_original")
        default = next((r for r in d["rows"] if r.get("variant") == DEFAULT_ORDER), None)
        for r in d["rows"]:
            vs, verdict = _vs(r.get("top1"), n, ref)
            if r.get("vs_original"):  # per-image results stored: the paired interval
                di = dict(r["vs_original"], paired=True, n=n)
                vs, verdict = fmt_diff(di, True), words(di)
            vd, vd_word = _vs_default(r, default)
            rows.append(f"| {_rel(f, md_dir)} | {_model(a)} | `{r.get('variant')}` | "
                        f"{d.get('split', 'eval')}, {n} | "
                        f"{_pc(ref)} | {_pc(r.get('top1'))} | {vs} | {verdict} | "
                        f"{vd} | {vd_word} | {_pc(r.get('agreement'))} |")
    if not rows:
        return []
    return ["### Int8 stage order (`python -m bench.int8_order`)", "",
            "Int8 post-training stages applied to the original model, left to right after "
            "BN folding: `w` per-channel int8 weights (MSE clip search), `X` the same with "
            "max-abs scales, `a` uint8 activations, `s` the mean-shift correction; flags: "
            "`m` MinMax activation ranges, `L` no mean shift on Linear layers. " + CAVEAT
            + f" Δ vs `{DEFAULT_ORDER}` (what `compress --activation-bits 8` does): paired over "
            "the same images, where the file stored per-image results.", "",
            "| results file | model | variant | split, images | original top-1 % | top-1 % | "
            f"Δ (pp) [95%] | vs original | Δ vs `{DEFAULT_ORDER}` (pp) [95%] | "
            f"vs `{DEFAULT_ORDER}` | agreement % |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _ci(v: float | None, ci: list[float] | None, scale: float = 100.0, dg: int = 2) -> str:
    if v is None:
        return "—"
    return f"{scale * v:.{dg}f}" + (f" [{scale * ci[0]:.{dg}f}, {scale * ci[1]:.{dg}f}]"
                                    if ci else "")


def _settings(args: dict) -> str:
    """An int8_stages run's settings as the table shows them: its ``--set`` overrides
    and a second int8 fine-tune (``--then-int8-finetune``), or "defaults"."""
    items = [f"`{x}`" for x in args.get("set", [])]
    if args.get("then_int8_finetune"):
        items.append(f"then int8 fine-tune of `{args['then_int8_finetune']}`")
    return " ".join(items) or "defaults"


def stages_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/int8_stages.py: the int8 hybrid evaluated after each building stage, paired
    against the original and against the stage before (per-image results stored)."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "rows" not in d:
            continue
        n, ref = d.get("n_eval"), d.get("top1_original")
        split = (d.get("split") or {}).get("eval", {})
        where = f"{split.get('name', '?')}, {n}"
        sets = _settings(d.get("args") or {})
        for r in d["rows"]:
            vo = dict(r["vs_original"], paired=True, n=n)
            vp = dict(r["vs_previous_row"], paired=True, n=n)
            rows.append(f"| {_rel(f, md_dir)} | {d.get('args', {}).get('model', '?')} "
                        f"({sets}) | `{r['stage']}` | {where} | {_pc(ref)} | "
                        f"{_ci(r.get('top1'), r.get('top1_ci'))} | {fmt_diff(vo, True)} | "
                        f"{words(vo)} | {fmt_diff(vp, True)} | {words(vp)} | "
                        f"{_ci(r.get('agreement'), r.get('agreement_ci'))} | "
                        f"{_ci(r.get('kl'), r.get('kl_ci'), 1.0, 4)} |")
    if not rows:
        return []
    return ["### The int8 hybrid, stage by stage (`python -m bench.int8_stages`)", "",
            "`compress --activation-bits 8` run in process and evaluated after each stage "
            "that changes the network: `add_cap` (the one-shot hybrid fit), `finetune` (the "
            "float fine-tune, with `--no-qat`), `weight_quant` (int8 weights), `mean_shift`, "
            "`activation_calibration` (uint8 activations, int32 hidden units), "
            "`int8_finetune` (with the quantizers in the loop, the default `--qat`; after a "
            "`qat=false` run, \"then int8 fine-tune\" is a second one, `bench.int8_stages "
            "--then-int8-finetune`). Measured "
            "on the tuning split (calibration images held apart from calibration, never the "
            "evaluation images), per-image results stored: every difference is paired "
            "(bootstrap 95% interval, McNemar's p).", "",
            "| results file | model (settings) | after stage | split, images | original top-1 % "
            "| top-1 % [95%] | Δ vs original (pp) [95%] | vs original | Δ vs stage before "
            "(pp) [95%] | vs stage before | agreement % [95%] | KL (nats) [95%] |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            *final_rows_table(files, md_dir)]


def rounding_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/int8_rounding.py: int8 weight rounding of the folded float hybrid, nearest
    against error feedback (GPTQ), all weights and by layer group."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "rows" not in d:
            continue
        split = (d.get("split") or {}).get("eval", {})
        where = f"{split.get('name', '?')}, {split.get('n', '?')}"
        for r in [*d["rows"], *d.get("chains", [])]:
            kl = r.get("kl_vs_nearest") or r.get("kl_vs_default")
            n = r.get("n")
            t1 = r.get("top1_vs_nearest") or r.get("top1_vs_default")
            t1 = dict(t1, paired=True, n=n) if t1 else None
            kl_d = (f"{kl['d']:+.4f} [{kl['lo']:+.4f}, {kl['hi']:+.4f}]" if kl else "")
            kl_w = "" if not kl else ("lower" if kl["hi"] < 0 else "higher" if kl["lo"] > 0
                                       else "within noise")
            rows.append(f"| {_rel(f, md_dir)} | {d.get('args', {}).get('model', '?')} | "
                        f"{r['variant']} | {where} | {_ci(r.get('top1'), r.get('top1_ci95'))} | "
                        f"{_ci(r.get('agreement'), r.get('agreement_ci95'))} | "
                        f"{_ci(r.get('kl'), r.get('kl_ci95'), 1.0, 4)} | {kl_d} | {kl_w} | "
                        f"{fmt_diff(t1, True) if t1 else ''} | {words(t1) if t1 else ''} | "
                        f"{r.get('nearest_channels', '')} |")
    if not rows:
        return []
    return ["### Int8 weight rounding: nearest vs error feedback (`python -m bench.int8_rounding`)",
            "", "The folded float hybrid of `compress --activation-bits 8 --steps 0` (before "
            "any weight is rounded), its full-precision weights rounded to per-channel int8 "
            "-- all of them, or one layer group -- to nearest and by error feedback against "
            "each layer's input second moments (`--weight-rounding gptq`, 128 calibration "
            "images). Then the whole post-training chain on every weight as the stages run "
            "it, ending with the uint8 activation quantizers: nearest + mean shift (the "
            "default), gptq alone, gptq + mean shift, and (`int8-rounding-v2-qin.json`) "
            "gptq against the quantized inputs: activation ranges first, then layer by "
            "layer each weight corrected by ridged least squares towards the float "
            "network's outputs from its quantized inputs and rounded by gptq on "
            "E[x_q x_qᵀ], ranges calibrated again; and (`int8-rounding-v2-outrange.json`) "
            "the activation ranges chosen by the least squared error of each layer's "
            "output instead of the quantized tensor's own (`actquant.calibrate(..., "
            "objective=\"output\")`, on 32 of the 128 calibration images); and "
            "(`int8-rounding-v2-dwchan.json`) each depthwise conv's input quantized with one "
            "MSE-clipped range per channel (`actquant.attach(..., depthwise_channels=True)`), "
            "free in an integer kernel because output channel c reads only input channel c. "
            "Against the "
            "original on the tuning "
            "split; differences are paired per image: a gptq row against the nearest row "
            "above it, a chain against the default chain.", "",
            "| results file | model | weights: rounding | split, images | top-1 % [95%] | "
            "agreement % [95%] | KL (nats) [95%] | Δ KL [95%] | KL | "
            "Δ top-1 (pp) [95%] | top-1 | channels kept nearest |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _final(d: dict) -> tuple[dict, int] | None:
    """The last row of an int8_stages file (the shipped model) and its image count, when
    it stores per-image results with agreement and KL."""
    rows = d.get("rows") or []
    pi = rows[-1].get("per_image") if rows else None
    if not pi or "agree_hex" not in pi or "kl_b64" not in pi:
        return None
    return rows[-1], int(pi["n"])


def final_rows_table(files: list[Path], md_dir: Path) -> list[str]:
    """Shipped model against shipped model, paired: every two int8_stages files of one
    model, seed and image list whose settings differ (e.g. ``qat=false`` against the
    defaults). Top-1, agreement and per-image KL differences with bootstrap intervals."""
    from hfbconvert.metrics import decode_floats

    loaded = [(f, d) for f in files if (d := _load(f)) and _final(d)]
    out = []
    for i, (fa, a) in enumerate(loaded):
        for fb, b in loaded[i + 1:]:
            aa, ab = a.get("args") or {}, b.get("args") or {}
            ra, n = _final(a)
            rb, nb = _final(b)
            same = (aa.get("model"), aa.get("seed"), ra["per_image"]["images_sha256"]) == \
                (ab.get("model"), ab.get("seed"), rb["per_image"]["images_sha256"])
            if not same or n != nb or _settings(aa) == _settings(ab):
                continue
            if _settings(aa) == "defaults":  # the settings that differ first, defaults second
                (fa, a, aa, ra), (fb, b, ab, rb) = (fb, b, ab, rb), (fa, a, aa, ra)
            pa, pb = ra["per_image"], rb["per_image"]
            ca, cb = decode_bits(pa["correct_hex"], n), decode_bits(pb["correct_hex"], n)
            top = dict(zip(("d", "ci"), paired_difference_interval(ca, cb)))
            o, q = discordant(ca, cb)
            top1 = {"d": top["d"], "lo": top["ci"][0], "hi": top["ci"][1],
                    "p": mcnemar_exact(o, q), "only_x": o, "only_y": q, "paired": True, "n": n}
            ag = paired_difference_interval(decode_bits(pa["agree_hex"], n),
                                            decode_bits(pb["agree_hex"], n))
            kl = paired_difference_interval(decode_floats(pa["kl_b64"], n),
                                            decode_floats(pb["kl_b64"], n))
            sets, setb = _settings(aa), _settings(ab)
            out.append(f"| {_rel(fa, md_dir)} − {_rel(fb, md_dir)} | {aa.get('model')} seed "
                       f"{aa.get('seed')} | {sets} (`{ra['stage']}`) − {setb} "
                       f"(`{rb['stage']}`) | {n} | {fmt_diff(top1, True)} | {words(top1)} | "
                       f"{100 * ag[0]:+.2f} [{100 * ag[1][0]:+.2f}, {100 * ag[1][1]:+.2f}] | "
                       f"{kl[0]:+.4f} [{kl[1][0]:+.4f}, {kl[1][1]:+.4f}] |")
    if not out:
        return []
    return ["Shipped model against shipped model on the same tuning images (the last row of "
            "each file; paired bootstrap 95% intervals; a KL difference below zero means "
            "closer to the original):", "",
            "| files | model | settings (last stage) | images | Δ top-1 (pp) [95%] | verdict "
            "| Δ agreement (pp) [95%] | Δ KL (nats) [95%] |", "|---|---|---|---|---|---|---|---|",
            *out, ""]


def synthetic_table(files: list[Path], md_dir: Path) -> list[str]:
    """Data-free (synthetic) vs real calibration: the CLI runs of one results file."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "runs" not in d:
            continue
        refs = {k.split("-")[0]: r.get("eval", {}) for k, r in d["runs"].items()
                if k.endswith("-orig")}
        for k, r in d["runs"].items():
            ev = r.get("eval") or {}
            if k.endswith("-orig") or ".shard" in k or ev.get("top1") is None:
                continue
            ref = refs.get(k.split("-")[0], {})
            vs, verdict = _vs(ev.get("top1"), ev.get("n"), ref.get("top1"))
            rows.append(f"| {_rel(f, md_dir)} | `{k}` | {ev.get('n')} | {_pc(ref.get('top1'))} "
                        f"| {_pc(ev.get('top1'))} | {vs} | {verdict} | "
                        f"{_pc(ev.get('agreement'))} |")
    if not rows:
        return []
    return ["### Data-free (synthetic) vs real calibration", "",
            "`hfbconvert compress` with real or synthetic calibration images (run names: "
            "model, source, number of images). " + CAVEAT, "",
            "| results file | run | eval images | original top-1 % | top-1 % | "
            "Δ (pp) [95%] | vs original | agreement % |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


ACT_SITES_SHOWN = 12  # the sites that carry most of the loss; the rest are counted


def act_sites_table(files: list[Path], md_dir: Path) -> list[str]:
    """bench/int8_act_sites.py: each uint8 activation quantizer switched off alone, the
    paired per-image KL change against all on; the sites with the largest drops, and how
    many of the others have an interval that excludes zero."""
    out = []
    for f in files:
        d = _load(f)
        if not d or "rows" not in d:
            continue
        rows = d["rows"]
        base = next((r for r in rows if r.get("site") == "all on"), None)
        sites = [r for r in rows if r.get("site") not in ("all on", "all off")]
        if base is None or not sites:
            continue
        split = (d.get("split") or {}).get("eval", {})
        where = f"{split.get('name', '?')}, {split.get('n', '?')}"

        def line(r: dict, f: Path = f, where: str = where) -> str:
            k = r["kl_vs_all_on"]
            sure = "lower" if k["hi"] < 0 else "higher" if k["lo"] > 0 else "within noise"
            return (f"| {_rel(f, md_dir)} | `{r['site']}` | {where} | "
                    f"{_ci(r.get('kl'), r.get('kl_ci95'), 1.0, 4)} | {k['d']:+.4f} "
                    f"[{k['lo']:+.4f}, {k['hi']:+.4f}] | {sure} |")
        off = [r for r in rows if r.get("site") == "all off"]
        ranked = sorted(sites, key=lambda r: r["kl_vs_all_on"]["d"])
        lower = sum(r["kl_vs_all_on"]["hi"] < 0 for r in sites)
        total = sum(min(0.0, r["kl_vs_all_on"]["d"]) for r in sites)
        out += [f"| {_rel(f, md_dir)} | all on | {where} | "
                f"{_ci(base.get('kl'), base.get('kl_ci95'), 1.0, 4)} | | |",
                *[line(r) for r in off], *[line(r) for r in ranked[:ACT_SITES_SHOWN]],
                f"| {_rel(f, md_dir)} | {len(sites)} sites in all: {lower} with an interval "
                f"below zero; the drops sum to {total:+.4f} | | | | |"]
    if not out:
        return []
    return ["### Where the uint8 activations lose (`python -m bench.int8_act_sites`)", "",
            "The int8 hybrid (gptq weights, every quantizer calibrated as the stage does) "
            "with one activation quantizer switched off at a time (its input passes in "
            "float), against all on, paired per image on the tuning split; the "
            f"{ACT_SITES_SHOWN} largest drops, and the all-off row (int8 weights, float "
            "activations).", "",
            "| results file | quantizer off | split, images | KL (nats) [95%] | Δ KL vs all "
            "on [95%] | KL |", "|---|---|---|---|---|---|", *out, ""]


def planner_table(files: list[Path], md_dir: Path) -> list[str]:
    """The budget planner's heuristic against the exact MILP (predicted error)."""
    rows = []
    for f in files:
        d = _load(f)
        if not d or "models" not in d:
            continue
        for model, rs in d["models"].items():
            for r in rs:
                rows.append(f"| {_rel(f, md_dir)} | {model} | {r.get('budget')} | "
                            f"{r.get('heuristic'):.4g} | {r.get('optimum'):.4g} | "
                            f"{100 * r.get('gap', 0):.1f}% |")
    if not rows:
        return []
    return ["### Budget planner: heuristic vs exact MILP (`python -m bench.planner_exact`)", "",
            "Predicted error (the planner's objective, not a top-1) of the heuristic and of "
            "the exact knapsack optimum, and the heuristic's excess over it.", "",
            "| results file | model | MUL budget | heuristic | optimum | heuristic worse by |",
            "|---|---|---|---|---|---|", *rows, ""]


SECTIONS: list[tuple[str, Callable[[list[Path], Path], list[str]]]] = [
    ("ablation-*.json", configs_table), ("finetune-*.json", finetune_table),
    ("finetune-*.json", curve_table),
    ("finetune-probe-*.json", probe_table),
    ("int8-order-*.json", order_table), ("int8-stages-*.json", stages_table),
    ("int8-rounding-*.json", rounding_table), ("int8-act-sites-*.json", act_sites_table),
    ("synthetic-calibration*.json", synthetic_table),
    ("*-planner-exact.json", planner_table), ("milp-scale-*.json", milp_scale_table),
]


def render_ablation(results_dir: Path, md_dir: Path) -> str:
    """The whole ablation section (empty when there are no ablation results files)."""
    parts: list[str] = []
    for pattern, fn in SECTIONS:
        parts += fn(sorted(results_dir.glob(pattern)), md_dir)
    if not parts:
        return ""
    head = ["## Ablations", "",
            "Generated by `python -m bench.report` from the ablation scripts' results files "
            "(each row names its file; the command that produced a file is in the script's "
            "docstring and in the file's `args`). The hand-written history these runs came "
            "with, including the reasons for each default, is `bench/ablation.md` (not "
            "regenerated: some of its figures come from code states no results file records).", ""]
    return "\n".join(head + parts)
